//! Usage rollups in SQLite: the queries of [`UsageTx`] (the flow is
//! `storage::usage_rollups`'s) and the report's query.
//!
//! There is one writer and the caller's transaction holds the write lock
//! from its start, so what it reads stays true until it commits: no row
//! locks, no conflicts. Times are microseconds, days `YYYY-MM-DD` text; every
//! list is written in statements of at most [`CHUNK_ROWS`] rows or
//! [`CHUNK_KEYS`] keys, under SQLite's bind limit.

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::super::{day_text, micros, parse_day, sqlite_error};
use super::CHUNK_ROWS;
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::UsageEntry;
use crate::domain::usage::{self, CellDelta, MessageCopy};
use crate::error::{Error, Result};
use crate::storage::usage_rollups::{
    self as flows, CopyRow, ReportRow, StoredDay, StoredModels, UsageTx,
};
use crate::storage::{UsageQuery, UsageRow};

/// Keys (or paths) per `IN (...)` list.
const CHUNK_KEYS: usize = 500;

/// `YYYY-MM-DD`, '' for none.
impl StoredDay for String {
    fn day(self) -> Result<Option<chrono::NaiveDate>> {
        (!self.is_empty()).then(|| parse_day(&self)).transpose()
    }
}

/// A JSON array in TEXT.
impl StoredModels for String {
    fn models(self) -> Result<Vec<String>> {
        serde_json::from_str(&self)
            .map_err(|e| Error::Internal(format!("usage models {self:?} unreadable: {e}")))
    }
}

/// A stored copy's columns (`usage_entries.model` is NULL for no model).
const COPY_COLUMNS: &str = "dedup_key, path, line_no, sidechain, user_name, session_id, \
     COALESCE(model, '') AS model, occurred_at, input_tokens, output_tokens, \
     cache_creation_tokens, cache_read_tokens";

/// `{head} IN (?, ...){tail}` over one chunk of values, and whether it stays
/// prepared (only full chunks repeat their text).
fn in_list<'a>(
    head: &str,
    chunk: impl ExactSizeIterator<Item = &'a str>,
    tail: &str,
) -> (QueryBuilder<'a, Sqlite>, bool) {
    let cached = chunk.len() == CHUNK_KEYS;
    let mut q = QueryBuilder::new(head);
    q.push(" IN (");
    let mut list = q.separated(", ");
    for value in chunk {
        list.push_bind(value);
    }
    q.push(")").push(tail);
    (q, cached)
}

/// The text column `{head} IN (values){tail}` returns (nothing for a
/// statement without result), in statements of [`CHUNK_KEYS`] values.
async fn strings_in(
    conn: &mut SqliteConnection,
    head: &str,
    values: &[&str],
    tail: &str,
) -> Result<Vec<String>> {
    let mut returned = Vec::new();
    for chunk in values.chunks(CHUNK_KEYS) {
        let (mut q, cached) = in_list(head, chunk.iter().copied(), tail);
        let rows: Vec<String> = q
            .build_query_scalar()
            .persistent(cached)
            .fetch_all(&mut *conn)
            .await
            .map_err(sqlite_error)?;
        returned.extend(rows);
    }
    Ok(returned)
}

/// Every stored copy (`table`: `usage_messages` for the winners,
/// `usage_entries` for every file's) of the given keys.
async fn load_copies(
    conn: &mut SqliteConnection,
    table: &str,
    keys: &[String],
) -> Result<Vec<MessageCopy>> {
    let head = format!("SELECT {COPY_COLUMNS} FROM {table} WHERE dedup_key");
    let mut copies = Vec::new();
    for chunk in keys.chunks(CHUNK_KEYS) {
        let (mut q, cached) = in_list(&head, chunk.iter().map(String::as_str), "");
        let rows: Vec<CopyRow<i64>> = q
            .build_query_as()
            .persistent(cached)
            .fetch_all(&mut *conn)
            .await
            .map_err(sqlite_error)?;
        copies.extend(rows.into_iter().map(MessageCopy::from));
    }
    Ok(copies)
}

