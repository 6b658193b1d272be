//! Usage rollups in Postgres: the queries of [`UsageTx`] (the flow is
//! `storage::usage_rollups`'s) and the report's query.
//!
//! Lock order, the same in every transaction: message keys sorted (the new
//! ones by the insert, the existing ones by `FOR UPDATE`), then cells sorted
//! (by the upsert). A deadlock or serialization failure left over is reported
//! as `Error::Conflict` and the pipeline retries the file. Lists go as arrays
//! (`UNNEST`, `ANY`): one statement each, whatever their length.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;

use super::super::db_error;
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::UsageEntry;
use crate::domain::usage::{self, CellDelta, MessageCopy, Tokens};
use crate::error::Result;
use crate::storage::usage_rollups::{
    self as flows, CopyRow, ReportRow, StoredDay, StoredModels, UsageTx,
};
use crate::storage::{UsageQuery, UsageRow};

/// A nullable `date`.
impl StoredDay for Option<NaiveDate> {
    fn day(self) -> Result<Option<NaiveDate>> {
        Ok(self)
    }
}

/// `text[]`.
impl StoredModels for Vec<String> {
    fn models(self) -> Result<Vec<String>> {
        Ok(self)
    }
}

/// `$q.bind(&$c.a).bind(&$c.b)...`: a [`CopyColumns`]' arrays, in the order named.
macro_rules! bind_columns {
    ($q:expr, $c:ident: $($column:ident),+) => { $q$(.bind(&$c.$column))+ };
}

/// Column arrays of a list of copies, for `UNNEST` (the text borrowed).
struct CopyColumns<'a> {
    key: Vec<&'a str>,
    path: Vec<&'a str>,
    line_no: Vec<i32>,
    sidechain: Vec<bool>,
    user: Vec<&'a str>,
    session: Vec<&'a str>,
    model: Vec<&'a str>,
    occurred_at: Vec<DateTime<Utc>>,
    day: Vec<NaiveDate>,
    input: Vec<i64>,
    output: Vec<i64>,
    creation: Vec<i64>,
    read: Vec<i64>,
}

impl<'a> CopyColumns<'a> {
    /// One pass per column: each array allocated once, at its length.
    fn of(copies: impl ExactSizeIterator<Item = &'a MessageCopy> + Clone) -> Self {
        let m = || copies.clone();
        CopyColumns {
            key: m().map(|m| m.key.as_str()).collect(),
            path: m().map(|m| m.path.as_str()).collect(),
            line_no: m().map(|m| m.line_no).collect(),
            sidechain: m().map(|m| m.sidechain).collect(),
            user: m().map(|m| m.user.as_str()).collect(),
            session: m().map(|m| m.session.as_str()).collect(),
            model: m().map(|m| m.model.as_str()).collect(),
            occurred_at: m().map(|m| m.occurred_at).collect(),
            day: m().map(|m| m.occurred_at.date_naive()).collect(),
            input: m().map(|m| m.tokens.input).collect(),
            output: m().map(|m| m.tokens.output).collect(),
            creation: m().map(|m| m.tokens.cache_creation).collect(),
            read: m().map(|m| m.tokens.cache_read).collect(),
        }
    }
}

/// The stored copies `sql` reads for `keys` (its `$1`).
async fn load_copies(
    conn: &mut PgConnection,
    sql: &str,
    keys: &[String],
) -> Result<Vec<MessageCopy>> {
    let rows: Vec<CopyRow<DateTime<Utc>>> = sqlx::query_as(sql)
        .bind(keys)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
    Ok(rows.into_iter().map(MessageCopy::from).collect())
}

/// Replaces the entries of every file in `files` (distinct paths) and brings
/// the messages and cells up to date, inside the caller's transaction.
pub(crate) async fn replace_usage(
    conn: &mut PgConnection,
    files: &[(&SessionFile, &[UsageEntry])],
) -> Result<()> {
    flows::replace_usage(conn, files).await
}

