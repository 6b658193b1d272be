//! The one mapping from [`Error`] to `tonic::Status`.
//!
//! Each status carries a `google.rpc.ErrorInfo` with a stable `reason`, so that
//! Python and TypeScript clients can branch on it without parsing messages.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

const DOMAIN: &str = "fleetcare.v1";

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let (code, reason, metadata) = classify(&error);
        if let Error::Internal(detail) = &error {
            tracing::error!(%detail, "internal error");
        }
        let details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
        Status::with_error_details(code, error.to_string(), details)
    }
}

/// The stable `reason` an error is answered with (its `google.rpc.ErrorInfo`),
/// for what counts refusals by reason.
pub fn reason(error: &Error) -> &'static str {
    classify(error).1
}

/// An error's code, reason and metadata.
fn classify(error: &Error) -> (Code, &'static str, HashMap<String, String>) {
    // No `_` arm: a new variant must decide its code here.
    let mut metadata = HashMap::new();
    let (code, reason) = match error {
        Error::Unauthenticated(_) => (Code::Unauthenticated, "UNAUTHENTICATED"),
        Error::PermissionDenied(denied) => {
            metadata.insert("caller".to_owned(), denied.caller.clone());
            metadata.insert("rpc".to_owned(), denied.rpc.to_owned());
            (Code::PermissionDenied, "PERMISSION_DENIED")
        }
        Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        Error::NotFound { .. } => (Code::NotFound, "NOT_FOUND"),
        Error::TransitionRefused(_) => (Code::FailedPrecondition, "TRANSITION_REFUSED"),
        Error::RecoveryAlreadyActive(active) => {
            metadata.insert("agent_id".to_owned(), active.agent_id.clone());
            metadata.insert("action_id".to_owned(), active.action_id.to_string());
            (Code::FailedPrecondition, "RECOVERY_ALREADY_ACTIVE")
        }
        Error::OutcomeAlreadyRecorded(recorded) => {
            metadata.insert("action_id".to_owned(), recorded.action_id.to_string());
            metadata.insert("status".to_owned(), recorded.status.as_str().to_owned());
            (Code::FailedPrecondition, "OUTCOME_ALREADY_RECORDED")
        }
        Error::NotPlanned(not) => {
            metadata.insert("agent_id".to_owned(), not.agent_id.clone());
            metadata.insert("decision_id".to_owned(), not.decision_id.to_string());
            (Code::FailedPrecondition, not.reason)
        }
        Error::Conflict(_) => (Code::Aborted, "CONFLICT"),
        Error::FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
        Error::OutOfRange(_) => (Code::OutOfRange, "REVISION_OUT_OF_RANGE"),
        Error::Aborted(_) => (Code::Aborted, "ABORTED"),
        Error::ProcessorRunning { .. } => (Code::Aborted, "PROCESSOR_RUNNING"),
        Error::ResourceExhausted(_) => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
        Error::StaleFencingToken(stale) => {
            metadata.insert("agent_id".to_owned(), stale.agent_id.clone());
            (Code::FailedPrecondition, "STALE_FENCING_TOKEN")
        }
        Error::ClaimHeld(held) => {
            metadata.insert("agent_id".to_owned(), held.agent_id.clone());
            metadata.insert("claim_id".to_owned(), held.claim_id.clone());
            (Code::FailedPrecondition, "CLAIM_HELD")
        }
        Error::NoAgentAvailable(_) => (Code::ResourceExhausted, "NO_AGENT_AVAILABLE"),
        Error::Unavailable(_) => (Code::Unavailable, "UNAVAILABLE"),
        Error::Internal(_) => (Code::Internal, "INTERNAL"),
    };
    (code, reason, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(status: &Status) -> String {
        status.get_details_error_info().expect("error info").reason
    }

    #[test]
    fn a_concurrent_update_conflict_is_aborted_and_retryable() {
        let status = Status::from(Error::Conflict("serialization failure".into()));
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(reason(&status), "CONFLICT");
        assert!(status.message().contains("retry"), "{}", status.message());
    }

    #[test]
    fn auth_refusals_have_their_codes_and_name_the_caller() {
        let status = Status::from(Error::Unauthenticated("unknown bearer token".into()));
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "UNAUTHENTICATED");
        let denied = crate::domain::auth::Denied {
            caller: "carol".into(),
            role: crate::domain::auth::Role::Reader,
            rpc: "MarkOffline",
            detail: String::new(),
        };
        let status = Status::from(Error::PermissionDenied(denied));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "carol (reader) may not call MarkOffline");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "PERMISSION_DENIED");
        assert_eq!(info.metadata["caller"], "carol");
        assert_eq!(info.metadata["rpc"], "MarkOffline");
    }

    #[test]
    fn an_internal_error_hides_its_detail() {
        let status = Status::from(Error::Internal("relation \"x\" does not exist".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(reason(&status), "INTERNAL");
    }
}
