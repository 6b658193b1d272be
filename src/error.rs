//! The service-wide error: what went wrong, in terms a client can act on.
//!
//! Domain refusals convert into it, the store maps database failures into it in
//! one place (`storage::postgres::db_error`), and `grpc::status` maps it to a
//! `tonic::Status` with a stable `google.rpc.ErrorInfo` reason.

use crate::domain::agent::TransitionRefused;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: a missing or out-of-bounds field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named resource does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// The agent's status does not allow the requested transition.
    #[error(transparent)]
    TransitionRefused(#[from] TransitionRefused),
    /// Another precondition does not hold (for example an active recovery).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A revision or page outside what is retained.
    #[error("{0}")]
    OutOfRange(String),
    /// A conflicting operation is under way (for example a processor already running).
    #[error("{0}")]
    Aborted(String),
    /// The processor is already running, on this server or another one.
    #[error("processor {processor} is already running {location}")]
    ProcessorRunning {
        processor: String,
        /// "on this server" or "on another server".
        location: &'static str,
    },
    /// A database serialization failure or deadlock: the work was rolled back
    /// and may simply be retried.
    #[error("concurrent update conflict, retry")]
    SerializationFailure,
    /// A bound was hit.
    #[error("{0}")]
    ResourceExhausted(String),
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
