//! An agent's labels: free-form key/value pairs a caller attaches, read by
//! the state machine (`agent`), recovery-time inference (`recovery`: the
//! `time_zone` label), authorization scopes (`auth`) and listings.

use std::collections::BTreeMap;

/// An agent's labels, ordered so that they print and compare stably.
pub type Labels = BTreeMap<String, String>;
