//! The gRPC layer: one thin adapter per service, and the one error mapping.

pub mod agent_requests;
pub mod agent_status;
pub mod auth;
pub mod callers;
pub mod codec;
pub mod convert;
pub mod dispatch;
pub mod guard;
pub mod healing;
pub mod metrics;
pub mod quota;
pub mod session_pipeline;
pub mod status;
pub mod trace;
pub mod validate;
pub mod watch_route;