#[async_trait]
impl UsageTx for PgConnection {
    /// One statement: the old entries out (their keys back), the new ones
    /// in, and the messages nobody had yet written with the batch's best
    /// copy as the winner.
    async fn replace_entries(
        &mut self,
        paths: &[&str],
        copies: &[MessageCopy],
        best: &[&MessageCopy],
    ) -> Result<(Vec<String>, HashSet<String>)> {
        let c = CopyColumns::of(copies.iter());
        let w = CopyColumns::of(best.iter().copied());
        let q = sqlx::query_as(
            "WITH old AS (DELETE FROM usage_entries WHERE path = ANY($1) RETURNING dedup_key),
                  entries AS (
                      INSERT INTO usage_entries
                          (path, user_name, session_id, sidechain, line_no, model,
                           occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                           cache_read_tokens, dedup_key)
                      SELECT u.p, u.u, u.s, u.f, u.line_no, NULLIF(u.model, ''), u.occurred_at,
                             u.i, u.o, u.c, u.r, u.k
                      FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
                                  $7::timestamptz[], $8::bigint[], $9::bigint[], $10::bigint[],
                                  $11::bigint[], $12::text[], $13::bool[])
                           AS u(p, u, s, line_no, model, occurred_at, i, o, c, r, k, f)),
                  won AS (
                      INSERT INTO usage_messages
                          (dedup_key, path, line_no, sidechain, user_name, session_id, model,
                           occurred_at, day, input_tokens, output_tokens, cache_creation_tokens,
                           cache_read_tokens)
                      SELECT * FROM UNNEST($14::text[], $15::text[], $16::int[],
                          $17::bool[], $18::text[], $19::text[], $20::text[],
                          $21::timestamptz[], $22::date[], $23::bigint[], $24::bigint[],
                          $25::bigint[], $26::bigint[])
                      ON CONFLICT (dedup_key) DO NOTHING
                      RETURNING dedup_key)
             -- Back: the old entries' keys, and the batch's messages that were
             -- already written (usually few: not every new winner's key).
             SELECT false, dedup_key FROM old
             UNION ALL
             SELECT true, k FROM UNNEST($14::text[]) AS b(k)
             WHERE k NOT IN (SELECT dedup_key FROM won)",
        )
        .bind(paths);
        let q = bind_columns!(q, c: path, user, session, line_no, model, occurred_at, input,
            output, creation, read, key, sidechain);
        let keys: Vec<(bool, String)> = bind_columns!(q, w: key, path, line_no, sidechain,
            user, session, model, occurred_at, day, input, output, creation, read)
        .fetch_all(&mut *self)
        .await
        .map_err(db_error)?;
        let mut old_keys = Vec::new();
        let mut existing = HashSet::new();
        for (best, key) in keys {
            if best {
                existing.insert(key);
            } else {
                old_keys.push(key);
            }
        }
        Ok((old_keys, existing))
    }

