//! Usage rollups in Postgres: replacing one file's usage entries and
//! maintaining the distinct messages and the cells in the same transaction;
//! reports read from the cells.
//!
//! Which copy of a message counts is decided by `domain::usage::plan`; this
//! code only loads, locks (in a fixed order) and writes. Lock order, the same
//! in every transaction: message keys sorted (the new ones by the insert, the
//! existing ones by `FOR UPDATE`), then cells sorted (by the upsert). A
//! deadlock or serialization failure left over is reported as
//! `Error::Conflict` and the pipeline retries the file.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{FromRow, PgConnection};

use super::super::db_error;
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::UsageEntry;
use crate::domain::usage::{self, CellDelta, MessageCopy, Tokens, UsageGrouping};
use crate::error::Result;
use crate::storage::{UsageQuery, UsageRow};

#[derive(FromRow)]
struct CopyRow {
    dedup_key: String,
    path: String,
    line_no: i32,
    sidechain: bool,
    user_name: String,
    session_id: String,
    model: String,
    occurred_at: DateTime<Utc>,
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_tokens: i64,
    cache_read_tokens: i64,
}

impl From<CopyRow> for MessageCopy {
    fn from(r: CopyRow) -> MessageCopy {
        MessageCopy {
            key: r.dedup_key,
            path: r.path,
            line_no: r.line_no,
            sidechain: r.sidechain,
            user: r.user_name,
            session: r.session_id,
            model: r.model,
            occurred_at: r.occurred_at,
            tokens: Tokens {
                input: r.input_tokens,
                output: r.output_tokens,
                cache_creation: r.cache_creation_tokens,
                cache_read: r.cache_read_tokens,
            },
        }
    }
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
    fn of(copies: impl ExactSizeIterator<Item = &'a MessageCopy>) -> Self {
        let n = copies.len();
        let mut c = CopyColumns {
            key: Vec::with_capacity(n),
            path: Vec::with_capacity(n),
            line_no: Vec::with_capacity(n),
            sidechain: Vec::with_capacity(n),
            user: Vec::with_capacity(n),
            session: Vec::with_capacity(n),
            model: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            day: Vec::with_capacity(n),
            input: Vec::with_capacity(n),
            output: Vec::with_capacity(n),
            creation: Vec::with_capacity(n),
            read: Vec::with_capacity(n),
        };
        for m in copies {
            c.key.push(&m.key);
            c.path.push(&m.path);
            c.line_no.push(m.line_no);
            c.sidechain.push(m.sidechain);
            c.user.push(&m.user);
            c.session.push(&m.session);
            c.model.push(&m.model);
            c.occurred_at.push(m.occurred_at);
            c.day.push(m.occurred_at.date_naive());
            c.input.push(m.tokens.input);
            c.output.push(m.tokens.output);
            c.creation.push(m.tokens.cache_creation);
            c.read.push(m.tokens.cache_read);
        }
        c
    }
}

