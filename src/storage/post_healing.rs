//! Post action records, for every backend: each operation of
//! [`PostHealingStore`](super::PostHealingStore) written once, as a sequence
//! (lock, read, let `domain::post_healing` decide, write, commit) over
//! [`PostTx`], one transaction of a backend. `sqlite/post_healing.rs` and
//! `postgres/post_healing.rs` implement [`PostTx`] with their own SQL and
//! begin the transaction; they decide nothing.
//!
//! A claim is serialised per post: [`PostTx::lock_post`] queues claims on the
//! post's lock row (on SQLite the single writer already serialises them), so
//! of many concurrent evaluators exactly one sees the history without the
//! claim.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use crate::domain::healing_records::StoredAction;
use crate::domain::post_healing::{self, ActionRecord, ActionStatus, ActionType};
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::{ActionOutcomeUpdate, PostEvaluator, PostVerdict, Writer};

/// The columns of `post_actions` every query returns, in [`ActionRow`]'s terms.
pub(crate) const COLUMNS: &str = "idempotency_key, post_id, action_type, tier, status, outcome, \
     error_code, attempts, created_at, updated_at, lease_expires_at, actor, outcome_actor";

/// A stored action record, read by a backend into these types (Postgres
/// reads it as is; SQLite converts its microseconds and TEXT outcome).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ActionRow {
    pub idempotency_key: String,
    pub post_id: String,
    pub action_type: String,
    pub tier: i32,
    pub status: String,
    pub outcome: Option<serde_json::Value>,
    pub error_code: Option<String>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub actor: String,
    pub outcome_actor: String,
}

impl ActionRow {
    /// The record as stored, and its last reported outcome.
    fn stored(self) -> Result<(ActionRecord, Option<serde_json::Value>)> {
        let record = ActionRecord {
            action: ActionType::parse(&self.action_type)
                .ok_or_else(|| decode::corrupt("action type", &self.action_type))?,
            status: ActionStatus::parse(&self.status)
                .ok_or_else(|| decode::corrupt("action status", &self.status))?,
            tier: decode::tier(self.tier)?,
            idempotency_key: self.idempotency_key,
            post_id: self.post_id,
            attempts: self.attempts,
            error_code: self.error_code,
            created_at: self.created_at,
            updated_at: self.updated_at,
            lease_expires_at: self.lease_expires_at,
        };
        Ok((record, self.outcome))
    }

    /// The record as a reader at `now` sees it (the domain decides what an
    /// expired claim is).
    fn at(mut self, now: DateTime<Utc>) -> Result<StoredAction> {
        let actor = std::mem::take(&mut self.actor);
        let outcome_actor = std::mem::take(&mut self.outcome_actor);
        let (record, outcome) = self.stored()?;
        Ok(StoredAction {
            record: post_healing::as_of(record, now),
            outcome,
            actor,
            outcome_actor,
        })
    }
}

/// One transaction (or, for a backend's plain reads, one connection) on the
/// post action records: only queries. Dropped without [`PostTx::commit`], it
/// rolls back.
#[async_trait]
pub(crate) trait PostTx: Send + Sized {
    /// Queues this transaction behind any other claim on `post_id` until it ends.
    async fn lock_post(&mut self, post_id: &str) -> Result<()>;

    /// The store's clock, read once per call.
    async fn now(&mut self) -> Result<DateTime<Utc>>;

    /// A post's records, oldest first (`created_at`, then key); locked until
    /// the transaction ends when `lock`.
    async fn history(&mut self, post_id: &str, lock: bool) -> Result<Vec<ActionRow>>;

    /// The record with `key`; locked until the transaction ends when `lock`.
    async fn fetch(&mut self, key: &str, lock: bool) -> Result<Option<ActionRow>>;

    /// Inserts `record` (by `actor`) unless its key exists (then `None`).
    async fn insert(&mut self, record: &ActionRecord, actor: &str) -> Result<Option<ActionRow>>;

    /// Writes `record` over the stored one with the same key; a writer's
    /// name replaces its column (`actor` for a claim, `outcome_actor` for a
    /// report), the other is kept.
    async fn update(
        &mut self,
        record: &ActionRecord,
        outcome: Option<&serde_json::Value>,
        by: Writer<'_>,
    ) -> Result<ActionRow>;

