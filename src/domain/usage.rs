//! Usage rollups: which copy of a message counts, and how the totals change
//! when one file's copies are replaced. Pure; the store loads, locks and
//! writes what [`plan`] decides.
//!
//! ccusage 20's rule, made independent of the order files and runs arrive in:
//! the copies of one message (same `message.id`, in one file or several:
//! streamed content blocks, a resumed session's copied history, a side
//! question's or sub-agent's replay) count once. The copy that counts is
//! decided by [`MessageCopy::rank`]: a copy outside a sidechain beats a
//! sidechain's replay, then the most complete (the larger total) wins, then
//! the earlier path, then the earlier line. An entry without a message id
//! always counts.
//!
//! One deliberate difference: ccusage keys copies on `message.id` and
//! `requestId` together, so two copies of one message outside a sidechain
//! under different request ids count twice there; a message id names one API
//! response, so here they count once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};

use crate::domain::transcript::UsageEntry;

/// The key under which copies of one message are de-duplicated: `m:` and
/// the message id; an entry without a message id gets a key of its own file
/// and line (`line:` never starts a message key).
pub fn dedup_key(path: &str, entry: &UsageEntry) -> String {
    match entry.message_id.as_deref() {
        Some(m) => format!("m:{m}"),
        None => format!("line:{path}:{}", entry.line_no),
    }
}

/// How many messages a file's entries hold: copies of one message count once.
pub fn message_count(entries: &[UsageEntry]) -> usize {
    let mut ids: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.message_id.as_deref())
        .collect();
    let without_id = entries.len() - ids.len();
    ids.sort_unstable();
    ids.dedup();
    without_id + ids.len()
}

/// A digest of the key of a message that other files may hold a copy of;
/// `None` for an entry that counts alone. Digests may collide: they only tell
/// which batches of files could touch the same messages, never which copy
/// counts.
pub fn shared_key_digest(entry: &UsageEntry) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let id = entry.message_id.as_deref()?;
    // Fixed keys: the same digest in every process.
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    Some(h.finish())
}

/// Token counts of one message, or sums of several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: i64,
    pub output: i64,
    pub cache_creation: i64,
    pub cache_read: i64,
}

impl Tokens {
    pub fn of(entry: &UsageEntry) -> Tokens {
        let t = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Tokens {
            input: t(entry.input_tokens),
            output: t(entry.output_tokens),
            cache_creation: t(entry.cache_creation_tokens),
            cache_read: t(entry.cache_read_tokens),
        }
    }

    fn add(&mut self, other: &Tokens, sign: i64) {
        self.input += sign * other.input;
        self.output += sign * other.output;
        self.cache_creation += sign * other.cache_creation;
        self.cache_read += sign * other.cache_read;
    }

    pub fn total(&self) -> i64 {
        self.input + self.output + self.cache_creation + self.cache_read
    }
}

/// One file's copy of one message, as stored per file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageCopy {
    pub key: String,
    pub path: String,
    pub line_no: i32,
    /// A side question's or sub-agent's copy: loses to any other copy.
    pub sidechain: bool,
    pub user: String,
    /// The file's session (its stem).
    pub session: String,
    /// Empty when the entry names no model.
    pub model: String,
    pub occurred_at: DateTime<Utc>,
    pub tokens: Tokens,
}

impl MessageCopy {
    /// The copies one file's entries make: the best copy of each message
    /// within the file (by [`MessageCopy::rank`]), sorted by key.
    pub fn from_file(path: &str, user: &str, session: &str, entries: &[UsageEntry]) -> Vec<Self> {
        let mut copies: Vec<MessageCopy> = entries
            .iter()
            .map(|e| MessageCopy {
                key: dedup_key(path, e),
                path: path.to_owned(),
                line_no: i32::try_from(e.line_no).unwrap_or(i32::MAX),
                sidechain: e.sidechain,
                user: user.to_owned(),
                session: session.to_owned(),
                model: e.model.clone().unwrap_or_default(),
                occurred_at: e.timestamp,
                tokens: Tokens::of(e),
            })
            .collect();
        copies.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| a.rank().cmp(&b.rank())));
        copies.dedup_by(|later, best| later.key == best.key);
        copies
    }

    /// The smaller the better: outside a sidechain first, then the larger
    /// total, the earlier path, the earlier line.
    pub fn rank(&self) -> (bool, Reverse<i64>, &str, i32) {
        (
            self.sidechain,
            Reverse(self.tokens.total()),
            &self.path,
            self.line_no,
        )
    }

    /// The UTC day the copy counts on.
    pub fn day(&self) -> NaiveDate {
        self.occurred_at.date_naive()
    }

    pub fn cell(&self) -> CellKey {
        CellKey {
            day: self.day(),
            user: self.user.clone(),
            session: self.session.clone(),
            model: self.model.clone(),
        }
    }
}

