//! Usage rollups, for every SQL backend: replacing files' usage entries and
//! maintaining the distinct messages and the cells in the same transaction
//! ([`replace_usage`]), and assembling a report from the groups a backend's
//! query found ([`ReportRow`], [`keyed_report`]).
//!
//! [`replace_usage`] is a sequence (replace the entries, lock and load the
//! stored copies of the keys the files touch, let `domain::usage::plan`
//! decide, write) written once over [`UsageTx`], one open transaction of a
//! backend, which only runs that backend's SQL (`sqlite/pipeline/
//! usage_rollups.rs`, `postgres/pipeline/usage_rollups.rs`).
//!
//! What a backend's transactions guarantee (the flow relies on it): what the
//! flow reads stays true until it commits. SQLite's one writer holds the
//! write lock from the transaction's start, so it locks nothing. Postgres
//! locks in one order in every transaction: message keys sorted (the new ones
//! by [`UsageTx::replace_entries`]'s insert, the stored ones by
//! [`UsageTx::lock_messages`]), then cells sorted (by
//! [`UsageTx::apply_cells`]'s upsert, in the plan's order); a deadlock or
//! serialization failure left over is its `Error::Conflict`, and the pipeline
//! retries the batch.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{NaiveDate, SubsecRound};
use sqlx::FromRow;

use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::UsageEntry;
use crate::domain::usage::{self, CellDelta, Group, MessageCopy, Tokens, UsageGrouping};
use crate::error::Result;
use crate::storage::UsageRow;
use crate::storage::decode::StoredTime;

/// One stored copy of a message, a row of `usage_messages` (the winners) or
/// `usage_entries` (every file's, `model` read as '' for none); `T` the
/// backend's time.
#[derive(FromRow)]
pub(crate) struct CopyRow<T> {
    dedup_key: String,
    path: String,
    line_no: i32,
    sidechain: bool,
    user_name: String,
    session_id: String,
    model: String,
    occurred_at: T,
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_tokens: i64,
    cache_read_tokens: i64,
}

impl<T: StoredTime> From<CopyRow<T>> for MessageCopy {
    fn from(r: CopyRow<T>) -> MessageCopy {
        MessageCopy {
            key: r.dedup_key,
            path: r.path,
            line_no: r.line_no,
            sidechain: r.sidechain,
            user: r.user_name,
            session: r.session_id,
            model: r.model,
            occurred_at: r.occurred_at.time(),
            tokens: Tokens {
                input: r.input_tokens,
                output: r.output_tokens,
                cache_creation: r.cache_creation_tokens,
                cache_read: r.cache_read_tokens,
            },
        }
    }
}

/// A copy at the stores' precision (microseconds), so the copy decided on in
/// memory is the copy read back later.
pub(crate) fn at_store_precision(mut copy: MessageCopy) -> MessageCopy {
    copy.occurred_at = copy.occurred_at.trunc_subsecs(6);
    copy
}

/// One open transaction of a backend on the usage tables: its SQL only. The
/// caller commits it.
#[async_trait]
pub(crate) trait UsageTx: Send {
    /// Deletes the entries of `paths`, inserts `copies` as their entries, and
    /// writes as the winner each of `best` (one copy per key, sorted by key)
    /// whose message is not stored yet. Returns the deleted entries' keys
    /// (repeats allowed) and the keys of `best` whose message was stored
    /// already (so not written).
    async fn replace_entries(
        &mut self,
        paths: &[&str],
        copies: &[MessageCopy],
        best: &[&MessageCopy],
    ) -> Result<(Vec<String>, HashSet<String>)>;

