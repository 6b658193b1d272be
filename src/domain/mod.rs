//! Pure domain logic: no I/O, no tonic, no sqlx; the clock is passed in.

pub mod agent;
pub mod auth;
pub mod batch;
pub mod brakes;
pub mod config_file;
pub mod dispatch;
pub mod healing;
pub mod healing_records;
pub mod invalid;
pub mod labels;
pub mod liveness;
pub mod pipeline;
pub mod pipeline_runs;
pub mod post_healing;
pub mod quota;
pub mod recovery;
pub mod transcript;
pub mod transition;
pub mod usage;
