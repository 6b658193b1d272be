//! Pure domain logic: no I/O, no tonic, no sqlx; the clock is passed in.

pub mod agent;
pub mod recovery;
pub mod transition;