/// Writes winners: new messages (`replace` false: the caller checked that
/// none is stored, and holds the write lock), or new winners of stored ones.
async fn write_messages(
    conn: &mut SqliteConnection,
    copies: &[&MessageCopy],
    replace: bool,
) -> Result<()> {
    for chunk in copies.chunks(CHUNK_ROWS) {
        // Only full chunks repeat their text: only they stay prepared.
        let cached = chunk.len() == CHUNK_ROWS;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_messages
                 (dedup_key, path, line_no, sidechain, user_name, session_id, model,
                  occurred_at, day, input_tokens, output_tokens, cache_creation_tokens,
                  cache_read_tokens) ",
        );
        q.push_values(chunk, |mut b, c| {
            b.push_bind(c.key.as_str())
                .push_bind(c.path.as_str())
                .push_bind(c.line_no)
                .push_bind(c.sidechain)
                .push_bind(c.user.as_str())
                .push_bind(c.session.as_str())
                .push_bind(c.model.as_str())
                .push_bind(micros(c.occurred_at))
                .push_bind(day_text(c.day()))
                .push_bind(c.tokens.input)
                .push_bind(c.tokens.output)
                .push_bind(c.tokens.cache_creation)
                .push_bind(c.tokens.cache_read);
        });
        if replace {
            q.push(
                " ON CONFLICT (dedup_key) DO UPDATE SET path = excluded.path,
                     line_no = excluded.line_no, sidechain = excluded.sidechain,
                     user_name = excluded.user_name, session_id = excluded.session_id,
                     model = excluded.model, occurred_at = excluded.occurred_at,
                     day = excluded.day, input_tokens = excluded.input_tokens,
                     output_tokens = excluded.output_tokens,
                     cache_creation_tokens = excluded.cache_creation_tokens,
                     cache_read_tokens = excluded.cache_read_tokens",
            );
        }
        q.build()
            .persistent(cached)
            .execute(&mut *conn)
            .await
            .map_err(sqlite_error)?;
    }
    Ok(())
}

/// Inserts every file's copies into `usage_entries`.
async fn insert_entries(conn: &mut SqliteConnection, copies: &[MessageCopy]) -> Result<()> {
    for chunk in copies.chunks(CHUNK_ROWS) {
        // Only full chunks repeat their text: only they stay prepared.
        let cached = chunk.len() == CHUNK_ROWS;
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_entries
                 (path, user_name, session_id, sidechain, line_no, model,
                  occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                  cache_read_tokens, dedup_key) ",
        );
        q.push_values(chunk, |mut b, c| {
            b.push_bind(c.path.as_str())
                .push_bind(c.user.as_str())
                .push_bind(c.session.as_str())
                .push_bind(c.sidechain)
                .push_bind(c.line_no)
                // As Postgres stores it: NULL for no model.
                .push_bind((!c.model.is_empty()).then_some(c.model.as_str()))
                .push_bind(micros(c.occurred_at))
                .push_bind(c.tokens.input)
                .push_bind(c.tokens.output)
                .push_bind(c.tokens.cache_creation)
                .push_bind(c.tokens.cache_read)
                .push_bind(c.key.as_str());
        });
        q.build()
            .persistent(cached)
            .execute(&mut *conn)
            .await
            .map_err(sqlite_error)?;
    }
    Ok(())
}

/// Replaces the entries of every file in `files` (distinct paths) and brings
/// the messages and cells up to date, inside the caller's transaction.
pub(crate) async fn replace_usage(
    conn: &mut SqliteConnection,
    files: &[(&SessionFile, &[UsageEntry])],
) -> Result<()> {
    flows::replace_usage(conn, files).await
}