/// The copy that counts among all copies of one message.
pub fn winner<'a>(copies: impl IntoIterator<Item = &'a MessageCopy>) -> Option<&'a MessageCopy> {
    copies.into_iter().min_by(|a, b| a.rank().cmp(&b.rank()))
}

/// The finest grain of the totals; every grouping sums over cells.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    pub day: NaiveDate,
    pub user: String,
    pub session: String,
    pub model: String,
}

/// What to add to one cell (negative: remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellDelta {
    pub cell: CellKey,
    pub tokens: Tokens,
    pub messages: i64,
    /// Earliest and latest of the messages added (None when only removed).
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
    /// A message left the cell: its first and last must be recomputed.
    pub removed: bool,
}

/// How the store's messages and cells change. Borrows the copies it was
/// planned from: nothing is copied per message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollupPlan<'a> {
    /// New or changed winners, by key.
    pub upserts: Vec<&'a MessageCopy>,
    /// Messages no file has any more.
    pub deletes: Vec<&'a str>,
    /// Sorted by cell: the store updates cells in this order (a fixed lock order).
    pub cells: Vec<CellDelta>,
}

impl RollupPlan<'_> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty() && self.cells.is_empty()
    }
}

/// Decides the new winner of every affected message from its current winner
/// (`current`, what the totals count now) and every stored copy after the
/// file's replacement (`copies`). A key absent from `copies` has no copy left.
/// `affected` lists every key to decide.
pub fn plan<'a>(
    affected: &[&'a str],
    current: &HashMap<&str, &'a MessageCopy>,
    copies: &HashMap<&str, Vec<&'a MessageCopy>>,
) -> RollupPlan<'a> {
    let mut plan = RollupPlan::default();
    // Borrowed cell keys while summing: one owned key per cell at the end.
    type Key<'k> = (NaiveDate, &'k str, &'k str, &'k str);
    let mut cells: BTreeMap<Key<'a>, CellDelta> = BTreeMap::new();
    fn cell<'c, 'k>(
        cells: &'c mut BTreeMap<Key<'k>, CellDelta>,
        copy: &'k MessageCopy,
    ) -> &'c mut CellDelta {
        let key = (
            copy.day(),
            copy.user.as_str(),
            copy.session.as_str(),
            copy.model.as_str(),
        );
        cells.entry(key).or_insert_with(|| CellDelta {
            cell: copy.cell(),
            tokens: Tokens::default(),
            messages: 0,
            first_at: None,
            last_at: None,
            removed: false,
        })
    }
    for &key in affected {
        let old = current.get(key).copied();
        let new = copies.get(key).and_then(|c| winner(c.iter().copied()));
        if old == new {
            continue;
        }
        if let Some(old) = old {
            let delta = cell(&mut cells, old);
            delta.tokens.add(&old.tokens, -1);
            delta.messages -= 1;
            delta.removed = true;
        }
        match new {
            Some(new) => {
                let delta = cell(&mut cells, new);
                delta.tokens.add(&new.tokens, 1);
                delta.messages += 1;
                delta.first_at = Some(
                    delta
                        .first_at
                        .map_or(new.occurred_at, |f| f.min(new.occurred_at)),
                );
                delta.last_at = Some(
                    delta
                        .last_at
                        .map_or(new.occurred_at, |l| l.max(new.occurred_at)),
                );
                plan.upserts.push(new);
            }
            None => plan.deletes.push(key),
        }
    }
    plan.cells = cells
        .into_values()
        .filter(|d| d.removed || d.messages != 0 || d.tokens != Tokens::default())
        .collect();
    plan.upserts.sort_by(|a, b| a.key.cmp(&b.key));
    plan.deletes.sort();
    plan
}

