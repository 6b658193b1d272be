//! `fleetcare copy`: every row of one store into another, table by table.
//!
//! The tables are described once, here ([`TABLES`]): their columns and what
//! kind of value each holds, in a backend-neutral form ([`Value`]). A backend
//! only runs queries ([`TableStore`], in `postgres/copy.rs` and
//! `sqlite/copy.rs`): read a page of a table in key order, count, write a page
//! in one statement per chunk of rows.
//!
//! What a copy guarantees:
//! - the source is never written: a Postgres source is read in one
//!   `REPEATABLE READ, READ ONLY` transaction (a consistent snapshot even
//!   while a server runs on it); an SQLite source is opened read-only, without
//!   migrations, and under the embedded store's lock (so a server running on
//!   the file makes the copy refuse);
//! - the target is created and migrated if needed, must be empty (see
//!   [`occupancy`]), and is written in one transaction: a failed or refused
//!   copy leaves nothing behind; the row counts of every table are verified
//!   against the source's before that transaction commits;
//! - values are exact: timestamps at microseconds (both stores keep
//!   microseconds), integers as i64, floats as f64, JSON as documents (Postgres
//!   `jsonb` normalises key order and whitespace), transitions keep their
//!   revisions and the revision head its value.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use indicatif::ProgressBar;

use crate::error::{Error, Result};
use crate::storage::StoreLocation;

use super::{open_copy_source, open_copy_target};

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// Postgres `bigint` or `integer`; SQLite INTEGER.
    Int,
    /// Postgres `float8`; SQLite REAL.
    Float,
    /// Postgres `boolean`; SQLite INTEGER 0 or 1.
    Bool,
    /// Postgres `jsonb`; SQLite TEXT holding the document.
    Json,
    /// Postgres `timestamptz`; SQLite INTEGER microseconds since the epoch.
    Timestamp,
    /// Postgres `date`; SQLite TEXT `YYYY-MM-DD`.
    Date,
}

/// One stored value, whatever the backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Json(serde_json::Value),
    Timestamp(DateTime<Utc>),
    Date(NaiveDate),
}

impl Value {
    /// Whether the value may be stored in a column of `kind`.
    pub fn fits(&self, kind: Kind) -> bool {
        matches!(
            (self, kind),
            (Value::Null, _)
                | (Value::Text(_), Kind::Text)
                | (Value::Int(_), Kind::Int)
                | (Value::Float(_), Kind::Float)
                | (Value::Bool(_), Kind::Bool)
                | (Value::Json(_), Kind::Json)
                | (Value::Timestamp(_), Kind::Timestamp)
                | (Value::Date(_), Kind::Date)
        )
    }
}

/// A row: one value per column of its [`TableSpec`], in column order.
pub type Row = Vec<Value>;

/// A table as both schemas have it.
#[derive(Debug)]
pub struct TableSpec {
    pub name: &'static str,
    /// The columns rows are read in the order of (and paged by). Usually the
    /// primary key; when not unique, pages still never split rows of one key.
    pub key: &'static [&'static str],
    pub columns: &'static [(&'static str, Kind)],
    /// A one-row table every migrated store has (revision_head,
    /// revision_retention): the target's row is replaced by the source's.
    pub singleton: bool,
    /// A Postgres `bigserial` column, whose sequence must pass the copied ids.
    pub serial: Option<&'static str>,
}