#[async_trait]
impl UsageTx for SqliteConnection {
    async fn replace_entries(
        &mut self,
        paths: &[&str],
        copies: &[MessageCopy],
        best: &[&MessageCopy],
    ) -> Result<(Vec<String>, HashSet<String>)> {
        let old_keys = strings_in(
            self,
            "DELETE FROM usage_entries WHERE path",
            paths,
            " RETURNING dedup_key",
        )
        .await?;
        insert_entries(self, copies).await?;
        // Only the messages no file had yet are written now (they win: no
        // other copy exists). The lookup returns the few that exist, where
        // writing with RETURNING would hand back every new key.
        let best_keys: Vec<&str> = best.iter().map(|c| c.key.as_str()).collect();
        let stored = "SELECT dedup_key FROM usage_messages WHERE dedup_key";
        let existing: HashSet<String> = strings_in(self, stored, &best_keys, "")
            .await?
            .into_iter()
            .collect();
        let fresh: Vec<&MessageCopy> = best
            .iter()
            .copied()
            .filter(|c| !existing.contains(&c.key))
            .collect();
        write_messages(self, &fresh, false).await?;
        Ok((old_keys, existing))
    }

    async fn lock_messages(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>> {
        load_copies(self, "usage_messages", keys).await
    }

    async fn entries(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>> {
        load_copies(self, "usage_entries", keys).await
    }

    async fn write_messages(&mut self, copies: &[&MessageCopy]) -> Result<()> {
        write_messages(self, copies, true).await
    }

    async fn delete_messages(&mut self, keys: &[&str]) -> Result<()> {
        strings_in(self, "DELETE FROM usage_messages WHERE dedup_key", keys, "").await?;
        Ok(())
    }

    async fn apply_cells(&mut self, cells: &[CellDelta]) -> Result<()> {
        for chunk in cells.chunks(CHUNK_ROWS) {
            // Only full chunks repeat their text: only they stay prepared.
            let cached = chunk.len() == CHUNK_ROWS;
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO usage_cells
                     (day, user_name, session_id, model, input_tokens, output_tokens,
                      cache_creation_tokens, cache_read_tokens, messages, first_at, last_at) ",
            );
            q.push_values(chunk, |mut b, d| {
                b.push_bind(day_text(d.cell.day))
                    .push_bind(d.cell.user.as_str())
                    .push_bind(d.cell.session.as_str())
                    .push_bind(d.cell.model.as_str())
                    .push_bind(d.tokens.input)
                    .push_bind(d.tokens.output)
                    .push_bind(d.tokens.cache_creation)
                    .push_bind(d.tokens.cache_read)
                    .push_bind(d.messages)
                    // A delta that only removes has no first or last: neutral values.
                    .push_bind(d.first_at.map_or(i64::MAX, micros))
                    .push_bind(d.last_at.map_or(i64::MIN, micros));
            });
            q.push(
                " ON CONFLICT (day, user_name, session_id, model) DO UPDATE SET
                     input_tokens = input_tokens + excluded.input_tokens,
                     output_tokens = output_tokens + excluded.output_tokens,
                     cache_creation_tokens = cache_creation_tokens + excluded.cache_creation_tokens,
                     cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
                     messages = messages + excluded.messages,
                     first_at = min(first_at, excluded.first_at),
                     last_at = max(last_at, excluded.last_at)",
            );
            q.build()
                .persistent(cached)
                .execute(&mut *self)
                .await
                .map_err(sqlite_error)?;
        }
        for d in cells.iter().filter(|d| d.removed) {
            let day = day_text(d.cell.day);
            for statement in [
                "DELETE FROM usage_cells
                 WHERE day = ?1 AND user_name = ?2 AND session_id = ?3 AND model = ?4
                   AND messages <= 0",
                "UPDATE usage_cells SET (first_at, last_at) = (
                     SELECT COALESCE(min(m.occurred_at), usage_cells.first_at),
                            COALESCE(max(m.occurred_at), usage_cells.last_at)
                     FROM usage_messages m
                     WHERE m.user_name = ?2 AND m.session_id = ?3 AND m.day = ?1 AND m.model = ?4)
                 WHERE day = ?1 AND user_name = ?2 AND session_id = ?3 AND model = ?4",
            ] {
                sqlx::query(statement)
                    .bind(&day)
                    .bind(&d.cell.user)
                    .bind(&d.cell.session)
                    .bind(&d.cell.model)
                    .execute(&mut *self)
                    .await
                    .map_err(sqlite_error)?;
            }
        }
        Ok(())
    }
}