/// How a `[since, until)` range is answered: the cells of the whole UTC days
/// it covers, and the messages of the (at most two) days it cuts through,
/// filtered by their time. Both are found by the cells' days, so no report
/// needs an index on the messages' time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSplit {
    /// Whole days `[whole_from, whole_to)` (`None`: unbounded), answered from
    /// the cells; empty when `whole_from >= whole_to`.
    pub whole_from: Option<NaiveDate>,
    pub whole_to: Option<NaiveDate>,
    /// Days the range covers only in part (a bound inside them), never among
    /// the whole days: their messages in `[since, until)` count.
    pub partial_days: Vec<NaiveDate>,
}

/// Splits `[since, until)` into whole UTC days and the days a bound cuts through.
pub fn split_range(since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>) -> RangeSplit {
    let midnight = |t: DateTime<Utc>| t.time() == NaiveTime::MIN;
    let mut partial_days = Vec::new();
    let whole_from = since.map(|s| {
        if midnight(s) {
            s.date_naive()
        } else {
            partial_days.push(s.date_naive());
            s.date_naive().succ_opt().unwrap_or(NaiveDate::MAX)
        }
    });
    let whole_to = until.map(|u| {
        if !midnight(u) {
            partial_days.push(u.date_naive());
        }
        u.date_naive()
    });
    partial_days.dedup();
    RangeSplit {
        whole_from,
        whole_to,
        partial_days,
    }
}

/// How `usage` groups token usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    Day,
    Session,
    Model,
    User,
}

/// A usage report's query, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub group_by: UsageGrouping,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub user: Option<String>,
}

/// Usage of one group, each assistant message counted once across all files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_tokens: i64,
    pub cache_read_tokens: i64,
    pub messages: i64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    pub models: Vec<String>,
}

impl UsageRow {
    pub fn total_tokens(&self) -> i64 {
        self.input_tokens + self.output_tokens + self.cache_creation_tokens + self.cache_read_tokens
    }
}

/// The sum of every row (keyed "total"), `None` when there are none.
pub fn totals(rows: &[UsageRow]) -> Option<UsageRow> {
    rows.iter().fold(None, |acc, r| {
        Some(match acc {
            None => UsageRow {
                key: "total".into(),
                ..r.clone()
            },
            Some(mut t) => {
                t.input_tokens += r.input_tokens;
                t.output_tokens += r.output_tokens;
                t.cache_creation_tokens += r.cache_creation_tokens;
                t.cache_read_tokens += r.cache_read_tokens;
                t.messages += r.messages;
                t.first_at = t.first_at.min(r.first_at);
                t.last_at = t.last_at.max(r.last_at);
                t.models.extend(r.models.iter().cloned());
                t.models.sort();
                t.models.dedup();
                t
            }
        })
    })
}

/// A report's group as a store finds it: the columns the grouping reads
/// (`day` for [`UsageGrouping::Day`], `user` and `session` for
/// [`UsageGrouping::Session`], ...), the others left empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    pub day: Option<NaiveDate>,
    pub user: String,
    pub session: String,
    pub model: String,
}

/// The key a report shows for a group: the day as `YYYY-MM-DD`, a session as
/// `user/session`, a model-less group as "unknown".
pub fn report_key(grouping: UsageGrouping, group: &Group) -> String {
    match grouping {
        UsageGrouping::Day => group
            .day
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        UsageGrouping::Session => format!("{}/{}", group.user, group.session),
        UsageGrouping::Model if group.model.is_empty() => "unknown".into(),
        UsageGrouping::Model => group.model.clone(),
        UsageGrouping::User => group.user.clone(),
    }
}

/// The key of a winning copy's group.
pub fn group_key(grouping: UsageGrouping, copy: &MessageCopy) -> String {
    let group = Group {
        day: Some(copy.day()),
        user: copy.user.clone(),
        session: copy.session.clone(),
        model: copy.model.clone(),
    };
    report_key(grouping, &group)
}

