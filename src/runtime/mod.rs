//! Background work: the transition fan-out and watch streams, the sweeper,
//! and the health monitor.

pub mod fanout;
pub mod health;
pub mod pipeline;
pub mod sweeper;
pub mod watch;
