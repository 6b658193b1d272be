//! The server's clock: what a store decides expiry with (leases, claims,
//! `observed_at`) and what the runtime stamps state changes with. Tests hold
//! it still or move it by hand ([`Clock::manual`]) instead of sleeping.
//! Callers' clocks are never used.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(Arc::new(Utc::now))
    }

    /// A clock that only moves when told to, and the handle that moves it.
    pub fn manual(start: DateTime<Utc>) -> (Self, ManualClock) {
        let now = Arc::new(Mutex::new(start));
        let read = now.clone();
        let clock = Clock(Arc::new(move || {
            *read.lock().unwrap_or_else(|e| e.into_inner())
        }));
        (clock, ManualClock(now))
    }

    /// A clock that reads `now` from a function: the deterministic
    /// simulation's (`tests/simulation`), which follows tokio's paused time
    /// and jumps when its nemesis says so.
    pub fn from_fn(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Two clocks are equal when they are the same clock (clones of one another).
impl PartialEq for Clock {
    fn eq(&self, other: &Clock) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Clock {}

/// Moves a [`Clock::manual`].
#[derive(Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// What the clock reads.
    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now()).finish()
    }
}

/// A time at the SQL stores' precision (microseconds), so that a time read
/// back equals the time decided with.
pub(crate) fn at_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}
