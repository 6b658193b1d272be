//! CLI failures: one line on stderr and an exit code a script can branch on.

use std::fmt;

use tonic::Code;

/// Exit codes (2 is clap's, for a malformed command line).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const REFUSED: u8 = 5;
}

#[derive(Debug)]
pub enum CliError {
    /// No connection to the server.
    Unreachable { server: String, detail: String },
    /// The connection could not be set up: an unreadable CA or client
    /// certificate file, TLS flags with an `http://` address, a bad token.
    Setup(String),
    /// The server answered with an error.
    Status(tonic::Status),
    /// Writing the output failed (other than a closed pipe).
    Output(std::io::Error),
}

impl CliError {
    pub fn unreachable(server: &str, error: &(dyn std::error::Error + 'static)) -> CliError {
        CliError::Unreachable {
            server: server.to_string(),
            detail: error_chain(error),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::Status(status) => match status.code() {
                Code::Unavailable => exit::UNREACHABLE,
                Code::NotFound => exit::NOT_FOUND,
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::OutOfRange
                | Code::AlreadyExists
                | Code::ResourceExhausted => exit::REFUSED,
                _ => exit::FAILURE,
            },
            CliError::Output(_) | CliError::Setup(_) => exit::FAILURE,
        }
    }
}

/// `transport error: tcp connect error: Connection refused (os error 111)`:
/// tonic's own message is just "transport error", the cause is in the chain.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Unreachable { server, detail } => {
                write!(f, "cannot reach the server at {server}: {detail}")
            }
            CliError::Status(status) => {
                let what = match status.code() {
                    Code::NotFound => "not found",
                    Code::FailedPrecondition => "refused",
                    Code::InvalidArgument => "invalid request",
                    Code::Aborted => "aborted",
                    Code::OutOfRange => "out of range",
                    Code::AlreadyExists => "already exists",
                    Code::ResourceExhausted => "limit reached",
                    Code::Unavailable => "server unavailable",
                    Code::DeadlineExceeded => "timed out",
                    Code::Unimplemented => "not supported by this server",
                    _ => "server error",
                };
                // One line, whatever the server put in its message.
                let message = status.message().replace('\n', " ");
                write!(f, "{what}: {message}")
            }
            CliError::Output(error) => write!(f, "cannot write output: {error}"),
            CliError::Setup(detail) => write!(f, "{detail}"),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        CliError::Status(status)
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> CliError {
        CliError::Output(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_map_to_one_line_and_an_exit_code() {
        let e = CliError::from(tonic::Status::not_found("agent \"x\" is not registered"));
        assert_eq!(e.to_string(), "not found: agent \"x\" is not registered");
        assert_eq!(e.exit_code(), exit::NOT_FOUND);

        let e = CliError::from(tonic::Status::failed_precondition(
            "agent is BUSY\nnot IDLE",
        ));
        assert_eq!(e.to_string(), "refused: agent is BUSY not IDLE");
        assert_eq!(e.exit_code(), exit::REFUSED);

        assert_eq!(
            CliError::from(tonic::Status::unavailable("down")).exit_code(),
            exit::UNREACHABLE
        );
        assert_eq!(
            CliError::from(tonic::Status::internal("bug")).exit_code(),
            exit::FAILURE
        );
    }

    #[test]
    fn the_error_chain_is_joined_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = CliError::unreachable("127.0.0.1:1", &io);
        assert_eq!(
            e.to_string(),
            "cannot reach the server at 127.0.0.1:1: refused"
        );
        assert_eq!(e.exit_code(), exit::UNREACHABLE);
    }
}