impl TableSpec {
    pub fn column_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.columns.iter().map(|(name, _)| *name)
    }

    /// Positions of the key columns in a row.
    pub fn key_indices(&self) -> Vec<usize> {
        self.key
            .iter()
            .map(|k| {
                self.columns
                    .iter()
                    .position(|(name, _)| name == k)
                    .unwrap_or_else(|| panic!("{}: key column {k} is not a column", self.name))
            })
            .collect()
    }

    /// The key columns with their kinds.
    pub fn key_columns(&self) -> Vec<(&'static str, Kind)> {
        self.key_indices()
            .into_iter()
            .map(|i| self.columns[i])
            .collect()
    }

    /// The key of `row`.
    pub fn key_of(&self, row: &[Value]) -> Vec<Value> {
        self.key_indices()
            .into_iter()
            .map(|i| row[i].clone())
            .collect()
    }

    /// Refuses a row that does not match the columns (a backend bug).
    pub fn check(&self, row: &[Value]) -> Result<()> {
        if row.len() != self.columns.len() {
            return Err(Error::Internal(format!(
                "{}: a row of {} values for {} columns",
                self.name,
                row.len(),
                self.columns.len()
            )));
        }
        for ((name, kind), value) in self.columns.iter().zip(row) {
            if !value.fits(*kind) {
                return Err(Error::Internal(format!(
                    "{}.{name}: {value:?} is not a {kind:?}",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

use Kind::{Bool, Date, Float, Int, Json, Text, Timestamp};

/// Tables kept from other tables, not copied: the target counts them from
/// the copied rows ([`TableStore::finish_writes`]; `agent_census`, from
/// `agents`).
pub const DERIVED: &[&str] = &["agent_census"];

/// Every table of both schemas (not `_sqlx_migrations`, not [`DERIVED`]),
/// parents before children (error_events before recovery_actions).
pub static TABLES: &[TableSpec] = &[
    TableSpec {
        name: "agents",
        key: &["agent_id"],
        columns: &[
            ("agent_id", Text),
            ("status", Text),
            ("labels", Json),
            ("registered_at", Timestamp),
            ("last_heartbeat_at", Timestamp),
            ("last_transition_at", Timestamp),
            ("revision", Int),
            ("exhaustion_reason", Text),
            ("recovery_at", Timestamp),
            ("recovery_source", Text),
            ("recovery_hint", Text),
            ("cordon_reason", Text),
            ("claim_id", Text),
            ("claim_holder", Text),
            ("claim_token", Int),
            ("claim_request_id", Text),
            ("claimed_at", Timestamp),
            ("lease_expires_at", Timestamp),
            ("quota_pools", Json),
            ("pool_holds", Json),
            ("pool_held", Bool),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "quota_pools",
        key: &["name"],
        columns: &[("name", Text), ("state", Json), ("updated_at", Timestamp)],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "claims",
        key: &["claim_id"],
        columns: &[
            ("claim_id", Text),
            ("agent_id", Text),
            ("holder", Text),
            ("request_id", Text),
            ("fencing_token", Int),
            ("slot_type", Text),
            ("claimed_at", Timestamp),
            ("lease_expires_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "revision_head",
        key: &["singleton"],
        columns: &[("singleton", Bool), ("head_revision", Int)],
        singleton: true,
        serial: None,
    },
    TableSpec {
        name: "revision_retention",
        key: &["singleton"],
        columns: &[("singleton", Bool), ("pruned_through", Int)],
        singleton: true,
        serial: None,
    },
    TableSpec {
        name: "transitions",
        key: &["revision"],
        columns: &[
            ("revision", Int),
            ("agent_id", Text),
            ("from_status", Text),
            ("to_status", Text),
            ("cause", Text),
            ("occurred_at", Timestamp),
            ("exhaustion_reason", Text),
            ("recovery_at", Timestamp),
            ("actor", Text),
            ("quota_pool", Text),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "error_events",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("agent_id", Text),
            ("message", Text),
            ("context", Json),
            ("error_type", Text),
            ("severity", Float),
            ("critical", Bool),
            ("recurring", Bool),
            ("occurred_at", Timestamp),
            ("source_path", Text),
            ("source_key", Text),
            ("actor", Text),
        ],
        singleton: false,
        serial: Some("id"),
    },
    TableSpec {
        name: "recovery_actions",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("error_event_id", Int),
            ("agent_id", Text),
            ("error_type", Text),
            ("context_signature", Text),
            ("strategy", Text),
            ("chosen_strategy", Text),
            ("parameters", Json),
            ("estimated_duration_ms", Int),
            ("success_probability", Float),
            ("risk", Float),
            ("escalated", Bool),
            ("reason", Text),
            ("status", Text),
            ("created_at", Timestamp),
            ("lease_expires_at", Timestamp),
            ("completed_at", Timestamp),
            ("duration_ms", Int),
            ("details", Text),
            ("actor", Text),
            ("outcome_actor", Text),
        ],
        singleton: false,
        serial: Some("id"),
    },
    TableSpec {
        name: "healing_decisions",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("error_event_id", Int),
            ("agent_id", Text),
            ("decided_at", Timestamp),
            ("verdict", Text),
            ("reason", Text),
            ("message", Text),
            ("strategy", Text),
            ("recovery_action_id", Int),
            ("fleet_counted", Int),
            ("fleet_unhealthy", Int),
            ("group_name", Text),
            ("group_counted", Int),
            ("group_unhealthy", Int),
            ("fleet_plans_last_minute", Int),
            ("group_plans_last_minute", Int),
            ("agent_plans_in_window", Int),
            ("actor", Text),
        ],
        singleton: false,
        serial: Some("id"),
    },
    TableSpec {
        name: "healing_pauses",
        key: &["scope"],
        columns: &[
            ("scope", Text),
            ("reason", Text),
            ("paused_by", Text),
            ("paused_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "healing_breakers",
        key: &["error_type", "strategy"],
        columns: &[
            ("error_type", Text),
            ("strategy", Text),
            ("state", Text),
            ("failures", Int),
            ("since", Timestamp),
            ("updated_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "healing_patterns",
        key: &["error_type", "context_signature", "strategy"],
        columns: &[
            ("error_type", Text),
            ("context_signature", Text),
            ("strategy", Text),
            ("successes", Int),
            ("failures", Int),
            ("total_recovery_ms", Float),
            ("updated_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "post_locks",
        key: &["post_id"],
        columns: &[("post_id", Text)],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "post_actions",
        key: &["idempotency_key"],
        columns: &[
            ("idempotency_key", Text),
            ("post_id", Text),
            ("action_type", Text),
            ("tier", Int),
            ("status", Text),
            ("outcome", Json),
            ("error_code", Text),
            ("attempts", Int),
            ("created_at", Timestamp),
            ("updated_at", Timestamp),
            ("lease_expires_at", Timestamp),
            ("actor", Text),
            ("outcome_actor", Text),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "session_states",
        key: &["processor", "path"],
        columns: &[
            ("processor", Text),
            ("path", Text),
            ("user_name", Text),
            ("size", Int),
            ("mtime_ns", Int),
            ("observed_at", Timestamp),
            ("sha256", Text),
            ("processor_version", Int),
            ("processed_at", Timestamp),
            ("items_count", Int),
            ("attempts", Int),
            ("last_error", Text),
            ("status", Text),
            ("next_attempt_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "usage_entries",
        // No primary key: one row per line of a file in practice; pages keep
        // rows sharing (path, line_no) together regardless.
        key: &["path", "line_no"],
        columns: &[
            ("path", Text),
            ("user_name", Text),
            ("session_id", Text),
            ("line_no", Int),
            ("model", Text),
            ("occurred_at", Timestamp),
            ("input_tokens", Int),
            ("output_tokens", Int),
            ("cache_creation_tokens", Int),
            ("cache_read_tokens", Int),
            ("dedup_key", Text),
            ("sidechain", Bool),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "usage_messages",
        key: &["dedup_key"],
        columns: &[
            ("dedup_key", Text),
            ("path", Text),
            ("line_no", Int),
            ("user_name", Text),
            ("session_id", Text),
            ("model", Text),
            ("occurred_at", Timestamp),
            ("day", Date),
            ("input_tokens", Int),
            ("output_tokens", Int),
            ("cache_creation_tokens", Int),
            ("cache_read_tokens", Int),
            ("sidechain", Bool),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "usage_cells",
        key: &["day", "user_name", "session_id", "model"],
        columns: &[
            ("day", Date),
            ("user_name", Text),
            ("session_id", Text),
            ("model", Text),
            ("input_tokens", Int),
            ("output_tokens", Int),
            ("cache_creation_tokens", Int),
            ("cache_read_tokens", Int),
            ("messages", Int),
            ("first_at", Timestamp),
            ("last_at", Timestamp),
        ],
        singleton: false,
        serial: None,
    },
    TableSpec {
        name: "pipeline_runs",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("processor", Text),
            ("started_at", Timestamp),
            ("finished_at", Timestamp),
            ("started_by", Text),
            ("actor", Text),
            ("stats", Json),
        ],
        singleton: false,
        serial: Some("id"),
    },
];

/// The table called `name`.
pub fn table(name: &str) -> Option<&'static TableSpec> {
    TABLES.iter().find(|t| t.name == name)
}

/// Where a read starts.
#[derive(Debug, Clone, Copy)]
pub enum Bound<'a> {
    /// From the first row in key order.
    Start,
    /// Rows whose key sorts after this one.
    After(&'a [Value]),
    /// Rows whose key is this one.
    Equal(&'a [Value]),
}

/// One open session on a store: a read transaction on a source, the write
/// transaction on a target. Dropped without [`TableStore::commit`], it rolls
/// back.
#[async_trait]
pub trait TableStore: Send {
    /// How many rows `table` has.
    async fn count(&mut self, table: &TableSpec) -> Result<u64>;

    /// At most `limit` rows (all when `None`) from `bound` on, in key order.
    async fn read(
        &mut self,
        table: &TableSpec,
        bound: Bound<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<Row>>;

    /// Inserts `rows` (checked against the columns).
    async fn write(&mut self, table: &TableSpec, rows: &[Row]) -> Result<()>;

    /// Deletes every row of `table` (a singleton, before its row is copied).
    async fn clear(&mut self, table: &TableSpec) -> Result<()>;

    /// After every table is written: what the store needs to go on from the
    /// copied rows (Postgres: the `bigserial` sequences pass the copied ids;
    /// both: the [`DERIVED`] tables counted).
    async fn finish_writes(&mut self) -> Result<()>;

    async fn commit(self: Box<Self>) -> Result<()>;
}

/// Rows per page read from the source (and written to the target).
pub const PAGE_SIZE: usize = 5_000;

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Rows copied per table, in copy order (equal in source and target).
    pub tables: Vec<(&'static str, u64)>,
}

impl CopyReport {
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|(_, n)| n).sum()
    }

    /// Rows copied into `table`.
    pub fn rows(&self, table: &str) -> Option<u64> {
        self.tables
            .iter()
            .find(|(name, _)| *name == table)
            .map(|(_, n)| *n)
    }
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.tables.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, rows) in &self.tables {
            writeln!(f, "{name:<width$}  {rows:>10}")?;
        }
        write!(f, "{:<width$}  {:>10}", "total", self.total())
    }
}

/// Copies every row of `from` into `to` (created and migrated if needed),
/// refusing a non-empty target; `progress` counts rows (its length is set
/// here). See the module documentation.
pub async fn copy(
    from: &StoreLocation,
    to: &StoreLocation,
    progress: &ProgressBar,
) -> Result<CopyReport> {
    copy_paged(from, to, PAGE_SIZE, progress).await
}

/// [`copy`] with `page_size` rows per page.
pub async fn copy_paged(
    from: &StoreLocation,
    to: &StoreLocation,
    page_size: usize,
    progress: &ProgressBar,
) -> Result<CopyReport> {
    if same_store(from, to) {
        return Err(Error::InvalidArgument(format!(
            "--from and --to are the same store ({}): copy into another one",
            display_name(from)
        )));
    }
    let mut source = open_copy_source(from).await?;
    let mut target = open_copy_target(to).await?;
    let report = copy_between(
        source.as_mut(),
        target.as_mut(),
        &display_name(to),
        page_size,
        progress,
    )
    .await?;
    // Everything was read: the source's read transaction (and lock) can go
    // before the target commits, and no failure of the source can undo a copy.
    drop(source);
    target.commit().await?;
    Ok(report)
}

/// Copies every table from `source` into `target` without committing either.
pub async fn copy_between(
    source: &mut dyn TableStore,
    target: &mut dyn TableStore,
    target_name: &str,
    page_size: usize,
    progress: &ProgressBar,
) -> Result<CopyReport> {
    let page_size = page_size.max(1);
    let occupied = occupancy(target).await?;
    if !occupied.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "the target {target_name} is not empty ({}): fleetcare copy only fills a \
             new store (nothing was copied)",
            occupied.join(", ")
        )));
    }
    let mut counts = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        counts.push((table.name, source.count(table).await?));
    }
    progress.set_length(counts.iter().map(|(_, n)| n).sum());
    progress.set_position(0);
    for table in TABLES {
        progress.set_message(table.name);
        if table.singleton {
            target.clear(table).await?;
        }
        copy_table(source, target, table, page_size, progress).await?;
    }
    let mut report = CopyReport { tables: Vec::new() };
    for (table, (name, expected)) in TABLES.iter().zip(counts) {
        let copied = target.count(table).await?;
        if copied != expected {
            return Err(Error::Internal(format!(
                "{name}: {expected} rows in the source but {copied} in the target \
                 (nothing was committed)"
            )));
        }
        report.tables.push((name, copied));
    }
    target.finish_writes().await?;
    Ok(report)
}

/// Pages through `table` in key order. A full page may end inside a run of
/// rows sharing a key: that run is re-read whole, so a key that is not unique
/// never splits across pages (and loses rows).
async fn copy_table(
    source: &mut dyn TableStore,
    target: &mut dyn TableStore,
    table: &TableSpec,
    page_size: usize,
    progress: &ProgressBar,
) -> Result<()> {
    let mut after: Option<Vec<Value>> = None;
    loop {
        let bound = after.as_deref().map_or(Bound::Start, Bound::After);
        let mut rows = source.read(table, bound, Some(page_size)).await?;
        let Some(last) = rows.last() else { break };
        let full = rows.len() == page_size;
        let last_key = table.key_of(last);
        if full {
            let keep = rows
                .iter()
                .rposition(|row| table.key_of(row) != last_key)
                .map_or(0, |i| i + 1);
            rows.truncate(keep);
            rows.extend(source.read(table, Bound::Equal(&last_key), None).await?);
        }
        for row in &rows {
            table.check(row)?;
        }
        target.write(table, &rows).await?;
        progress.inc(rows.len() as u64);
        if !full {
            break;
        }
        after = Some(last_key);
    }
    Ok(())
}

/// What makes a store not new: rows in any table, or a singleton moved off
/// its initial value (a revision was allocated, history was pruned). Empty
/// when the store is new.
pub async fn occupancy(store: &mut dyn TableStore) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for table in TABLES {
        if table.singleton {
            for row in store.read(table, Bound::Start, None).await? {
                for ((column, _), value) in table.columns.iter().zip(&row) {
                    if let Value::Int(n) = value
                        && *n != 0
                    {
                        found.push(format!("{}.{column} = {n}", table.name));
                    }
                }
            }
        } else {
            let rows = store.count(table).await?;
            if rows > 0 {
                found.push(format!("{}: {rows} rows", table.name));
            }
        }
    }
    Ok(found)
}

/// Whether `a` and `b` name the same store (one SQLite file, one Postgres
/// database on one server).
pub fn same_store(a: &StoreLocation, b: &StoreLocation) -> bool {
    match (a, b) {
        (StoreLocation::Sqlite(a), StoreLocation::Sqlite(b)) => {
            canonical_file(a) == canonical_file(b)
        }
        (StoreLocation::Postgres(a), StoreLocation::Postgres(b)) => {
            use sqlx::postgres::PgConnectOptions;
            match (a.parse::<PgConnectOptions>(), b.parse::<PgConnectOptions>()) {
                (Ok(a), Ok(b)) => {
                    let id = |o: &PgConnectOptions| {
                        (
                            o.get_host().to_owned(),
                            o.get_port(),
                            o.get_database().unwrap_or(o.get_username()).to_owned(),
                        )
                    };
                    id(&a) == id(&b)
                }
                _ => a == b,
            }
        }
        _ => false,
    }
}

/// How messages name a store: its URL, without a Postgres password.
pub fn display_name(location: &StoreLocation) -> String {
    match location {
        StoreLocation::Sqlite(path) => format!("sqlite://{}", path.display()),
        StoreLocation::Postgres(url) => match url.parse::<sqlx::postgres::PgConnectOptions>() {
            Ok(o) => format!(
                "postgres://{}@{}:{}/{}",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or(o.get_username())
            ),
            Err(_) => "the Postgres database".into(),
        },
    }
}

/// The file's path with its directory resolved (the file may not exist yet).
fn canonical_file(path: &std::path::Path) -> std::path::PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}

/// Refuses a source whose applied migrations are not exactly this binary's.
pub(crate) fn check_source_schema(
    store: &str,
    applied: &[i64],
    migrator: &sqlx::migrate::Migrator,
) -> Result<()> {
    let known: Vec<i64> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    if applied.iter().any(|v| !known.contains(v)) {
        return Err(Error::FailedPrecondition(format!(
            "the source {store} was migrated by a newer fleetcare: copy it with that version"
        )));
    }
    if known.iter().any(|v| !applied.contains(v)) {
        return Err(Error::FailedPrecondition(format!(
            "the source {store} is not at this version's schema: run `fleetcare migrate \
             --database-url {store}` first (copy never writes its source)"
        )));
    }
    Ok(())
}

/// A database error while copying, with what was being done.
pub(crate) fn copy_error(context: impl fmt::Display) -> impl FnOnce(sqlx::Error) -> Error {
    move |err| {
        use sqlx::Error as E;
        match &err {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
                Error::Unavailable(format!("{context}: {err}"))
            }
            _ => Error::Internal(format!("{context}: {err}")),
        }
    }
}

/// An error opening `store`, saying which store it was about.
pub(crate) fn about(store: &str, err: Error) -> Error {
    match err {
        Error::Unavailable(m) => Error::Unavailable(format!("{store}: {m}")),
        Error::Internal(m) => Error::Internal(format!("{store}: {m}")),
        other => other,
    }
}

/// Rows per INSERT statement for a table of `columns` columns under a bind
/// limit of `max_binds` (and at most `page` rows).
pub(crate) fn rows_per_statement(max_binds: usize, columns: usize, page: usize) -> usize {
    (max_binds / columns.max(1)).clamp(1, page.max(1))
}

/// How a backend writes bind parameter `i` (from 1) of a statement.
pub(crate) type Param = fn(&mut String, usize);

/// `(p1, p2, ...)`: parameters `from..from + n`.
fn params(sql: &mut String, from: usize, n: usize, param: Param) {
    sql.push('(');
    for i in from..from + n {
        if i > from {
            sql.push_str(", ");
        }
        param(sql, i);
    }
    sql.push(')');
}

/// The read of `table` from `bound` on, in key order (`list`: the backend's
/// select list), and the key values to bind.
pub(crate) fn select_sql<'b>(
    table: &TableSpec,
    list: &str,
    bound: Bound<'b>,
    limit: Option<usize>,
    param: Param,
) -> (String, &'b [Value]) {
    let keys = table.key.join(", ");
    let mut sql = format!("SELECT {list} FROM {}", table.name);
    let (op, key) = match bound {
        Bound::Start => ("", &[][..]),
        Bound::After(key) => (">", key),
        Bound::Equal(key) => ("=", key),
    };
    if !op.is_empty() {
        sql.push_str(&format!(" WHERE ({keys}) {op} "));
        params(&mut sql, 1, table.key.len(), param);
    }
    sql.push_str(&format!(" ORDER BY {keys}"));
    if let Some(n) = limit {
        sql.push_str(&format!(" LIMIT {n}"));
    }
    (sql, key)
}

/// The insert of `rows` rows into `table`, every column bound.
pub(crate) fn insert_sql(table: &TableSpec, rows: usize, param: Param) -> String {
    let width = table.columns.len();
    let columns: Vec<&str> = table.column_names().collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ",
        table.name,
        columns.join(", ")
    );
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        params(&mut sql, r * width + 1, width, param);
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_a_column_and_every_row_kind_checks() {
        for table in TABLES {
            assert!(!table.key.is_empty(), "{}", table.name);
            let _ = table.key_indices();
            if let Some(serial) = table.serial {
                assert!(table.column_names().any(|c| c == serial));
            }
            let nulls = vec![Value::Null; table.columns.len()];
            table.check(&nulls).unwrap();
            assert!(table.check(&nulls[1..]).is_err());
        }
        let agents = table("agents").unwrap();
        let mut row = vec![Value::Null; agents.columns.len()];
        row[0] = Value::Int(1);
        assert!(agents.check(&row).is_err());
    }

    #[test]
    fn parents_come_before_children() {
        let at = |name| TABLES.iter().position(|t| t.name == name).unwrap();
        assert!(at("error_events") < at("recovery_actions"));
    }

    #[test]
    fn statements_stay_under_the_bind_limits() {
        for table in TABLES {
            for (limit, page) in [(32_766, PAGE_SIZE), (65_535, PAGE_SIZE), (65_535, 3)] {
                let rows = rows_per_statement(limit, table.columns.len(), page);
                assert!(rows >= 1 && rows <= page);
                assert!(rows * table.columns.len() <= limit);
            }
        }
    }

    #[test]
    fn the_same_store_is_recognised() {
        let pg = |u: &str| StoreLocation::Postgres(u.into());
        assert!(same_store(
            &pg("postgres://postgres@127.0.0.1:5432/a"),
            &pg("postgresql://postgres@127.0.0.1/a?sslmode=disable"),
        ));
        assert!(!same_store(
            &pg("postgres://postgres@127.0.0.1:5432/a"),
            &pg("postgres://postgres@127.0.0.1:5432/b"),
        ));
        let dir = std::env::temp_dir();
        let a = StoreLocation::Sqlite(dir.join("fleetcare-copy-same.db"));
        let b = StoreLocation::Sqlite(dir.join(".").join("fleetcare-copy-same.db"));
        assert!(same_store(&a, &b));
        assert!(!same_store(
            &a,
            &StoreLocation::Sqlite(dir.join("fleetcare-copy-other.db"))
        ));
        assert!(!same_store(&a, &pg("postgres://127.0.0.1/a")));
    }
}
