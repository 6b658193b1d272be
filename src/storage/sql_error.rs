//! What a database error means for the client, for every SQL backend: the
//! errors of the connection and the pool are the same everywhere; a backend
//! classifies only its database's own error codes.

use crate::error::Error;

/// Maps `err`: a lost or unreachable database is `Unavailable` (`lost`
/// names it in the message), a database error is what `classify` says of it
/// and of `err` (`None`: unexpected), and anything unexpected is `Internal`
/// (and logged).
pub(crate) fn map(
    err: sqlx::Error,
    lost: &str,
    classify: impl FnOnce(&dyn sqlx::error::DatabaseError, &sqlx::Error) -> Option<Error>,
) -> Error {
    use sqlx::Error as E;
    let known = match &err {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
            Some(Error::Unavailable(format!("{lost} ({err})")))
        }
        E::Database(db) => classify(db.as_ref(), &err),
        _ => None,
    };
    known.unwrap_or_else(|| {
        let code = match &err {
            E::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        };
        tracing::error!(error = %err, code, "unexpected database error");
        Error::Internal(err.to_string())
    })
}