/// A usage report: the cells of the whole UTC days in range, and when a bound
/// cuts through a day, that day's messages in range, found through its cells
/// (`domain::usage::split_range`).
pub(crate) async fn usage_report(
    pool: &crate::storage::pool::TimedPool<Sqlite>,
    query: &UsageQuery,
) -> Result<Vec<UsageRow>> {
    let group = flows::group_columns(query.group_by, "''");
    let split = usage::split_range(query.since, query.until);
    let whole_days = "SELECT day, user_name, session_id, model, input_tokens, output_tokens,
                             cache_creation_tokens, cache_read_tokens, messages, first_at, last_at
                      FROM usage_cells
                      WHERE (?1 IS NULL OR day >= ?1)
                        AND (?2 IS NULL OR day < ?2)
                        AND (?3 IS NULL OR user_name = ?3)";
    let source = if split.partial_days.is_empty() {
        whole_days.to_owned()
    } else {
        format!(
            "{whole_days}
             UNION ALL
             SELECT m.day, m.user_name, m.session_id, m.model, m.input_tokens, m.output_tokens,
                    m.cache_creation_tokens, m.cache_read_tokens, 1, m.occurred_at, m.occurred_at
             FROM usage_cells c
             JOIN usage_messages m
               ON m.user_name = c.user_name AND m.session_id = c.session_id
              AND m.day = c.day AND m.model = c.model
             WHERE c.day IN (?4, ?5)
               AND (?3 IS NULL OR c.user_name = ?3)
               AND (?6 IS NULL OR m.occurred_at >= ?6)
               AND (?7 IS NULL OR m.occurred_at < ?7)"
        )
    };
    let sql = format!(
        "SELECT {group},
                sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                sum(cache_creation_tokens) AS cache_creation_tokens,
                sum(cache_read_tokens) AS cache_read_tokens,
                sum(messages) AS messages, min(first_at) AS first_at,
                max(last_at) AS last_at, json_group_array(DISTINCT model) AS models
         FROM ({source})
         GROUP BY 1, 2, 3, 4"
    );
    let mut report = sqlx::query_as(&sql)
        .bind(split.whole_from.map(day_text))
        .bind(split.whole_to.map(day_text))
        .bind(query.user.as_deref());
    if !split.partial_days.is_empty() {
        let day = |i: usize| split.partial_days.get(i).copied().map(day_text);
        report = report
            .bind(day(0))
            .bind(day(1))
            .bind(query.since.map(micros))
            .bind(query.until.map(micros));
    }
    let rows: Vec<ReportRow<i64, String, String>> =
        report.fetch_all(pool).await.map_err(sqlite_error)?;
    flows::keyed_report(query.group_by, rows)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, Duration, TimeZone, Utc};
    use proptest::prelude::*;

    use super::super::testing::TempStore;
    use crate::domain::pipeline::{self, SessionFile};
    use crate::domain::transcript::UsageEntry;
    use crate::domain::usage::{self, MessageCopy, UsageGrouping, UsageQuery};
    use crate::storage::{PipelineStore, SessionOutput, SessionWrite};

    const FILES: [&str; 5] = [
        "u0/a.jsonl",
        "u0/b.jsonl",
        "u1/c.jsonl",
        "u1/d.jsonl",
        "u0/e.jsonl",
    ];

    /// One entry: a shared message key (or none), its day, minute and tokens.
    type Line = (Option<u8>, u8, u8, u8);

    fn entries(lines: &[Line]) -> Vec<UsageEntry> {
        lines
            .iter()
            .enumerate()
            .map(|(i, &(message, day, minute, tokens))| UsageEntry {
                line_no: i as u32 + 1,
                timestamp: Utc
                    .with_ymd_and_hms(2026, 3, 14 + u32::from(day), 6 * u32::from(day) + 1, 0, 0)
                    .unwrap()
                    + Duration::minutes(i64::from(minute))
                    + Duration::nanoseconds(i64::from(tokens) * 1_001),
                // No message id: a line that counts alone.
                message_id: message.map(|k| format!("msg_{k}")),
                // Now and then a sidechain's replay: it loses to any other copy.
                sidechain: tokens % 4 == 0,
                model: ["claude-sonnet-4", "claude-opus-4", ""][usize::from(tokens % 3)]
                    .to_owned()
                    .into(),
                input_tokens: u64::from(tokens),
                output_tokens: u64::from(tokens) * 2,
                cache_creation_tokens: u64::from(tokens) * 3,
                cache_read_tokens: u64::from(tokens) * 5,
            })
            .map(|mut e| {
                if e.model.as_deref() == Some("") {
                    e.model = None;
                }
                e
            })
            .collect()
    }

    fn session_file(path: &str) -> SessionFile {
        let (user, name) = path.split_once('/').unwrap();
        SessionFile {
            user: user.into(),
            session: name.trim_end_matches(".jsonl").into(),
            path: path.into(),
            size: 1,
            mtime_ns: 1,
        }
    }

    fn usage_write(path: &str, entries: Vec<UsageEntry>, now: DateTime<Utc>) -> SessionWrite {
        let file = session_file(path);
        let state = pipeline::processed("usage", &file, "sha", 1, entries.len() as i64, now);
        SessionWrite {
            file,
            output: SessionOutput {
                usage: Some(entries),
                transcript_errors: None,
            },
            state,
        }
    }

    /// Every report equals the recount of what each file last held, at the
    /// store's precision.
    async fn check(
        store: &dyn PipelineStore,
        last: &BTreeMap<String, Vec<UsageEntry>>,
        step: usize,
    ) {
        let copies: Vec<MessageCopy> = last
            .iter()
            .flat_map(|(path, entries)| {
                let f = session_file(path);
                MessageCopy::from_file(&f.path, &f.user, &f.session, entries)
            })
            .map(crate::storage::usage_rollups::at_store_precision)
            .collect();
        let day = |d: u32| Utc.with_ymd_and_hms(2026, 3, d, 0, 0, 0).unwrap();
        for group_by in [
            UsageGrouping::Day,
            UsageGrouping::Session,
            UsageGrouping::Model,
            UsageGrouping::User,
        ] {
            for (since, until) in [
                (None, None),
                (Some(day(15)), Some(day(16))),
                (None, Some(day(15))),
                (Some(day(14) + Duration::hours(12)), None),
                (None, Some(day(15) + Duration::minutes(7 * 60 + 30))),
                (
                    Some(day(14) + Duration::minutes(80)),
                    Some(day(14) + Duration::minutes(100)),
                ),
                (
                    Some(day(14) + Duration::minutes(90)),
                    Some(day(16) + Duration::minutes(13 * 60 + 30)),
                ),
            ] {
                for user in [None, Some("u1")] {
                    let query = UsageQuery {
                        group_by,
                        since,
                        until,
                        user: user.map(Into::into),
                    };
                    assert_eq!(
                        store.usage(&query).await.unwrap(),
                        usage::recount(&copies, &query),
                        "step {step}, {query:?}"
                    );
                }
            }
        }
    }

    async fn cells_equal_their_messages(store: &super::super::super::SqliteStore) {
        // No empty cell is left, and each cell is the sum of its messages.
        let mismatched: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM usage_cells c
             WHERE c.messages <= 0 OR NOT EXISTS (
                 SELECT 1 FROM (
                     SELECT count(*) AS n, sum(input_tokens) AS i, min(occurred_at) AS f,
                            max(occurred_at) AS l
                     FROM usage_messages m
                     WHERE m.day = c.day AND m.user_name = c.user_name
                       AND m.session_id = c.session_id AND m.model = c.model) m
                 WHERE m.n = c.messages AND m.i = c.input_tokens AND m.f = c.first_at
                   AND m.l = c.last_at)",
        )
        .fetch_one(store.readers())
        .await
        .unwrap();
        assert_eq!(mismatched, 0);
    }

    fn batch() -> impl Strategy<Value = Vec<(usize, Vec<Line>)>> {
        let line = (
            prop::option::weighted(0.85, 0u8..8),
            0u8..3,
            0u8..60,
            1u8..50,
        );
        prop::collection::vec((0..FILES.len(), prop::collection::vec(line, 0..6)), 1..4)
    }

    async fn scenario(batches: Vec<Vec<(usize, Vec<Line>)>>) {
        let t = TempStore::new().await;
        let now = t.store.now().await.unwrap();
        let mut last: BTreeMap<String, Vec<UsageEntry>> = BTreeMap::new();
        for (step, batch) in batches.into_iter().enumerate() {
            // Distinct files per batch, as the pipeline commits them.
            let batch: BTreeMap<usize, Vec<Line>> = batch.into_iter().collect();
            let writes: Vec<SessionWrite> = batch
                .iter()
                .map(|(f, lines)| usage_write(FILES[*f], entries(lines), now))
                .collect();
            t.store.commit_sessions(&writes).await.unwrap();
            for w in writes {
                last.insert(w.file.path, w.output.usage.unwrap());
            }
            check(&t.store, &last, step).await;
            cells_equal_their_messages(&t.store).await;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn rollups_equal_a_recount_after_rewrites(batches in prop::collection::vec(batch(), 1..8)) {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(scenario(batches));
        }
    }

    #[tokio::test]
    async fn a_file_rewritten_without_its_message_hands_it_to_the_next_copy_and_a_vanished_one_keeps_it()
     {
        let t = TempStore::new().await;
        let now = t.store.now().await.unwrap();
        // b copies a's history verbatim (a resumed session) and adds one
        // message: equal copies, so the earlier path counts.
        let a = entries(&[(Some(1), 0, 0, 10), (Some(2), 0, 5, 20)]);
        let b = entries(&[
            (Some(1), 1, 0, 10),
            (Some(2), 1, 5, 20),
            (Some(3), 1, 9, 30),
        ]);
        t.store
            .commit_sessions(&[usage_write(FILES[0], a, now)])
            .await
            .unwrap();
        t.store
            .commit_sessions(&[usage_write(FILES[1], b.clone(), now)])
            .await
            .unwrap();
        let by_session = UsageQuery {
            group_by: UsageGrouping::Session,
            since: None,
            until: None,
            user: None,
        };
        let rows = t.store.usage(&by_session).await.unwrap();
        let messages: Vec<(&str, i64)> =
            rows.iter().map(|r| (r.key.as_str(), r.messages)).collect();
        assert_eq!(
            messages,
            vec![("u0/a", 2), ("u0/b", 1)],
            "the earlier path wins"
        );
        // a is rewritten empty: b's copies count now.
        t.store
            .commit_sessions(&[usage_write(FILES[0], Vec::new(), now)])
            .await
            .unwrap();
        let rows = t.store.usage(&by_session).await.unwrap();
        let messages: Vec<(&str, i64)> =
            rows.iter().map(|r| (r.key.as_str(), r.messages)).collect();
        assert_eq!(messages, vec![("u0/b", 3)]);
        // A state-only commit (a failed attempt) leaves the entries.
        let mut failed = usage_write(FILES[1], Vec::new(), now);
        failed.output.usage = None;
        t.store.commit_sessions(&[failed]).await.unwrap();
        assert_eq!(t.store.usage(&by_session).await.unwrap(), rows);
        cells_equal_their_messages(&t.store).await;
    }

    #[tokio::test]
    async fn batches_larger_than_one_statement_equal_a_recount() {
        let t = TempStore::new().await;
        let now = t.store.now().await.unwrap();
        let mut last: BTreeMap<String, Vec<UsageEntry>> = BTreeMap::new();
        // 60 files of 40 entries: more rows and keys than one statement takes
        // (CHUNK_ROWS, CHUNK_KEYS), half the messages shared between files.
        for round in 0..3u32 {
            let writes: Vec<SessionWrite> = (0..60u32)
                .map(|f| {
                    let lines: Vec<Line> = (0..40u32)
                        .map(|i| {
                            let shared = (i + f + round) % 2 == 0;
                            let key = if shared {
                                (i * 7 + round) % 200
                            } else {
                                1000 + f * 40 + i
                            };
                            (
                                Some((key % 250) as u8).filter(|_| shared),
                                ((i + round) % 3) as u8,
                                ((f + i * 3 + round) % 60) as u8,
                                (1 + (i + f) % 49) as u8,
                            )
                        })
                        .collect();
                    let path = format!("u{}/f{f:02}.jsonl", f % 3);
                    usage_write(&path, entries(&lines), now)
                })
                .collect();
            t.store.commit_sessions(&writes).await.unwrap();
            for w in writes {
                last.insert(w.file.path, w.output.usage.unwrap());
            }
            check(&t.store, &last, round as usize).await;
            cells_equal_their_messages(&t.store).await;
        }
    }

    /// A first run's worth of sessions, committed as the pipeline batches
    /// them. `cargo test --lib first_run_speed -- --ignored --nocapture`
    #[tokio::test]
    #[ignore]
    async fn first_run_speed() {
        let sessions: usize = std::env::var("SESSIONS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10_000);
        let t = TempStore::new().await;
        let now = t.store.now().await.unwrap();
        let base = Utc.with_ymd_and_hms(2026, 3, 14, 10, 0, 0).unwrap();
        let writes: Vec<SessionWrite> = (0..sessions)
            .map(|s| {
                let path = format!("user{:03}/session-{s:05}.jsonl", s % 20);
                // One in six resumes the previous session: its history copied.
                let from = if s % 6 == 5 { s - 1 } else { s };
                let entries: Vec<UsageEntry> = (0..24)
                    .map(|i| {
                        let owner = if i < 12 { from } else { s };
                        UsageEntry {
                            line_no: i + 1,
                            timestamp: base + Duration::seconds(i64::from(i) + s as i64),
                            message_id: Some(format!("msg_{owner}_{i}")),
                            sidechain: false,
                            model: Some("claude-sonnet-4-20250514".into()),
                            input_tokens: 3,
                            output_tokens: 100,
                            cache_creation_tokens: 1000,
                            cache_read_tokens: 20000,
                        }
                    })
                    .collect();
                usage_write(&path, entries, now)
            })
            .collect();
        let started = std::time::Instant::now();
        for chunk in writes.chunks(256) {
            t.store.commit_sessions(chunk).await.unwrap();
        }
        let took = started.elapsed();
        let by_day = UsageQuery {
            group_by: UsageGrouping::Day,
            since: None,
            until: None,
            user: None,
        };
        let started = std::time::Instant::now();
        let rows = t.store.usage(&by_day).await.unwrap();
        println!(
            "{sessions} sessions ({} entries) committed in {took:.2?}; usage by day in {:.2?}, {} messages",
            sessions * 24,
            started.elapsed(),
            rows.iter().map(|r| r.messages).sum::<i64>()
        );
    }
}
