//! The service-wide error: what went wrong, in terms a client can act on.
//!
//! Domain refusals convert into it, the store maps database failures into it in
//! one place (`storage::postgres::db_error`), and `grpc::status` maps it to a
//! `tonic::Status` with a stable `google.rpc.ErrorInfo` reason.

use crate::domain::agent::TransitionRefused;
use crate::domain::healing_records::{OutcomeAlreadyRecorded, RecoveryAlreadyActive};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No valid credentials: a missing, malformed or unknown bearer token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known caller asked for something outside its role or scope.
    #[error(transparent)]
    PermissionDenied(#[from] crate::domain::auth::Denied),
    /// The request is malformed: a missing or out-of-bounds field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named resource does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// The agent's status does not allow the requested transition.
    #[error(transparent)]
    TransitionRefused(#[from] TransitionRefused),
    /// The agent already has a recovery within its lease (the message names it).
    #[error(transparent)]
    RecoveryAlreadyActive(#[from] RecoveryAlreadyActive),
    /// A request for a recovery plan was braked, or decided in a dry run:
    /// nothing was handed out (the reason names the brake).
    #[error(transparent)]
    NotPlanned(#[from] crate::domain::brakes::NotPlanned),
    /// The recovery already has its outcome.
    #[error(transparent)]
    OutcomeAlreadyRecorded(#[from] OutcomeAlreadyRecorded),
    /// A concurrent update of the same rows won (a serialization failure, a
    /// deadlock, a row created meanwhile): retrying the call is safe.
    #[error("concurrent update conflict, retry: {0}")]
    Conflict(String),
    /// Another precondition does not hold (prefer a typed variant).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A revision or page outside what is retained.
    #[error("{0}")]
    OutOfRange(String),
    /// A conflicting operation is under way (prefer a typed variant).
    #[error("{0}")]
    Aborted(String),
    /// The processor is already running, on this server or another one.
    #[error("processor {processor} is already running {location}")]
    ProcessorRunning {
        processor: String,
        /// "on this server" or "on another server".
        location: &'static str,
    },
    /// A bound was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A fencing token that is not the agent's active claim's (or none while
    /// one is active): the call changed nothing.
    #[error(transparent)]
    StaleFencingToken(#[from] crate::domain::dispatch::StaleFencingToken),
    /// The agent holds a claim whose lease runs (DeleteAgent).
    #[error(transparent)]
    ClaimHeld(#[from] crate::domain::dispatch::ClaimHeld),
    /// No claimable agent matches the selector (the message counts why).
    #[error("{0}")]
    NoAgentAvailable(String),
    /// The database cannot be reached, or the server is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected database error. The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    pub fn agent_not_found(agent_id: &str) -> Self {
        Error::NotFound {
            kind: "agent",
            id: agent_id.to_owned(),
        }
    }
}

/// A malformed request field, as the domain's checks name it.
impl From<crate::domain::invalid::InvalidArgument> for Error {
    fn from(invalid: crate::domain::invalid::InvalidArgument) -> Self {
        Error::InvalidArgument(invalid.to_string())
    }
}

impl From<crate::domain::batch::Refusal> for Error {
    fn from(refusal: crate::domain::batch::Refusal) -> Self {
        use crate::domain::batch::Refusal;
        match refusal {
            Refusal::UnknownAgent(agent_id) => Error::agent_not_found(&agent_id),
            Refusal::Transition(refused) => Error::TransitionRefused(refused),
            Refusal::StaleFencingToken(stale) => Error::StaleFencingToken(stale),
            Refusal::ClaimHeld(held) => Error::ClaimHeld(held),
            Refusal::NoAgentAvailable => Error::NoAgentAvailable("no agent available".into()),
            Refusal::Deleting(_) => Error::Aborted(refusal.to_string()),
            Refusal::NotPoolMember(_) | Refusal::HeldByPool { .. } => {
                Error::FailedPrecondition(refusal.to_string())
            }
            Refusal::UnknownPool(pool) => Error::NotFound {
                kind: "quota pool",
                id: pool,
            },
        }
    }
}