    async fn lock_messages(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>> {
        let sql = "SELECT dedup_key, path, line_no, sidechain, user_name, session_id, model,
                          occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                          cache_read_tokens
                   FROM usage_messages WHERE dedup_key = ANY($1)
                   ORDER BY dedup_key FOR UPDATE";
        load_copies(self, sql, keys).await
    }

    async fn entries(&mut self, keys: &[String]) -> Result<Vec<MessageCopy>> {
        // A fresh statement after the locks: sees every copy committed before them.
        let sql = "SELECT dedup_key, path, line_no, sidechain, user_name, session_id,
                          COALESCE(model, '') AS model, occurred_at, input_tokens, output_tokens,
                          cache_creation_tokens, cache_read_tokens
                   FROM usage_entries WHERE dedup_key = ANY($1)";
        load_copies(self, sql, keys).await
    }

    async fn write_messages(&mut self, copies: &[&MessageCopy]) -> Result<()> {
        let c = CopyColumns::of(copies.iter().copied());
        let q = sqlx::query(
            "INSERT INTO usage_messages
                 (dedup_key, path, line_no, sidechain, user_name, session_id, model,
                  occurred_at, day, input_tokens, output_tokens, cache_creation_tokens,
                  cache_read_tokens)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bool[],
                 $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::date[],
                 $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[])
             ON CONFLICT (dedup_key) DO UPDATE SET path = EXCLUDED.path, line_no = EXCLUDED.line_no,
                 sidechain = EXCLUDED.sidechain, user_name = EXCLUDED.user_name,
                 session_id = EXCLUDED.session_id, model = EXCLUDED.model,
                 occurred_at = EXCLUDED.occurred_at, day = EXCLUDED.day,
                 input_tokens = EXCLUDED.input_tokens, output_tokens = EXCLUDED.output_tokens,
                 cache_creation_tokens = EXCLUDED.cache_creation_tokens,
                 cache_read_tokens = EXCLUDED.cache_read_tokens",
        );
        bind_columns!(q, c: key, path, line_no, sidechain, user, session, model, occurred_at,
            day, input, output, creation, read)
        .execute(&mut *self)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn delete_messages(&mut self, keys: &[&str]) -> Result<()> {
        sqlx::query("DELETE FROM usage_messages WHERE dedup_key = ANY($1)")
            .bind(keys)
            .execute(&mut *self)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// In the plan's order: a fixed lock order.
    async fn apply_cells(&mut self, cells: &[CellDelta]) -> Result<()> {
        let day: Vec<NaiveDate> = cells.iter().map(|d| d.cell.day).collect();
        let user: Vec<&str> = cells.iter().map(|d| d.cell.user.as_str()).collect();
        let session: Vec<&str> = cells.iter().map(|d| d.cell.session.as_str()).collect();
        let model: Vec<&str> = cells.iter().map(|d| d.cell.model.as_str()).collect();
        let tokens = |f: fn(&Tokens) -> i64| cells.iter().map(|d| f(&d.tokens)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO usage_cells AS c
                 (day, user_name, session_id, model, input_tokens, output_tokens,
                  cache_creation_tokens, cache_read_tokens, messages, first_at, last_at)
             -- A delta that only removes has no first or last: neutral values
             -- (NOT NULL is checked before the conflict is).
             SELECT d, u, s, m, i, o, cc, cr, n, COALESCE(f, 'infinity'), COALESCE(l, '-infinity')
             FROM UNNEST($1::date[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                 $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::timestamptz[],
                 $11::timestamptz[]) AS x(d, u, s, m, i, o, cc, cr, n, f, l)
             ON CONFLICT (day, user_name, session_id, model) DO UPDATE SET
                 input_tokens = c.input_tokens + EXCLUDED.input_tokens,
                 output_tokens = c.output_tokens + EXCLUDED.output_tokens,
                 cache_creation_tokens = c.cache_creation_tokens + EXCLUDED.cache_creation_tokens,
                 cache_read_tokens = c.cache_read_tokens + EXCLUDED.cache_read_tokens,
                 messages = c.messages + EXCLUDED.messages,
                 first_at = LEAST(c.first_at, EXCLUDED.first_at),
                 last_at = GREATEST(c.last_at, EXCLUDED.last_at)",
        )
        .bind(&day)
        .bind(&user)
        .bind(&session)
        .bind(&model)
        .bind(tokens(|t| t.input))
        .bind(tokens(|t| t.output))
        .bind(tokens(|t| t.cache_creation))
        .bind(tokens(|t| t.cache_read))
        .bind(cells.iter().map(|d| d.messages).collect::<Vec<_>>())
        .bind(cells.iter().map(|d| d.first_at).collect::<Vec<_>>())
        .bind(cells.iter().map(|d| d.last_at).collect::<Vec<_>>())
        .execute(&mut *self)
        .await
        .map_err(db_error)?;

        let shrunk: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].removed).collect();
        if shrunk.is_empty() {
            return Ok(());
        }
        let pick = |v: &[&str]| shrunk.iter().map(|&i| v[i].to_owned()).collect::<Vec<_>>();
        let days: Vec<NaiveDate> = shrunk.iter().map(|&i| day[i]).collect();
        let (users, sessions, models) = (pick(&user), pick(&session), pick(&model));
        // The cells are locked by now: this statement sees every message
        // committed by the transactions that updated them before.
        for statement in [
            "DELETE FROM usage_cells c
             USING UNNEST($1::date[], $2::text[], $3::text[], $4::text[])
                   AS k(day, user_name, session_id, model)
             WHERE (c.day, c.user_name, c.session_id, c.model)
                   = (k.day, k.user_name, k.session_id, k.model)
               AND c.messages <= 0",
            "UPDATE usage_cells c SET first_at = m.first_at, last_at = m.last_at
             FROM (SELECT m.day, m.user_name, m.session_id, m.model,
                          min(m.occurred_at) AS first_at, max(m.occurred_at) AS last_at
                   FROM usage_messages m
                   JOIN UNNEST($1::date[], $2::text[], $3::text[], $4::text[])
                        AS k(day, user_name, session_id, model)
                     USING (user_name, session_id, day, model)
                   GROUP BY 1, 2, 3, 4) m
             WHERE (c.day, c.user_name, c.session_id, c.model)
                   = (m.day, m.user_name, m.session_id, m.model)",
        ] {
            sqlx::query(statement)
                .bind(&days)
                .bind(&users)
                .bind(&sessions)
                .bind(&models)
                .execute(&mut *self)
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }
}

/// A usage report: the cells of the whole UTC days in range, and when a bound
/// cuts through a day, that day's messages in range, found through its cells
/// (`domain::usage::split_range`).
pub(crate) async fn usage_report(
    pool: &crate::storage::pool::TimedPool<sqlx::Postgres>,
    query: &UsageQuery,
) -> Result<Vec<UsageRow>> {
    let group = flows::group_columns(query.group_by, "NULL::date");
    let split = usage::split_range(query.since, query.until);
    let whole_days = "SELECT day, user_name, session_id, model, input_tokens, output_tokens,
                             cache_creation_tokens, cache_read_tokens, messages, first_at, last_at
                      FROM usage_cells
                      WHERE ($1::date IS NULL OR day >= $1)
                        AND ($2::date IS NULL OR day < $2)
                        AND ($3::text IS NULL OR user_name = $3)";
    let source = if split.partial_days.is_empty() {
        whole_days.to_owned()
    } else {
        format!(
            "{whole_days}
             UNION ALL
             SELECT m.day, m.user_name, m.session_id, m.model, m.input_tokens, m.output_tokens,
                    m.cache_creation_tokens, m.cache_read_tokens, 1, m.occurred_at, m.occurred_at
             FROM usage_cells c
             JOIN usage_messages m USING (user_name, session_id, day, model)
             WHERE c.day = ANY($4::date[])
               AND ($3::text IS NULL OR c.user_name = $3)
               AND ($5::timestamptz IS NULL OR m.occurred_at >= $5)
               AND ($6::timestamptz IS NULL OR m.occurred_at < $6)"
        )
    };
    let sql = format!(
        "SELECT {group},
                sum(input_tokens)::bigint AS input_tokens,
                sum(output_tokens)::bigint AS output_tokens,
                sum(cache_creation_tokens)::bigint AS cache_creation_tokens,
                sum(cache_read_tokens)::bigint AS cache_read_tokens,
                sum(messages)::bigint AS messages, min(first_at) AS first_at,
                max(last_at) AS last_at, array_agg(DISTINCT model ORDER BY model) AS models
         FROM ({source}) AS parts
         GROUP BY 1, 2, 3, 4"
    );
    let mut report = sqlx::query_as(&sql)
        .bind(split.whole_from)
        .bind(split.whole_to)
        .bind(query.user.as_deref());
    if !split.partial_days.is_empty() {
        report = report
            .bind(&split.partial_days)
            .bind(query.since)
            .bind(query.until);
    }
    let rows: Vec<ReportRow<DateTime<Utc>, Option<NaiveDate>, Vec<String>>> =
        report.fetch_all(pool).await.map_err(db_error)?;
    flows::keyed_report(query.group_by, rows)
}
