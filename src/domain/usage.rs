//! Usage rollups: which copy of a message counts, and how the totals change
//! when one file's copies are replaced. Pure; the store loads, locks and
//! writes what [`plan`] decides.
//!
//! ccusage's rule: a message (same `message.id` and `requestId`) counts once
//! across every file, the copy from the file whose earliest entry is earliest
//! (ties: the path, then the line). An entry without both ids always counts.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};

use crate::domain::transcript::UsageEntry;

/// The ids that make an entry one copy of a message other files may hold too
/// (ccusage's rule: both must be present); `None` for an entry that counts alone.
fn message_ids(entry: &UsageEntry) -> Option<(&str, &str)> {
    Some((entry.message_id.as_deref()?, entry.request_id.as_deref()?))
}

/// The key under which copies of one message are de-duplicated. Length-prefixed,
/// so no two (message id, request id) pairs share a key; entries without both
/// ids get a key of their own file and line (`line:` cannot start a length).
pub fn dedup_key(path: &str, entry: &UsageEntry) -> String {
    match message_ids(entry) {
        Some((m, r)) => format!("{}:{m}:{r}", m.len()),
        None => format!("line:{path}:{}", entry.line_no),
    }
}

/// A digest of the key of a message that other files may hold a copy of;
/// `None` for an entry that counts alone. Digests may collide: they only tell
/// which batches of files could touch the same messages, never which copy
/// counts.
pub fn shared_key_digest(entry: &UsageEntry) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let ids = message_ids(entry)?;
    // Fixed keys: the same digest in every process.
    let mut h = std::hash::DefaultHasher::new();
    ids.hash(&mut h);
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
    /// The file's earliest entry: decides which copy wins.
    pub file_first_at: DateTime<Utc>,
    pub user: String,
    /// The file's session (its stem).
    pub session: String,
    /// Empty when the entry names no model.
    pub model: String,
    pub occurred_at: DateTime<Utc>,
    pub tokens: Tokens,
}

impl MessageCopy {
    /// The copies one file's entries make (the caller passes the file's entries
    /// after the within-file de-duplication of `extract_usage`).
    pub fn from_file(path: &str, user: &str, session: &str, entries: &[UsageEntry]) -> Vec<Self> {
        let Some(file_first_at) = entries.iter().map(|e| e.timestamp).min() else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|e| MessageCopy {
                key: dedup_key(path, e),
                path: path.to_owned(),
                line_no: i32::try_from(e.line_no).unwrap_or(i32::MAX),
                file_first_at,
                user: user.to_owned(),
                session: session.to_owned(),
                model: e.model.clone().unwrap_or_default(),
                occurred_at: e.timestamp,
                tokens: Tokens::of(e),
            })
            .collect()
    }

    fn rank(&self) -> (DateTime<Utc>, &str, i32) {
        (self.file_first_at, &self.path, self.line_no)
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

/// The key of a winning copy's group (a model-less message groups as "unknown").
pub fn group_key(grouping: UsageGrouping, copy: &MessageCopy) -> String {
    match grouping {
        UsageGrouping::Day => copy.occurred_at.date_naive().format("%Y-%m-%d").to_string(),
        UsageGrouping::Session => format!("{}/{}", copy.user, copy.session),
        UsageGrouping::Model if copy.model.is_empty() => "unknown".into(),
        UsageGrouping::Model => copy.model.clone(),
        UsageGrouping::User => copy.user.clone(),
    }
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

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 14, h, m, 0).unwrap()
    }

    fn copy(
        key: &str,
        path: &str,
        first: DateTime<Utc>,
        when: DateTime<Utc>,
        input: i64,
    ) -> MessageCopy {
        MessageCopy {
            key: key.into(),
            path: path.into(),
            line_no: 1,
            file_first_at: first,
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

    #[test]
    fn keys_never_collide_and_entries_without_ids_stay_apart() {
        let entry = |m: Option<&str>, r: Option<&str>, line_no| UsageEntry {
            line_no,
            timestamp: at(1, 0),
            session_id: None,
            message_id: m.map(Into::into),
            request_id: r.map(Into::into),
            model: None,
            input_tokens: 1,
            output_tokens: 1,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
        };
        assert_ne!(
            dedup_key("a/x.jsonl", &entry(Some("a:b"), Some("c"), 1)),
            dedup_key("a/x.jsonl", &entry(Some("a"), Some("b:c"), 1))
        );
        assert_eq!(
            dedup_key("a/x.jsonl", &entry(Some("m"), Some("r"), 1)),
            dedup_key("b/y.jsonl", &entry(Some("m"), Some("r"), 9))
        );
        assert_ne!(
            dedup_key("a/x.jsonl", &entry(Some("m"), None, 1)),
            dedup_key("a/x.jsonl", &entry(Some("m"), None, 2))
        );
    }

    #[test]
    fn the_copy_from_the_earliest_file_wins_then_the_path() {
        let a = copy("k", "u/b.jsonl", at(1, 0), at(3, 0), 1);
        let b = copy("k", "u/a.jsonl", at(2, 0), at(3, 0), 2);
        let c = copy("k", "u/c.jsonl", at(1, 0), at(3, 0), 3);
        assert_eq!(winner([&a, &b, &c]), Some(&a));
        assert_eq!(winner([&b, &c]), Some(&c));
        assert_eq!(winner([]), None);
    }

    #[test]
    fn a_replaced_file_hands_its_messages_to_the_next_best_copy() {
        let early = copy("k", "u/a.jsonl", at(1, 0), at(1, 0), 10);
        let late = copy(
            "k",
            "u/b.jsonl",
            at(2, 0),
            Utc.with_ymd_and_hms(2026, 3, 15, 0, 0, 0).unwrap(),
            10,
        );
        let current = HashMap::from([("k", &early)]);
        // a.jsonl was rewritten without the message: b's copy now counts, on its own day.
        let copies = HashMap::from([("k", vec![&late])]);
        let p = plan(&["k"], &current, &copies);
        assert_eq!(p.upserts, vec![&late]);
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
        let copies = HashMap::from([("k", vec![&early, &late])]);
        assert!(plan(&["k"], &current, &copies).is_empty());
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
}