    /// Up to `limit` of a post's records, newest first (`created_at`, then
    /// key, descending), after the `before` cursor.
    async fn page(
        &mut self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<ActionRow>>;

    async fn commit(self) -> Result<()>;
}

/// [`PostHealingStore::evaluate_post`](super::PostHealingStore::evaluate_post)
/// in `tx`: a write transaction when `claim_lease` is set.
pub(crate) async fn evaluate_post<T: PostTx>(
    mut tx: T,
    post_id: &str,
    now: Option<DateTime<Utc>>,
    claim_lease: Option<Duration>,
    actor: &str,
    evaluate: PostEvaluator<'_>,
) -> Result<PostVerdict> {
    if claim_lease.is_some() {
        tx.lock_post(post_id).await?;
    }
    let now = match now {
        Some(now) => now,
        None => tx.now().await?,
    };
    // A claim writes over one of these records: lock them until it commits.
    let stored = tx
        .history(post_id, claim_lease.is_some())
        .await?
        .into_iter()
        .map(|row| row.at(now))
        .collect::<Result<Vec<_>>>()?;
    let history: Vec<ActionRecord> = stored.iter().map(|s| s.record.clone()).collect();
    let evaluation = evaluate(now, &history);
    let (Some(lease), true) = (claim_lease, evaluation.eligible) else {
        // Nothing to write (a claim's lock row is only for queueing): roll back.
        return Ok(PostVerdict {
            evaluation,
            claimed: None,
        });
    };
    let (Some(key), Some(stagnation)) = (&evaluation.idempotency_key, &evaluation.stagnation)
    else {
        return Err(Error::Internal("eligible evaluation without a plan".into()));
    };
    // A key may exist as a failed (or expired) earlier attempt: claiming it again
    // re-runs it, as the domain's record says.
    let existing = stored.iter().find(|s| &s.record.idempotency_key == key);
    let claimed = post_healing::claim(
        existing.map(|s| &s.record),
        key,
        post_id,
        stagnation,
        now,
        lease,
    );
    let row = match existing {
        Some(existing) => {
            tx.update(&claimed, existing.outcome.as_ref(), Writer::Claim(actor))
                .await?
        }
        None => tx.insert(&claimed, actor).await?.ok_or_else(|| {
            Error::Conflict(format!(
                "post action {key} was recorded meanwhile by another call"
            ))
        })?,
    };
    tx.commit().await?;
    Ok(PostVerdict {
        evaluation,
        claimed: Some(row.at(now)?),
    })
}

/// [`PostHealingStore::record_action_outcome`](super::PostHealingStore::record_action_outcome)
/// in the write transaction `tx`.
pub(crate) async fn record_action_outcome<T: PostTx>(
    mut tx: T,
    update: ActionOutcomeUpdate,
) -> Result<(StoredAction, bool)> {
    let now = tx.now().await?;
    let key = &update.idempotency_key;
    let mut existing = tx.fetch(key, true).await?;
    let created = existing.is_none();
    if created {
        let Some((post_id, action, tier)) = &update.new_record else {
            return Err(Error::NotFound {
                kind: "post action",
                id: key.clone(),
            });
        };
        // The window a new key may name is judged at the store's time.
        let base = post_healing::reported_as(
            key,
            post_id,
            *action,
            *tier,
            update.status,
            now,
            update.key_window,
        )
        .map_err(|mismatch| Error::invalid(mismatch.to_string()))?;
        // A concurrent creator may win (on Postgres; SQLite's single writer
        // has none): the update below then applies on top of its record.
        existing = match tx.insert(&base, &update.actor).await? {
            Some(row) => Some(row),
            None => tx.fetch(key, true).await?,
        };
    }
    let (stored, outcome) = existing
        .ok_or_else(|| Error::Conflict(format!("post action {key} was removed meanwhile")))?
        .stored()?;
    let updated = post_healing::apply_outcome(stored, update.status, update.error_code, now);
    // An outcome is kept until a report brings a new one.
    let outcome = update.outcome.or(outcome);
    let row = tx
        .update(&updated, outcome.as_ref(), Writer::Report(&update.actor))
        .await?;
    tx.commit().await?;
    Ok((row.at(now)?, created))
}

/// [`PostHealingStore::get_action`](super::PostHealingStore::get_action) in `tx`.
pub(crate) async fn get_action<T: PostTx>(
    mut tx: T,
    idempotency_key: &str,
) -> Result<(StoredAction, DateTime<Utc>)> {
    let now = tx.now().await?;
    let row = tx
        .fetch(idempotency_key, false)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "post action",
            id: idempotency_key.to_owned(),
        })?;
    tx.commit().await?;
    Ok((row.at(now)?, now))
}

/// [`PostHealingStore::list_actions`](super::PostHealingStore::list_actions) in `tx`.
pub(crate) async fn list_actions<T: PostTx>(
    mut tx: T,
    post_id: &str,
    before: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<StoredAction>> {
    let now = tx.now().await?;
    let rows = tx.page(post_id, before, limit).await?;
    tx.commit().await?;
    rows.into_iter().map(|row| row.at(now)).collect()
}