/// A store's report rows, one per group it found, as the report shows them:
/// keyed by [`report_key`], groups with the same key merged, sorted by key.
/// Each row's own `key` is ignored; its `models` may hold "" (no model),
/// which is dropped.
pub fn keyed_report(grouping: UsageGrouping, rows: Vec<(Group, UsageRow)>) -> Vec<UsageRow> {
    let mut by_key: BTreeMap<String, UsageRow> = BTreeMap::new();
    for (group, mut row) in rows {
        row.key = report_key(grouping, &group);
        row.models.retain(|m| !m.is_empty());
        match by_key.entry(row.key.clone()) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(row);
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let t = slot.get_mut();
                t.input_tokens += row.input_tokens;
                t.output_tokens += row.output_tokens;
                t.cache_creation_tokens += row.cache_creation_tokens;
                t.cache_read_tokens += row.cache_read_tokens;
                t.messages += row.messages;
                t.first_at = t.first_at.min(row.first_at);
                t.last_at = t.last_at.max(row.last_at);
                t.models.extend(row.models);
            }
        }
    }
    by_key
        .into_values()
        .map(|mut r| {
            r.models.sort();
            r.models.dedup();
            r
        })
        .collect()
}

/// The report computed from scratch: every file's copies, the winners picked,
/// filtered and grouped. What the rollups must always equal (and what a store
/// without rollups can answer with).
pub fn recount<'a>(
    copies: impl IntoIterator<Item = &'a MessageCopy>,
    query: &UsageQuery,
) -> Vec<UsageRow> {
    let mut by_key: HashMap<&str, &MessageCopy> = HashMap::new();
    for c in copies {
        by_key
            .entry(&c.key)
            .and_modify(|w| {
                if c.rank() < w.rank() {
                    *w = c;
                }
            })
            .or_insert(c);
    }
    let mut groups: BTreeMap<String, UsageRow> = BTreeMap::new();
    for c in by_key.into_values() {
        if query.since.is_some_and(|s| c.occurred_at < s)
            || query.until.is_some_and(|u| c.occurred_at >= u)
            || query.user.as_ref().is_some_and(|u| *u != c.user)
        {
            continue;
        }
        let key = group_key(query.group_by, c);
        let row = groups.entry(key.clone()).or_insert_with(|| UsageRow {
            key,
            input_tokens: 0,
            output_tokens: 0,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
            messages: 0,
            first_at: c.occurred_at,
            last_at: c.occurred_at,
            models: Vec::new(),
        });
        row.input_tokens += c.tokens.input;
        row.output_tokens += c.tokens.output;
        row.cache_creation_tokens += c.tokens.cache_creation;
        row.cache_read_tokens += c.tokens.cache_read;
        row.messages += 1;
        row.first_at = row.first_at.min(c.occurred_at);
        row.last_at = row.last_at.max(c.occurred_at);
        if !c.model.is_empty() && !row.models.contains(&c.model) {
            row.models.push(c.model.clone());
        }
    }
    groups
        .into_values()
        .map(|mut r| {
            r.models.sort();
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 14, h, m, 0).unwrap()
    }

    fn copy(
        key: &str,
        path: &str,
        sidechain: bool,
        when: DateTime<Utc>,
        input: i64,
    ) -> MessageCopy {
        MessageCopy {
            key: key.into(),
            path: path.into(),
            line_no: 1,
            sidechain,
            user: path.split('/').next().unwrap().into(),
            session: path.into(),
            model: "m".into(),
            occurred_at: when,
            tokens: Tokens {
                input,
                ..Tokens::default()
            },
        }
    }

    fn entry(m: Option<&str>, line_no: u32, output: u64, sidechain: bool) -> UsageEntry {
        UsageEntry {
            line_no,
            timestamp: at(1, line_no),
            message_id: m.map(Into::into),
            model: Some("claude-sonnet-4".into()),
            sidechain,
            input_tokens: 1,
            output_tokens: output,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
        }
    }

    #[test]
    fn a_message_id_is_the_key_and_entries_without_one_stay_apart() {
        assert_eq!(
            dedup_key("a/x.jsonl", &entry(Some("m"), 1, 1, false)),
            dedup_key("b/y.jsonl", &entry(Some("m"), 9, 5, true))
        );
        assert_ne!(
            dedup_key("a/x.jsonl", &entry(None, 1, 1, false)),
            dedup_key("a/x.jsonl", &entry(None, 2, 1, false))
        );
        // A message id that looks like a line key is still a message key.
        assert_ne!(
            dedup_key("a/x.jsonl", &entry(Some("line:a/x.jsonl:1"), 1, 1, false)),
            dedup_key("a/x.jsonl", &entry(None, 1, 1, false))
        );
        assert_eq!(
            shared_key_digest(&entry(Some("m"), 1, 1, false)),
            shared_key_digest(&entry(Some("m"), 7, 3, true))
        );
        assert_eq!(shared_key_digest(&entry(None, 1, 1, false)), None);
        let entries = [
            entry(Some("m"), 1, 1, false),
            entry(Some("m"), 2, 2, false),
            entry(Some("n"), 3, 1, true),
            entry(None, 4, 1, false),
            entry(None, 5, 1, false),
        ];
        assert_eq!(message_count(&entries), 4);
    }

    #[test]
    fn within_a_file_the_most_complete_copy_of_a_streamed_message_is_kept() {
        // Three content blocks of one response: the usage grows to the last.
        let entries = [
            entry(Some("m"), 1, 1, false),
            entry(Some("m"), 2, 120, false),
            entry(Some("m"), 3, 5, false),
            entry(None, 4, 1, false),
            entry(None, 5, 1, false),
        ];
        let copies = MessageCopy::from_file("u/s.jsonl", "u", "s", &entries);
        let kept: Vec<(&str, i32, i64)> = copies
            .iter()
            .map(|c| (c.key.as_str(), c.line_no, c.tokens.output))
            .collect();
        assert_eq!(
            kept,
            [
                ("line:u/s.jsonl:4", 4, 1),
                ("line:u/s.jsonl:5", 5, 1),
                ("m:m", 2, 120)
            ]
        );
    }

    #[test]
    fn outside_a_sidechain_beats_larger_then_earlier_path_then_line() {
        let parent = copy("k", "u/b.jsonl", false, at(3, 0), 10);
        let replay = copy("k", "u/b/subagents/agent-1.jsonl", true, at(4, 0), 50_000);
        let larger = copy("k", "u/c.jsonl", false, at(3, 0), 11);
        let same_earlier_path = copy("k", "u/a.jsonl", false, at(3, 0), 10);
        assert_eq!(winner([&replay, &parent]), Some(&parent));
        assert_eq!(winner([&parent, &replay, &larger]), Some(&larger));
        assert_eq!(
            winner([&parent, &same_earlier_path]),
            Some(&same_earlier_path)
        );
        let mut later_line = parent.clone();
        later_line.line_no = 2;
        assert_eq!(winner([&later_line, &parent]), Some(&parent));
        // Replays only: the largest replay counts, once.
        let other_replay = copy("k", "u/b/subagents/agent-2.jsonl", true, at(4, 0), 9);
        assert_eq!(winner([&other_replay, &replay]), Some(&replay));
        assert_eq!(winner([]), None);
    }

    #[test]
    fn a_replaced_file_hands_its_messages_to_the_next_best_copy() {
        let best = copy("k", "u/a.jsonl", false, at(1, 0), 10);
        let next = copy(
            "k",
            "u/b.jsonl",
            false,
            Utc.with_ymd_and_hms(2026, 3, 15, 0, 0, 0).unwrap(),
            10,
        );
        let current = HashMap::from([("k", &best)]);
        // a.jsonl was rewritten without the message: b's copy now counts, on its own day.
        let copies = HashMap::from([("k", vec![&next])]);
        let p = plan(&["k"], &current, &copies);
        assert_eq!(p.upserts, vec![&next]);
        assert!(p.deletes.is_empty());
        assert_eq!(p.cells.len(), 2);
        assert_eq!(
            (
                p.cells[0].messages,
                p.cells[0].tokens.input,
                p.cells[0].removed
            ),
            (-1, -10, true)
        );
        assert_eq!(
            (
                p.cells[1].messages,
                p.cells[1].tokens.input,
                p.cells[1].removed
            ),
            (1, 10, false)
        );
        // No copy left: the message goes.
        let p = plan(&["k"], &current, &HashMap::new());
        assert_eq!(p.deletes, vec!["k"]);
        // Nothing changed: nothing to write.
        let copies = HashMap::from([("k", vec![&best, &next])]);
        assert!(plan(&["k"], &current, &copies).is_empty());
    }

    #[test]
    fn a_later_larger_copy_replaces_the_counted_one_exactly_once() {
        let partial = copy("k", "u/a.jsonl", false, at(1, 0), 3);
        let complete = copy("k", "u/a.jsonl", false, at(1, 0), 40);
        let current = HashMap::from([("k", &partial)]);
        let copies = HashMap::from([("k", vec![&complete])]);
        let p = plan(&["k"], &current, &copies);
        assert_eq!(p.upserts, vec![&complete]);
        // One cell: minus the partial, plus the complete copy.
        assert_eq!(p.cells.len(), 1);
        assert_eq!((p.cells[0].messages, p.cells[0].tokens.input), (0, 37));
    }

    #[test]
    fn report_keys_are_the_domain_s_and_equal_keys_merge_in_key_order() {
        let row = |input, model: &str| UsageRow {
            key: "ignored".into(),
            input_tokens: input,
            output_tokens: 0,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
            messages: 1,
            first_at: at(1, input as u32),
            last_at: at(1, input as u32),
            models: vec![model.to_owned()],
        };
        let session = |user: &str, session: &str| Group {
            user: user.into(),
            session: session.into(),
            ..Group::default()
        };
        // (user, session) order is not key order: "a-b/x" sorts before "a/x".
        let rows = keyed_report(
            UsageGrouping::Session,
            vec![
                (session("a", "x"), row(1, "m")),
                (session("a-b", "x"), row(2, "")),
            ],
        );
        let keys: Vec<(&str, &[String])> = rows
            .iter()
            .map(|r| (r.key.as_str(), r.models.as_slice()))
            .collect();
        assert_eq!(keys, [("a-b/x", &[][..]), ("a/x", &["m".to_string()][..])]);
        // No model and a model named "unknown" are one group.
        let model = |m: &str| Group {
            model: m.into(),
            ..Group::default()
        };
        let rows = keyed_report(
            UsageGrouping::Model,
            vec![
                (model(""), row(3, "")),
                (model("unknown"), row(4, "unknown")),
            ],
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].key.as_str(), rows[0].input_tokens, rows[0].messages),
            ("unknown", 7, 2)
        );
        assert_eq!((rows[0].first_at, rows[0].last_at), (at(1, 3), at(1, 4)));
        let day = Group {
            day: NaiveDate::from_ymd_opt(2026, 3, 4),
            ..Group::default()
        };
        assert_eq!(report_key(UsageGrouping::Day, &day), "2026-03-04");
    }

    #[test]
    fn a_range_splits_into_whole_days_and_the_days_its_bounds_cut() {
        let midnight = Utc.with_ymd_and_hms(2026, 3, 14, 0, 0, 0).unwrap();
        let day = |d: u32| NaiveDate::from_ymd_opt(2026, 3, d).unwrap();
        let split = |since, until| {
            let s = split_range(since, until);
            (s.whole_from, s.whole_to, s.partial_days)
        };
        assert_eq!(split(None, None), (None, None, vec![]));
        assert_eq!(split(Some(midnight), None), (Some(day(14)), None, vec![]));
        // 01:00 on the 14th: the 14th is cut, no whole day before it.
        assert_eq!(
            split(Some(midnight), Some(at(1, 0))),
            (Some(day(14)), Some(day(14)), vec![day(14)])
        );
        assert_eq!(
            split(Some(at(1, 0)), Some(midnight + chrono::Duration::days(3))),
            (Some(day(15)), Some(day(17)), vec![day(14)])
        );
        // Both bounds inside one day: that day only, once.
        assert_eq!(
            split(Some(at(1, 0)), Some(at(2, 0))),
            (Some(day(15)), Some(day(14)), vec![day(14)])
        );
        assert_eq!(
            split(None, Some(at(2, 0))),
            (None, Some(day(14)), vec![day(14)])
        );
    }

    /// A store as the backends keep it: every file's copies, the counted
    /// copy of each message, and the cells; a file's replacement goes
    /// through [`plan`] as in the backends.
    #[derive(Default)]
    struct Rollups {
        files: BTreeMap<String, Vec<MessageCopy>>,
        counted: HashMap<String, MessageCopy>,
        cells: BTreeMap<CellKey, (Tokens, i64)>,
    }

    impl Rollups {
        fn replace(&mut self, path: &str, entries: &[UsageEntry]) {
            let user = path.split('/').next().unwrap();
            let new = MessageCopy::from_file(path, user, path, entries);
            let old = self.files.insert(path.to_owned(), new).unwrap_or_default();
            let mut affected: Vec<String> = old
                .iter()
                .chain(&self.files[path])
                .map(|c| c.key.clone())
                .collect();
            affected.sort();
            affected.dedup();
            let affected: Vec<&str> = affected.iter().map(String::as_str).collect();
            let current: HashMap<&str, &MessageCopy> = affected
                .iter()
                .filter_map(|k| self.counted.get(*k).map(|c| (*k, c)))
                .collect();
            let mut copies: HashMap<&str, Vec<&MessageCopy>> = HashMap::new();
            for c in self.files.values().flatten() {
                if affected.contains(&c.key.as_str()) {
                    copies.entry(c.key.as_str()).or_default().push(c);
                }
            }
            let p = plan(&affected, &current, &copies);
            let upserts: Vec<MessageCopy> = p.upserts.iter().map(|c| (*c).clone()).collect();
            let deletes: Vec<String> = p.deletes.iter().map(|k| k.to_string()).collect();
            for d in &p.cells {
                let cell = self.cells.entry(d.cell.clone()).or_default();
                cell.0.add(&d.tokens, 1);
                cell.1 += d.messages;
                if cell.1 == 0 {
                    assert_eq!(cell.0, Tokens::default(), "an empty cell holds tokens");
                    self.cells.remove(&d.cell);
                }
            }
            for c in upserts {
                self.counted.insert(c.key.clone(), c);
            }
            for k in deletes {
                self.counted.remove(&k);
            }
        }

        fn by_day(&self) -> Vec<(String, Tokens, i64)> {
            let mut days: BTreeMap<String, (Tokens, i64)> = BTreeMap::new();
            for (cell, (tokens, n)) in &self.cells {
                let day = days.entry(cell.day.to_string()).or_default();
                day.0.add(tokens, 1);
                day.1 += n;
            }
            days.into_iter().map(|(d, (t, n))| (d, t, n)).collect()
        }
    }

    fn recount_by_day(r: &Rollups) -> Vec<(String, Tokens, i64)> {
        let query = UsageQuery {
            group_by: UsageGrouping::Day,
            since: None,
            until: None,
            user: None,
        };
        recount(r.files.values().flatten(), &query)
            .into_iter()
            .map(|row| {
                let tokens = Tokens {
                    input: row.input_tokens,
                    output: row.output_tokens,
                    cache_creation: row.cache_creation_tokens,
                    cache_read: row.cache_read_tokens,
                };
                (row.key, tokens, row.messages)
            })
            .collect()
    }

    /// One streamed copy of a message: which message, its output so far,
    /// a sidechain replay or not, the hour it is stamped with.
    type Piece = (u8, u16, bool, u32);

    fn piece() -> impl Strategy<Value = Piece> {
        (0u8..6, 1u16..500, prop::bool::weighted(0.2), 0u32..48)
    }

    proptest! {
        /// Copies of a few messages arrive spread over files and runs, in any
        /// order, with growing usage (a file grows between runs or is
        /// rewritten): after every run the rollups equal a recount, and the
        /// counted copy of each message is the best of all its copies.
        #[test]
        fn rollups_equal_a_recount_whatever_order_copies_arrive_in(
            runs in prop::collection::vec(
                (0usize..4, prop::collection::vec(piece(), 0..6), prop::bool::ANY),
                1..12,
            ),
        ) {
            let paths = ["u/a.jsonl", "u/b.jsonl", "v/c.jsonl", "u/a/subagents/agent-1.jsonl"];
            let mut files: BTreeMap<&str, Vec<UsageEntry>> = BTreeMap::new();
            let mut r = Rollups::default();
            for (file, pieces, rewrite) in runs {
                let path = paths[file];
                let entries = files.entry(path).or_default();
                if rewrite {
                    entries.clear();
                }
                for (m, output, sidechain, hour) in pieces {
                    let line_no = entries.len() as u32 + 1;
                    entries.push(UsageEntry {
                        line_no,
                        timestamp: Utc.with_ymd_and_hms(2026, 3, 14, 0, 0, 0).unwrap()
                            + chrono::Duration::hours(i64::from(hour)),
                        message_id: (m > 0).then(|| format!("msg_{m}")),
                        model: Some(format!("model-{}", m % 2)),
                        sidechain,
                        input_tokens: 1,
                        output_tokens: u64::from(output),
                        cache_creation_tokens: 0,
                        cache_read_tokens: u64::from(m) * 1000,
                    });
                }
                r.replace(path, entries);
                prop_assert_eq!(r.by_day(), recount_by_day(&r));
                // Each message counts through its best copy anywhere.
                for (key, counted) in &r.counted {
                    let best = winner(r.files.values().flatten().filter(|c| &c.key == key));
                    prop_assert_eq!(best, Some(counted));
                }
            }
        }
    }
}