    /// The stored winners of `keys` (sorted, distinct), locked until the
    /// transaction ends.
    async fn lock_messages(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>>;

    /// Every file's stored copy of `keys`, read after
    /// [`UsageTx::lock_messages`]: it sees every copy committed before the
    /// locks were granted.
    async fn entries(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>>;

    /// Writes new winners of stored (or concurrently removed) messages
    /// (never empty).
    async fn write_messages(&mut self, copies: &[&MessageCopy]) -> Result<()>;

    /// Deletes the messages of `keys` (never empty).
    async fn delete_messages(&mut self, keys: &[&str]) -> Result<()>;

    /// Adds the deltas to their cells, in their order (never empty);
    /// recomputes first and last of the cells that lost a message and drops
    /// the empty ones.
    async fn apply_cells(&mut self, cells: &[CellDelta]) -> Result<()>;
}

/// Replaces the entries of every file in `files` (distinct paths) and brings
/// the messages and cells up to date, inside `tx`: a batch of files costs the
/// same few statements as one.
pub(crate) async fn replace_usage<C: UsageTx + ?Sized>(
    tx: &mut C,
    files: &[(&SessionFile, &[UsageEntry])],
) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    // Every file's copies (its best one per key).
    let mut copies: Vec<MessageCopy> = Vec::new();
    for (file, entries) in files {
        let own = MessageCopy::from_file(&file.path, &file.user, &file.session, entries);
        copies.extend(own.into_iter().map(at_store_precision));
    }
    let paths: Vec<&str> = files.iter().map(|(f, _)| f.path.as_str()).collect();
    // The batch's best copy of each message, sorted by key (the keys are
    // locked in this order): it wins wherever no other file has the message.
    let mut by_key: Vec<&MessageCopy> = copies.iter().collect();
    by_key.sort_by(|a, b| a.key.cmp(&b.key));
    let best: Vec<&MessageCopy> = by_key
        .chunk_by(|a, b| a.key == b.key)
        .filter_map(|group| usage::winner(group.iter().copied()))
        .collect();

    // The files' old entries out (their keys back), the new ones in, and the
    // messages nobody had yet written with the batch's best copy as winner.
    let (old_keys, existing) = tx.replace_entries(&paths, &copies, &best).await?;
    // The batch's messages it wrote first: their winner is decided.
    let inserted: HashSet<&str> = best
        .iter()
        .map(|c| c.key.as_str())
        .filter(|k| !existing.contains(*k))
        .collect();

    // The rest: lock, load every copy, let the domain decide.
    let mut contested: Vec<String> = old_keys
        .into_iter()
        .filter(|k| !inserted.contains(k.as_str()))
        .chain(
            best.iter()
                .filter(|c| !inserted.contains(c.key.as_str()))
                .map(|c| c.key.clone()),
        )
        .collect();
    contested.sort();
    contested.dedup();
    let (mut current, mut stored) = (Vec::new(), Vec::new());
    if !contested.is_empty() {
        current = tx.lock_messages(&contested).await?;
        stored = tx.entries(&contested).await?;
    }
    let current: HashMap<&str, &MessageCopy> =
        current.iter().map(|c| (c.key.as_str(), c)).collect();
    let mut candidates: HashMap<&str, Vec<&MessageCopy>> = HashMap::new();
    for copy in &stored {
        candidates.entry(copy.key.as_str()).or_default().push(copy);
    }
    let mut affected: Vec<&str> = contested.iter().map(String::as_str).collect();
    for &c in best.iter().filter(|c| inserted.contains(c.key.as_str())) {
        affected.push(c.key.as_str());
        candidates.insert(c.key.as_str(), vec![c]);
    }
    let plan = usage::plan(&affected, &current, &candidates);

    let changed: Vec<&MessageCopy> = plan
        .upserts
        .iter()
        .copied()
        .filter(|m| !inserted.contains(m.key.as_str()))
        .collect();
    if !changed.is_empty() {
        tx.write_messages(&changed).await?;
    }
    if !plan.deletes.is_empty() {
        tx.delete_messages(&plan.deletes).await?;
    }
    if !plan.cells.is_empty() {
        tx.apply_cells(&plan.cells).await?;
    }
    Ok(())
}

/// The grouping columns of a report query, as [`ReportRow`] reads them: the
/// columns `grouping` reads, the others '' (`no_day`: the backend's empty day).
pub(crate) fn group_columns(grouping: UsageGrouping, no_day: &str) -> String {
    let (day, user, session, model) = match grouping {
        UsageGrouping::Day => ("day", "''", "''", "''"),
        UsageGrouping::Session => (no_day, "user_name", "session_id", "''"),
        UsageGrouping::Model => (no_day, "''", "''", "model"),
        UsageGrouping::User => (no_day, "user_name", "''", "''"),
    };
    format!("{day} AS g_day, {user} AS g_user, {session} AS g_session, {model} AS g_model")
}

/// A report group's day as a backend returns it (SQLite: TEXT, '' for none;
/// Postgres: a nullable date).
pub(crate) trait StoredDay {
    fn day(self) -> Result<Option<NaiveDate>>;
}

/// A report group's distinct models as a backend returns them (SQLite: a JSON
/// array in TEXT; Postgres: `text[]`).
pub(crate) trait StoredModels {
    fn models(self) -> Result<Vec<String>>;
}

/// One group a backend's report query found: its [`Group`] columns
/// ([`group_columns`]) and sums; `T`, `D`, `M` the backend's time, day and
/// models.
#[derive(FromRow)]
pub(crate) struct ReportRow<T, D, M> {
    g_day: D,
    g_user: String,
    g_session: String,
    g_model: String,
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_tokens: i64,
    cache_read_tokens: i64,
    messages: i64,
    first_at: T,
    last_at: T,
    models: M,
}

/// The report of the groups a backend found, keyed by the domain
/// (`domain::usage::keyed_report`).
pub(crate) fn keyed_report<T: StoredTime, D: StoredDay, M: StoredModels>(
    grouping: UsageGrouping,
    rows: Vec<ReportRow<T, D, M>>,
) -> Result<Vec<UsageRow>> {
    let groups = rows
        .into_iter()
        .map(|r| {
            let group = Group {
                day: r.g_day.day()?,
                user: r.g_user,
                session: r.g_session,
                model: r.g_model,
            };
            let row = UsageRow {
                key: String::new(),
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_creation_tokens: r.cache_creation_tokens,
                cache_read_tokens: r.cache_read_tokens,
                messages: r.messages,
                first_at: r.first_at.time(),
                last_at: r.last_at.time(),
                models: r.models.models()?,
            };
            Ok((group, row))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(usage::keyed_report(grouping, groups))
}
