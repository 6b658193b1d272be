//! Who is calling, for per-caller bounds: today the peer's IP address.
//!
//! The seam for authenticated callers: [`CallerKey::of`] is the one place a
//! request becomes a caller. Once requests carry an authenticated identity
//! (an extension set by the auth layer), prefer it here; every per-caller
//! bound follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Request;

use crate::error::Error;

/// The caller a per-caller bound is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerKey(String);

impl CallerKey {
    /// The authenticated caller's name (with an auth file), else the peer's
    /// IP address (a server without auth: every caller is "anonymous").
    pub fn of<T>(request: &Request<T>) -> CallerKey {
        if let Some(caller) = request
            .extensions()
            .get::<std::sync::Arc<crate::domain::auth::Caller>>()
            .filter(|caller| caller.name != crate::domain::auth::ANONYMOUS)
        {
            return CallerKey(format!("caller:{}", caller.name));
        }
        match request.remote_addr() {
            Some(addr) => CallerKey(format!("ip:{}", addr.ip())),
            // In-process transports carry no address: one shared caller.
            None => CallerKey("unknown".to_owned()),
        }
    }
}

impl std::fmt::Display for CallerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Open watch streams per caller, at most `max` each.
#[derive(Debug, Clone)]
pub struct WatchSlots {
    max: usize,
    held: Arc<Mutex<HashMap<CallerKey, usize>>>,
}

impl WatchSlots {
    pub fn new(max_per_caller: usize) -> Self {
        WatchSlots {
            max: max_per_caller,
            held: Arc::default(),
        }
    }

    /// A slot for one more stream of `caller`, or RESOURCE_EXHAUSTED. The
    /// slot is freed when the returned guard is dropped (with the stream).
    pub fn acquire(&self, caller: CallerKey) -> Result<WatchSlot, Error> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(caller.clone()).or_insert(0);
        if *count >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "{} watch streams open for this caller, at most {} allowed (--max-watches-per-caller)",
                count, self.max
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            caller,
        })
    }

    fn release(&self, caller: &CallerKey) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(caller) {
            *count -= 1;
            if *count == 0 {
                held.remove(caller);
            }
        }
    }
}

impl Default for WatchSlots {
    /// No bound (tests and tools that build a service directly).
    fn default() -> Self {
        WatchSlots::new(usize::MAX)
    }
}

/// One open stream's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct WatchSlot {
    slots: WatchSlots,
    caller: CallerKey,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.slots.release(&self.caller);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_slots_back_when_streams_end() {
        let slots = WatchSlots::new(2);
        let a = CallerKey("ip:10.0.0.1".into());
        let b = CallerKey("ip:10.0.0.2".into());
        let first = slots.acquire(a.clone()).unwrap();
        let _second = slots.acquire(a.clone()).unwrap();
        let err = slots.acquire(a.clone()).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        assert!(slots.acquire(b).is_ok(), "another caller is not affected");
        drop(first);
        assert!(slots.acquire(a).is_ok());
    }
}
