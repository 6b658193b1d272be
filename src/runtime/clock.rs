//! The server's clock, passed to whatever decides with time, so that tests can
//! hold it still or move it by hand. It is the store's clock type
//! ([`crate::storage::clock`]): a server runs on the clock its store was
//! opened with ([`crate::storage::Stores::clock`]), so one manual clock moves
//! both. Callers' clocks are never used.

pub use crate::storage::clock::{Clock, ManualClock};
