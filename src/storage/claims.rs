//! Claims in SQL, written once for every backend: a label selector as a
//! `WHERE` condition, and the rows a batch with claims is decided on
//! ([`claim_rows`]). Each backend runs the statements ([`ClaimReads`]); the
//! rules stay the domain's: the condition only narrows what is read, and
//! `dispatch::choose` checks every candidate again with
//! `LabelSelector::matches`.

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::domain::agent::AgentStatus;
use crate::domain::batch::{self, ClaimRows, Command};
use crate::domain::dispatch::{
    ClaimRequest, IdempotencyKey, LabelSelector, NoAgentAvailable, Operator,
};
use crate::domain::transition::{Agent, Claim};
use crate::error::Result;

/// How a backend spells parameters and reads a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `$n`; `labels` is `jsonb`.
    Postgres,
    /// `?n`; `labels` is JSON text.
    Sqlite,
}

impl Dialect {
    fn param(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        }
    }

    /// What is bound to name a label key (label keys are letters, digits
    /// and `. _ / -`, so a quoted JSON path member needs no escaping).
    fn key(self, key: &str) -> String {
        match self {
            Dialect::Postgres => key.to_owned(),
            Dialect::Sqlite => format!("$.\"{key}\""),
        }
    }

    /// The label's value (NULL when the agent lacks it), `key` a parameter.
    fn value(self, key: &str) -> String {
        match self {
            Dialect::Postgres => format!("(labels ->> {key})"),
            Dialect::Sqlite => format!("json_extract(labels, {key})"),
        }
    }

    /// Whether the agent carries the label, `key` a parameter.
    fn has(self, key: &str) -> String {
        match self {
            Dialect::Postgres => format!("(labels ? {key})"),
            Dialect::Sqlite => format!("(json_type(labels, {key}) IS NOT NULL)"),
        }
    }
}

/// A selector as a condition on `agents`, with its parameters (text, bound
/// in order from the first number it was built with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SelectorSql {
    pub condition: String,
    pub binds: Vec<String>,
}

impl SelectorSql {
    /// The number of the parameter after this condition's.
    pub fn next_param(&self, first: usize) -> usize {
        first + self.binds.len()
    }
}

