//! The one mapping from [`Error`] to `tonic::Status`.
//!
//! Each status carries a `google.rpc.ErrorInfo` with a stable `reason`, so that
//! Python and TypeScript clients can branch on it without parsing messages.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

const DOMAIN: &str = "fleetcare.v1";

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        // No `_` arm: a new variant must decide its code here.
        let (code, reason) = match &error {
            Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::NotFound { .. } => (Code::NotFound, "NOT_FOUND"),
            Error::TransitionRefused(_) => (Code::FailedPrecondition, "TRANSITION_REFUSED"),
            Error::FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
            Error::OutOfRange(_) => (Code::OutOfRange, "REVISION_OUT_OF_RANGE"),
            Error::Aborted(_) => (Code::Aborted, "ABORTED"),
            Error::ProcessorRunning { .. } => (Code::Aborted, "PROCESSOR_RUNNING"),
            Error::SerializationFailure => (Code::Aborted, "SERIALIZATION_FAILURE"),
            Error::ResourceExhausted(_) => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
            Error::Unavailable(_) => (Code::Unavailable, "UNAVAILABLE"),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (Code::Internal, "INTERNAL")
            }
        };
        let details = ErrorDetails::with_error_info(reason, DOMAIN, []);
        Status::with_error_details(code, error.to_string(), details)
    }
}