/// Writes new winners of existing (or concurrently removed) messages.
async fn write_messages(conn: &mut PgConnection, copies: &[&MessageCopy]) -> Result<()> {
    if copies.is_empty() {
        return Ok(());
    }
    let c = CopyColumns::of(copies.iter().copied());
    sqlx::query(
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
    )
    .bind(&c.key)
    .bind(&c.path)
    .bind(&c.line_no)
    .bind(&c.sidechain)
    .bind(&c.user)
    .bind(&c.session)
    .bind(&c.model)
    .bind(&c.occurred_at)
    .bind(&c.day)
    .bind(&c.input)
    .bind(&c.output)
    .bind(&c.creation)
    .bind(&c.read)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Replaces the entries of every file in `files` (distinct paths) and brings
/// the messages and cells up to date, inside the caller's transaction: a
/// batch of files costs the same few statements as one.
pub(crate) async fn replace_usage(
    conn: &mut PgConnection,
    files: &[(&SessionFile, &[UsageEntry])],
) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    // Every file's copies (its best one per key).
    let mut copies: Vec<MessageCopy> = Vec::new();
    for (file, entries) in files {
        copies.extend(MessageCopy::from_file(
            &file.path,
            &file.user,
            &file.session,
            entries,
        ));
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

    // One statement: the files' old entries out (their keys back), the new
    // ones in, and the messages nobody had yet written with the batch's best
    // copy as the winner.
    let c = CopyColumns::of(copies.iter());
    let w = CopyColumns::of(best.iter().copied());
    let keys: Vec<(bool, String)> = sqlx::query_as(
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
    .bind(&paths)
    .bind(&c.path)
    .bind(&c.user)
    .bind(&c.session)
    .bind(&c.line_no)
    .bind(&c.model)
    .bind(&c.occurred_at)
    .bind(&c.input)
    .bind(&c.output)
    .bind(&c.creation)
    .bind(&c.read)
    .bind(&c.key)
    .bind(&c.sidechain)
    .bind(&w.key)
    .bind(&w.path)
    .bind(&w.line_no)
    .bind(&w.sidechain)
    .bind(&w.user)
    .bind(&w.session)
    .bind(&w.model)
    .bind(&w.occurred_at)
    .bind(&w.day)
    .bind(&w.input)
    .bind(&w.output)
    .bind(&w.creation)
    .bind(&w.read)
    .fetch_all(&mut *conn)
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
    let (mut current, mut stored): (Vec<MessageCopy>, Vec<MessageCopy>) = (Vec::new(), Vec::new());
    if !contested.is_empty() {
        let rows: Vec<CopyRow> = sqlx::query_as(
            "SELECT dedup_key, path, line_no, sidechain, user_name, session_id, model,
                    occurred_at, input_tokens, output_tokens, cache_creation_tokens,
                    cache_read_tokens
             FROM usage_messages WHERE dedup_key = ANY($1)
             ORDER BY dedup_key FOR UPDATE",
        )
        .bind(&contested)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
        current = rows.into_iter().map(MessageCopy::from).collect();
        // A fresh statement after the locks: sees every copy committed before them.
        let rows: Vec<CopyRow> = sqlx::query_as(
            "SELECT dedup_key, path, line_no, sidechain, user_name, session_id,
                    COALESCE(model, '') AS model, occurred_at, input_tokens, output_tokens,
                    cache_creation_tokens, cache_read_tokens
             FROM usage_entries WHERE dedup_key = ANY($1)",
        )
        .bind(&contested)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
        stored = rows.into_iter().map(MessageCopy::from).collect();
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
    write_messages(conn, &changed).await?;
    if !plan.deletes.is_empty() {
        sqlx::query("DELETE FROM usage_messages WHERE dedup_key = ANY($1)")
            .bind(&plan.deletes)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    apply_cells(conn, &plan.cells).await
}

/// Adds the deltas to their cells (in the plan's order: a fixed lock order),
/// recomputes first and last of cells that lost a message, drops empty cells.
async fn apply_cells(conn: &mut PgConnection, cells: &[CellDelta]) -> Result<()> {
    if cells.is_empty() {
        return Ok(());
    }
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
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;

    let shrunk: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].removed).collect();
    if shrunk.is_empty() {
        return Ok(());
    }
    let pick = |v: &[&str]| shrunk.iter().map(|&i| v[i].to_owned()).collect::<Vec<_>>();
    let days: Vec<NaiveDate> = shrunk.iter().map(|&i| day[i]).collect();
    let (users, sessions, models) = (pick(&user), pick(&session), pick(&model));
    // The cells are locked by now: this statement sees every message committed
    // by the transactions that updated them before.
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
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

type ReportRow = (
    Option<NaiveDate>,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    Vec<String>,
);

/// A usage report: the cells of the whole UTC days in range, and when a bound
/// cuts through a day, that day's messages in range, found through its cells
/// (`domain::usage::split_range`).
pub(crate) async fn usage_report(
    pool: &crate::storage::pool::TimedPool<sqlx::Postgres>,
    query: &UsageQuery,
) -> Result<Vec<UsageRow>> {
    // The columns the grouping reads; the report's key is the domain's.
    let group = match query.group_by {
        UsageGrouping::Day => "day, '', '', ''",
        UsageGrouping::Session => "NULL::date, user_name, session_id, ''",
        UsageGrouping::Model => "NULL::date, '', '', model",
        UsageGrouping::User => "NULL::date, user_name, '', ''",
    };
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
                sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                sum(cache_creation_tokens)::bigint, sum(cache_read_tokens)::bigint,
                sum(messages)::bigint, min(first_at), max(last_at),
                array_agg(DISTINCT model ORDER BY model)
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
    let rows: Vec<ReportRow> = report.fetch_all(pool).await.map_err(db_error)?;
    let groups = rows
        .into_iter()
        .map(
            |(
                day,
                user,
                session,
                model,
                input,
                output,
                creation,
                read,
                messages,
                first_at,
                last_at,
                models,
            )| {
                let group = usage::Group {
                    day,
                    user,
                    session,
                    model,
                };
                let row = UsageRow {
                    key: String::new(),
                    input_tokens: input,
                    output_tokens: output,
                    cache_creation_tokens: creation,
                    cache_read_tokens: read,
                    messages,
                    first_at,
                    last_at,
                    models,
                };
                (group, row)
            },
        )
        .collect();
    Ok(usage::keyed_report(query.group_by, groups))
}