/// `selector` as a condition (Kubernetes semantics, as
/// `LabelSelector::matches`), its parameters numbered from `first`.
pub(crate) fn selector_sql(
    selector: &LabelSelector,
    dialect: Dialect,
    first: usize,
) -> SelectorSql {
    let mut binds = Vec::new();
    let mut bind = |value: String| {
        binds.push(value);
        dialect.param(first + binds.len() - 1)
    };
    let mut terms = Vec::new();
    for (key, value) in &selector.match_labels {
        let k = bind(dialect.key(key));
        let v = bind(value.clone());
        terms.push(format!("{} = {v}", dialect.value(&k)));
    }
    for r in &selector.match_expressions {
        let k = bind(dialect.key(&r.key));
        let mut list = || {
            r.values
                .iter()
                .map(|v| bind(v.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        terms.push(match r.operator {
            Operator::In => format!("{} IN ({})", dialect.value(&k), list()),
            Operator::NotIn => format!(
                "({value} IS NULL OR {value} NOT IN ({}))",
                list(),
                value = dialect.value(&k)
            ),
            Operator::Exists => dialect.has(&k),
            Operator::DoesNotExist => format!("NOT {}", dialect.has(&k)),
        });
    }
    let condition = if terms.is_empty() {
        "TRUE".to_owned()
    } else {
        terms.join(" AND ")
    };
    SelectorSql { condition, binds }
}

/// The condition a claimable agent meets besides its selector: IDLE and
/// schedulable, spelled as the partial index `agents_claimable_idx` is (a
/// literal, so that a generic plan can use the index).
pub(crate) fn claimable_condition() -> String {
    format!(
        "status = '{}' AND cordon_reason IS NULL",
        AgentStatus::Idle.as_str()
    )
}

/// The read of [`ClaimReads::claimable`]: `columns` of the claimable agents
/// the selector matches, idle longest first, at most the parameter after the
/// selector's; on Postgres held to commit, skipping rows others hold.
pub(crate) fn claimable_sql(columns: &str, selector: &SelectorSql, dialect: Dialect) -> String {
    let lock = match dialect {
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        Dialect::Sqlite => "",
    };
    format!(
        "SELECT {columns} FROM agents WHERE {} AND {} \
         ORDER BY last_transition_at, agent_id LIMIT {}{lock}",
        claimable_condition(),
        selector.condition,
        dialect.param(selector.next_param(1)),
    )
}

/// The count behind `NO_AGENT_AVAILABLE`: [`MatchingRow`]s of the agents the
/// selector matches.
pub(crate) fn matching_sql(selector: &SelectorSql) -> String {
    format!(
        "SELECT status, cordon_reason IS NOT NULL, count(*), min(recovery_at) FROM agents \
         WHERE {} GROUP BY 1, 2",
        selector.condition
    )
}

/// Per matching agent's status and cordon, how many and the earliest
/// recovery time: one row of the count behind `NO_AGENT_AVAILABLE`.
pub(crate) type MatchingRow = (String, bool, i64, Option<chrono::DateTime<chrono::Utc>>);

/// The counted refusal from [`MatchingRow`]s (status as stored).
pub(crate) fn no_agent_available(rows: Vec<MatchingRow>) -> Result<NoAgentAvailable> {
    let rows = rows
        .into_iter()
        .map(|(status, cordoned, n, earliest)| {
            Ok((
                crate::storage::decode::status(&status)?,
                cordoned,
                n as usize,
                earliest,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NoAgentAvailable::from_counts(rows))
}

/// The reads of a batch with claims, in its open transaction.
#[async_trait]
pub(crate) trait ClaimReads: Send {
    /// Claimable agents ([`claimable_condition`]) that `selector` matches,
    /// idle longest first, at most `limit`, held to commit (Postgres skips
    /// the rows other transactions hold: those are being claimed or changed).
    async fn claimable(&mut self, selector: &SelectorSql, limit: i64) -> Result<Vec<Agent>>;

    /// The claims recorded under `keys`, each with its agent as stored
    /// (read, not held: the answer shows it, nothing is decided on it).
    async fn claims_made(&mut self, keys: &[IdempotencyKey])
    -> Result<Vec<(Claim, Option<Agent>)>>;
}

/// Which claimable agents a batch's claims read ([`claim_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Candidates {
    /// Per selector, from the table.
    Selected,
    /// None: the batch's rows already hold the candidates the server
    /// offered from memory, read by key in its transaction.
    Offered,
}

/// What a batch's claims are decided on ([`batch::plan_with`]): the claims
/// made before under its idempotency keys, and (with
/// [`Candidates::Selected`]) for the claims without one, per selector, as
/// many claimable agents as claims of the batch up to its last claim with
/// that selector (each earlier claim, whatever its selector, may take one of
/// them).
pub(crate) async fn claim_rows(
    reads: &mut dyn ClaimReads,
    commands: &[Command],
    dialect: Dialect,
    candidates: Candidates,
) -> Result<ClaimRows> {
    let claims: Vec<_> = batch::claim_requests(commands).collect();
    if claims.is_empty() {
        return Ok(ClaimRows::default());
    }
    let keys: Vec<IdempotencyKey> = claims
        .iter()
        .filter_map(|(request, holder)| request.idempotency_key(holder))
        .collect();
    let made = if keys.is_empty() {
        Vec::new()
    } else {
        reads.claims_made(&keys).await?
    };
    let replayed = |request: &ClaimRequest, holder: &str| {
        request.idempotency_key(holder).is_some_and(|k| {
            made.iter()
                .any(|(c, _)| c.holder == k.holder && c.request_id == k.request_id)
        })
    };
    if candidates == Candidates::Offered {
        return Ok(ClaimRows {
            candidates: Vec::new(),
            made,
        });
    }
    let limits = batch::claim_limits(commands, replayed);
    let mut candidates = BTreeMap::new();
    for (selector, limit) in limits {
        let sql = selector_sql(selector, dialect, 1);
        for agent in reads.claimable(&sql, limit as i64).await? {
            candidates.entry(agent.agent_id.clone()).or_insert(agent);
        }
    }
    Ok(ClaimRows {
        candidates: candidates.into_values().collect(),
        made,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dispatch::Requirement;

    fn selector() -> LabelSelector {
        LabelSelector {
            match_labels: [("team".to_owned(), "a".to_owned())].into(),
            match_expressions: vec![
                Requirement {
                    key: "zone".into(),
                    operator: Operator::In,
                    values: vec!["x".into(), "y".into()],
                },
                Requirement {
                    key: "gpu".into(),
                    operator: Operator::NotIn,
                    values: vec!["none".into()],
                },
                Requirement {
                    key: "spot".into(),
                    operator: Operator::DoesNotExist,
                    values: vec![],
                },
            ],
        }
    }

    #[test]
    fn a_selector_becomes_one_condition_with_numbered_parameters() {
        let pg = selector_sql(&selector(), Dialect::Postgres, 3);
        assert_eq!(
            pg.condition,
            "(labels ->> $3) = $4 AND (labels ->> $5) IN ($6, $7) AND \
             ((labels ->> $8) IS NULL OR (labels ->> $8) NOT IN ($9)) AND NOT (labels ? $10)"
        );
        assert_eq!(
            pg.binds,
            ["team", "a", "zone", "x", "y", "gpu", "none", "spot"]
        );
        assert_eq!(pg.next_param(3), 11);
        let lite = selector_sql(&selector(), Dialect::Sqlite, 1);
        assert!(
            lite.condition.starts_with(
                "json_extract(labels, ?1) = ?2 AND json_extract(labels, ?3) IN (?4, ?5)"
            ),
            "{}",
            lite.condition
        );
        assert_eq!(lite.binds[0], "$.\"team\"");
        assert_eq!(
            selector_sql(&LabelSelector::default(), Dialect::Sqlite, 1).condition,
            "TRUE"
        );
    }
}
