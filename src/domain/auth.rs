//! Who may call what: the auth file's callers, their roles and scopes, and
//! the one decision [`authorize`]. Pure: no I/O, no tonic (the file is read
//! and watched by `runtime::auth`, the token checked by `grpc::auth`).
//!
//! The auth file (TOML) lists callers by the SHA-256 of their bearer token,
//! never the token itself:
//!
//! ```toml
//! [[caller]]
//! name = "alice"
//! role = "operator"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!
//! [[caller]]
//! name = "runner-eu"
//! role = "agent"
//! token_sha256 = "..."
//! agents = ["eu-*", "special-1"]   # exact ids or prefix* patterns
//! labels = { team = "infra" }      # optional: only agents carrying these
//! ```

use crate::domain::config_file::{line_of, toml_error};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::labels::Labels;

/// What a caller may do, coarsely; agent callers are further limited to their scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An agent runner: registers, heartbeats and reports for the agents of its scope.
    Agent,
    /// Reads, watches, and starts and finishes work on any agent.
    Scheduler,
    /// Reads, watches, statistics, usage.
    Reader,
    /// Everything.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Agent, Role::Scheduler, Role::Reader, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Scheduler => "scheduler",
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One RPC, as authorization sees it. Exhaustive: a new RPC needs a new
/// variant, and [`Action::rule`] makes it choose who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    // fleetcare.v1.AgentStatusService
    RegisterAgent,
    GetAgent,
    ListAgents,
    Heartbeat,
    StartWork,
    FinishWork,
    ReportExhausted,
    MarkOffline,
    WatchTransitions,
    ListTransitions,
    ExplainRecovery,
    // fleetcare.v1.HealingService
    ReportError,
    PlanRecovery,
    ReportRecoveryOutcome,
    GetHealingStatistics,
    ListErrorEvents,
    ListRecoveryActions,
    GetHealingPolicy,
    PauseHealing,
    ResumeHealing,
    ListHealingDecisions,
    // fleetcare.v1.PostHealingService
    EvaluatePost,
    RecordActionOutcome,
    ShouldRetry,
    ListActions,
    // fleetcare.v1.SessionPipelineService
    ListProcessors,
    RunProcessor,
    WatchRun,
    ListSessionStates,
    RetrySession,
    GetUsage,
    ListRuns,
    // fleetcare.v1.DispatchService
    ResumeAgent,
    CordonAgent,
    UncordonAgent,
    ClaimAgent,
    RenewClaim,
    ReleaseClaim,
    ListClaims,
    DeleteAgent,
    // fleetcare.v1.QuotaService
    ListQuotaPools,
    GetQuotaPool,
    ParkPool,
    ReleasePool,
}

/// Who may call an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Operators only.
    Operator,
    /// Readers, schedulers and operators, on anything; agent callers only
    /// when they name agents of their scope (`agent` = true) or not at all.
    Read { agent: bool },
    /// Schedulers and operators on any agent, agent callers on theirs.
    Work,
    /// Operators on any agent, agent callers on theirs (nobody else).
    AgentWrite,
    /// Schedulers and operators on any agent: overrides of what agents
    /// report (not for agent callers or readers).
    Dispatch,
}

impl Action {
    pub const ALL: [Action; 44] = [
        Action::RegisterAgent,
        Action::GetAgent,
        Action::ListAgents,
        Action::Heartbeat,
        Action::StartWork,
        Action::FinishWork,
        Action::ReportExhausted,
        Action::MarkOffline,
        Action::WatchTransitions,
        Action::ListTransitions,
        Action::ExplainRecovery,
        Action::ReportError,
        Action::PlanRecovery,
        Action::ReportRecoveryOutcome,
        Action::GetHealingStatistics,
        Action::ListErrorEvents,
        Action::ListRecoveryActions,
        Action::GetHealingPolicy,
        Action::PauseHealing,
        Action::ResumeHealing,
        Action::ListHealingDecisions,
        Action::EvaluatePost,
        Action::RecordActionOutcome,
        Action::ShouldRetry,
        Action::ListActions,
        Action::ListProcessors,
        Action::RunProcessor,
        Action::WatchRun,
        Action::ListSessionStates,
        Action::RetrySession,
        Action::GetUsage,
        Action::ListRuns,
        Action::ResumeAgent,
        Action::CordonAgent,
        Action::UncordonAgent,
        Action::ClaimAgent,
        Action::RenewClaim,
        Action::ReleaseClaim,
        Action::ListClaims,
        Action::DeleteAgent,
        Action::ListQuotaPools,
        Action::GetQuotaPool,
        Action::ParkPool,
        Action::ReleasePool,
    ];

    /// The RPC's name, as a refusal names it.
    pub fn rpc(self) -> &'static str {
        match self {
            Action::RegisterAgent => "RegisterAgent",
            Action::GetAgent => "GetAgent",
            Action::ListAgents => "ListAgents",
            Action::Heartbeat => "Heartbeat",
            Action::StartWork => "StartWork",
            Action::FinishWork => "FinishWork",
            Action::ReportExhausted => "ReportExhausted",
            Action::MarkOffline => "MarkOffline",
            Action::WatchTransitions => "WatchTransitions",
            Action::ListTransitions => "ListTransitions",
            Action::ExplainRecovery => "ExplainRecovery",
            Action::ReportError => "ReportError",
            Action::PlanRecovery => "PlanRecovery",
            Action::ReportRecoveryOutcome => "ReportRecoveryOutcome",
            Action::GetHealingStatistics => "GetHealingStatistics",
            Action::ListErrorEvents => "ListErrorEvents",
            Action::ListRecoveryActions => "ListRecoveryActions",
            Action::GetHealingPolicy => "GetHealingPolicy",
            Action::PauseHealing => "PauseHealing",
            Action::ResumeHealing => "ResumeHealing",
            Action::ListHealingDecisions => "ListHealingDecisions",
            Action::EvaluatePost => "EvaluatePost",
            Action::RecordActionOutcome => "RecordActionOutcome",
            Action::ShouldRetry => "ShouldRetry",
            Action::ListActions => "ListActions",
            Action::ListProcessors => "ListProcessors",
            Action::RunProcessor => "RunProcessor",
            Action::WatchRun => "WatchRun",
            Action::ListSessionStates => "ListSessionStates",
            Action::RetrySession => "RetrySession",
            Action::GetUsage => "GetUsage",
            Action::ListRuns => "ListRuns",
            Action::ResumeAgent => "ResumeAgent",
            Action::CordonAgent => "CordonAgent",
            Action::UncordonAgent => "UncordonAgent",
            Action::ClaimAgent => "ClaimAgent",
            Action::RenewClaim => "RenewClaim",
            Action::ReleaseClaim => "ReleaseClaim",
            Action::ListClaims => "ListClaims",
            Action::DeleteAgent => "DeleteAgent",
            Action::ListQuotaPools => "ListQuotaPools",
            Action::GetQuotaPool => "GetQuotaPool",
            Action::ParkPool => "ParkPool",
            Action::ReleasePool => "ReleasePool",
        }
    }

    fn rule(self) -> Rule {
        match self {
            Action::RegisterAgent
            | Action::Heartbeat
            | Action::ReportExhausted
            | Action::MarkOffline
            | Action::ReportError
            | Action::PlanRecovery
            | Action::ReportRecoveryOutcome => Rule::AgentWrite,
            Action::StartWork | Action::FinishWork => Rule::Work,
            // Claims are handed to schedulers; renewing or releasing one takes
            // its fencing token, which is the capability (not the holder's name).
            Action::ResumeAgent
            | Action::CordonAgent
            | Action::UncordonAgent
            | Action::ClaimAgent
            | Action::RenewClaim
            | Action::ReleaseClaim
            | Action::DeleteAgent => Rule::Dispatch,
            // Agent callers may read their own agents: the agent itself, its
            // transitions (list or watch), its error events and recoveries,
            // and what a limit report would mean for it.
            Action::GetAgent
            | Action::WatchTransitions
            | Action::ListTransitions
            | Action::ExplainRecovery
            | Action::ListErrorEvents
            | Action::ListRecoveryActions
            | Action::ListHealingDecisions => Rule::Read { agent: true },
            // Fleet-wide reads: not for agent callers.
            Action::ListAgents
            | Action::GetHealingStatistics
            | Action::ShouldRetry
            | Action::ListActions
            | Action::ListProcessors
            | Action::WatchRun
            | Action::ListSessionStates
            | Action::GetUsage
            | Action::ListRuns
            | Action::ListClaims
            | Action::ListQuotaPools
            | Action::GetQuotaPool
            | Action::GetHealingPolicy => Rule::Read { agent: false },
            // Parking or releasing a whole pool steers every member at once:
            // operators only (a scheduler claims agents; it does not decide
            // that a provider's limit was hit or lifted).
            Action::EvaluatePost
            | Action::RecordActionOutcome
            | Action::RunProcessor
            | Action::RetrySession
            | Action::ParkPool
            | Action::ReleasePool
            | Action::PauseHealing
            | Action::ResumeHealing => Rule::Operator,
        }
    }
}

/// An agent id pattern: an exact id, or a prefix followed by `*` (`*` alone: every agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentPattern {
    Exact(String),
    Prefix(String),
}

impl AgentPattern {
    pub fn parse(text: &str) -> Result<AgentPattern, String> {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(format!(
                "agent pattern {text:?}: `*` may only end a pattern (prefix*)"
            ));
        }
        if !prefix && body.is_empty() {
            return Err("agent pattern \"\" is empty".into());
        }
        let valid = body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
        if !valid || body.len() > 128 {
            return Err(format!(
                "agent pattern {text:?}: agent ids are up to 128 characters of [A-Za-z0-9._:-]"
            ));
        }
        Ok(if prefix {
            AgentPattern::Prefix(body.to_owned())
        } else {
            AgentPattern::Exact(body.to_owned())
        })
    }

    pub fn matches(&self, agent_id: &str) -> bool {
        match self {
            AgentPattern::Exact(id) => id == agent_id,
            AgentPattern::Prefix(prefix) => agent_id.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for AgentPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentPattern::Exact(id) => f.write_str(id),
            AgentPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Which agents an agent caller may act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub agents: Vec<AgentPattern>,
    /// Agents must carry every one of these labels (empty: no label condition).
    pub labels: Labels,
}

impl Scope {
    pub fn covers(&self, agent_id: &str) -> bool {
        self.agents.iter().any(|p| p.matches(agent_id))
    }

    /// Whether `labels` (an agent's) carry every label of the scope.
    pub fn labels_allow(&self, labels: &Labels) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Recorded as the `actor` of what it changes.
    pub name: String,
    pub role: Role,
    /// Only for agent callers.
    pub scope: Scope,
}

/// The caller of a server without an auth file (loopback only, or
/// `--insecure-no-auth`): anyone who can connect is this operator.
pub const ANONYMOUS: &str = "anonymous";

/// The actor of the transitions the sweeper makes.
pub const SWEEPER: &str = "sweeper";

/// The actor of error events the session pipeline derives from transcripts.
pub const PIPELINE: &str = "pipeline";

impl Caller {
    pub fn anonymous() -> Caller {
        Caller {
            name: ANONYMOUS.to_owned(),
            role: Role::Operator,
            scope: Scope::default(),
        }
    }

    /// Whether this caller is limited to a scope of agents.
    pub fn is_scoped(&self) -> bool {
        self.role == Role::Agent
    }

    /// Whether this caller must show that agents carry its scope's labels.
    pub fn checks_labels(&self) -> bool {
        self.is_scoped() && !self.scope.labels.is_empty()
    }
}

/// Why a known caller was refused; the message names the caller, the RPC and
/// what was out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{caller} ({role}) may not call {rpc}{detail}")]
pub struct Denied {
    pub caller: String,
    pub role: Role,
    pub rpc: &'static str,
    /// `""`, or `" on agent \"x\""` and the like.
    pub detail: String,
}

fn denied(caller: &Caller, action: Action, detail: String) -> Denied {
    Denied {
        caller: caller.name.clone(),
        role: caller.role,
        rpc: action.rpc(),
        detail,
    }
}

/// Whether `caller` may call `action`, on `agent_id` when the call names one
/// (`None`: a call on no agent in particular, or on every agent). An agent
/// caller's calls must name an agent of its scope; label scopes are checked
/// separately with [`authorize_labels`] (they need the agent's stored labels).
pub fn authorize(caller: &Caller, action: Action, agent_id: Option<&str>) -> Result<(), Denied> {
    let role_ok = match (action.rule(), caller.role) {
        (_, Role::Operator) => true,
        (Rule::Operator, _) => false,
        (Rule::Read { .. }, Role::Reader | Role::Scheduler) => true,
        (Rule::Read { agent }, Role::Agent) => agent,
        (Rule::Work, Role::Scheduler | Role::Agent) => true,
        (Rule::Work, Role::Reader) => false,
        (Rule::AgentWrite, Role::Agent) => true,
        (Rule::AgentWrite, Role::Reader | Role::Scheduler) => false,
        (Rule::Dispatch, Role::Scheduler) => true,
        (Rule::Dispatch, Role::Agent | Role::Reader) => false,
    };
    if !role_ok {
        return Err(denied(caller, action, String::new()));
    }
    if !caller.is_scoped() {
        return Ok(());
    }
    match agent_id {
        Some(id) if caller.scope.covers(id) => Ok(()),
        Some(id) => Err(denied(
            caller,
            action,
            format!(" on agent {id:?}: outside its scope"),
        )),
        // ExplainRecovery without an agent reads nothing of anyone's.
        None if action == Action::ExplainRecovery => Ok(()),
        None => Err(denied(
            caller,
            action,
            " without naming an agent of its scope".to_owned(),
        )),
    }
}

/// For a caller with a label scope: whether an agent with these labels is
/// one it may act on (or, registering, create or relabel).
pub fn authorize_labels(
    caller: &Caller,
    action: Action,
    agent_id: &str,
    labels: &Labels,
) -> Result<(), Denied> {
    if !caller.is_scoped() || caller.scope.labels_allow(labels) {
        return Ok(());
    }
    let wanted = caller
        .scope
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Err(denied(
        caller,
        action,
        format!(" on agent {agent_id:?}: it does not carry the labels {wanted}"),
    ))
}

/// The SHA-256 of a bearer token, as the auth file keeps it.
pub type TokenDigest = [u8; 32];

pub fn token_digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The callers of an auth file, by token digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerTable {
    pub callers: Vec<(TokenDigest, Caller)>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    caller: Vec<toml::Spanned<CallerEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    role: Role,
    token_sha256: String,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Reads an auth file's text. Errors name the line.
pub fn parse_auth_file(text: &str) -> Result<CallerTable, String> {
    let file: AuthFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    let mut callers = Vec::with_capacity(file.caller.len());
    for spanned in file.caller {
        let line = line_of(text, spanned.span().start);
        let entry = spanned.into_inner();
        let at = |what: String| format!("line {line}: caller {:?}: {what}", entry.name);
        if entry.name.trim().is_empty() || entry.name.len() > 128 {
            return Err(format!(
                "line {line}: a caller's name must be 1 to 128 characters"
            ));
        }
        if !names.insert(entry.name.clone()) {
            return Err(at("the name is used twice".into()));
        }
        let digest = hex::decode(entry.token_sha256.trim())
            .ok()
            .and_then(|bytes| TokenDigest::try_from(bytes).ok())
            .ok_or_else(|| {
                at(
                    "token_sha256 must be 64 hexadecimal characters (the SHA-256 of the token)"
                        .into(),
                )
            })?;
        if !digests.insert(digest) {
            return Err(at("token_sha256 is the same as another caller's".into()));
        }
        let agents = entry
            .agents
            .iter()
            .map(|p| AgentPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(at)?;
        match entry.role {
            Role::Agent if agents.is_empty() => {
                return Err(at(
                    "an agent caller needs `agents`, the ids or prefix* patterns it acts for"
                        .into(),
                ));
            }
            Role::Agent => {}
            role if !agents.is_empty() || !entry.labels.is_empty() => {
                return Err(at(format!(
                    "`agents` and `labels` only apply to role agent, not {role}"
                )));
            }
            _ => {}
        }
        callers.push((
            digest,
            Caller {
                name: entry.name,
                role: entry.role,
                scope: Scope {
                    agents,
                    labels: entry.labels,
                },
            },
        ));
    }
    Ok(CallerTable { callers })
}

/// A TOML string literal (basic string, escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The auth file entry for a new caller whose token has `digest`.
pub fn caller_entry(name: &str, role: Role, digest: &TokenDigest, agents: &[String]) -> String {
    let mut entry = format!(
        "[[caller]]\nname = {}\nrole = {}\ntoken_sha256 = {}\n",
        toml_string(name),
        toml_string(role.as_str()),
        toml_string(&hex::encode(digest)),
    );
    if !agents.is_empty() {
        let list = agents
            .iter()
            .map(|a| toml_string(a))
            .collect::<Vec<_>>()
            .join(", ");
        entry.push_str(&format!("agents = [{list}]\n"));
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller {
            name: "c".into(),
            role,
            scope: if role == Role::Agent {
                Scope {
                    agents: vec![
                        AgentPattern::parse("eu-*").unwrap(),
                        AgentPattern::parse("special-1").unwrap(),
                    ],
                    labels: Labels::new(),
                }
            } else {
                Scope::default()
            },
        }
    }

    /// Who may call what, on an agent of the agent caller's scope: the table
    /// docs/operations.md documents.
    fn expected(role: Role, action: Action) -> bool {
        use Action::*;
        let read_own = [
            GetAgent,
            WatchTransitions,
            ListTransitions,
            ExplainRecovery,
            ListErrorEvents,
            ListRecoveryActions,
            ListHealingDecisions,
        ];
        let read_fleet = [
            ListAgents,
            GetHealingStatistics,
            ShouldRetry,
            ListActions,
            ListProcessors,
            WatchRun,
            ListSessionStates,
            GetUsage,
            ListRuns,
            ListClaims,
            ListQuotaPools,
            GetQuotaPool,
            GetHealingPolicy,
        ];
        let agent_writes = [
            RegisterAgent,
            Heartbeat,
            ReportExhausted,
            MarkOffline,
            ReportError,
            PlanRecovery,
            ReportRecoveryOutcome,
        ];
        let work = [StartWork, FinishWork];
        let dispatch = [
            ResumeAgent,
            CordonAgent,
            UncordonAgent,
            ClaimAgent,
            RenewClaim,
            ReleaseClaim,
            DeleteAgent,
        ];
        match role {
            Role::Operator => true,
            Role::Reader => read_own.contains(&action) || read_fleet.contains(&action),
            Role::Scheduler => {
                read_own.contains(&action)
                    || read_fleet.contains(&action)
                    || work.contains(&action)
                    || dispatch.contains(&action)
            }
            Role::Agent => {
                read_own.contains(&action)
                    || agent_writes.contains(&action)
                    || work.contains(&action)
            }
        }
    }

    #[test]
    fn every_role_and_action_is_allowed_or_refused_as_documented() {
        for role in Role::ALL {
            for action in Action::ALL {
                let got = authorize(&caller(role), action, Some("eu-7")).is_ok();
                assert_eq!(got, expected(role, action), "{role} {action:?}");
            }
        }
    }

    #[test]
    fn an_agent_caller_is_refused_outside_its_scope_and_without_an_agent() {
        let agent = caller(Role::Agent);
        for action in Action::ALL
            .into_iter()
            .filter(|a| expected(Role::Agent, *a))
        {
            assert!(authorize(&agent, action, Some("special-1")).is_ok());
            let refused = authorize(&agent, action, Some("us-1")).unwrap_err();
            assert!(
                refused.to_string().contains("\"us-1\": outside its scope"),
                "{refused}"
            );
            let none = authorize(&agent, action, None);
            assert_eq!(
                none.is_ok(),
                action == Action::ExplainRecovery,
                "{action:?}"
            );
        }
        // Other roles are not scoped.
        for role in [Role::Operator, Role::Scheduler] {
            assert!(authorize(&caller(role), Action::StartWork, Some("us-1")).is_ok());
            assert!(authorize(&caller(role), Action::StartWork, None).is_ok());
        }
    }

    #[test]
    fn resume_agent_is_for_operators_and_schedulers_only() {
        for (role, allowed) in [
            (Role::Operator, true),
            (Role::Scheduler, true),
            (Role::Agent, false),
            (Role::Reader, false),
        ] {
            // An agent caller is refused even on an agent of its scope.
            for action in [
                Action::ResumeAgent,
                Action::CordonAgent,
                Action::UncordonAgent,
                Action::ClaimAgent,
                Action::RenewClaim,
                Action::ReleaseClaim,
                Action::DeleteAgent,
            ] {
                let got = authorize(&caller(role), action, Some("eu-7"));
                assert_eq!(got.is_ok(), allowed, "{role} {action:?}");
            }
        }
        let refused = authorize(&caller(Role::Agent), Action::ResumeAgent, Some("eu-7"));
        assert_eq!(
            refused.unwrap_err().to_string(),
            "c (agent) may not call ResumeAgent"
        );
    }

    #[test]
    fn a_refusal_names_the_caller_the_role_and_the_rpc() {
        let refused = authorize(&caller(Role::Reader), Action::MarkOffline, Some("a")).unwrap_err();
        assert_eq!(refused.to_string(), "c (reader) may not call MarkOffline");
    }

    #[test]
    fn patterns_match_exact_ids_and_prefixes() {
        let exact = AgentPattern::parse("agent-1").unwrap();
        assert!(exact.matches("agent-1"));
        assert!(!exact.matches("agent-10"));
        assert!(!exact.matches("agent-"));
        let prefix = AgentPattern::parse("agent-*").unwrap();
        assert!(prefix.matches("agent-1") && prefix.matches("agent-"));
        assert!(!prefix.matches("agent") && !prefix.matches("xagent-1"));
        let all = AgentPattern::parse("*").unwrap();
        assert!(all.matches("anything"));
        for bad in ["", "a*b", "**", "a b", "agent/1"] {
            assert!(AgentPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(prefix.to_string(), "agent-*");
    }

    #[test]
    fn label_scopes_need_every_label() {
        let mut agent = caller(Role::Agent);
        agent.scope.labels = [("team".to_string(), "infra".to_string())].into();
        let infra: Labels = [
            ("team".to_string(), "infra".to_string()),
            ("zone".to_string(), "eu".to_string()),
        ]
        .into();
        let ml: Labels = [("team".to_string(), "ml".to_string())].into();
        assert!(authorize_labels(&agent, Action::RegisterAgent, "eu-1", &infra).is_ok());
        let refused = authorize_labels(&agent, Action::RegisterAgent, "eu-1", &ml).unwrap_err();
        assert!(refused.to_string().contains("team=infra"), "{refused}");
        assert!(authorize_labels(&agent, Action::Heartbeat, "eu-1", &Labels::new()).is_err());
        // Not scoped: labels are not looked at.
        let op = caller(Role::Operator);
        assert!(authorize_labels(&op, Action::Heartbeat, "eu-1", &ml).is_ok());
    }

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_auth_file_is_read_with_roles_scopes_and_digests() {
        let text = format!(
            "[[caller]]\nname = \"alice\"\nrole = \"operator\"\ntoken_sha256 = \"{DIGEST}\"\n\n\
             [[caller]]\nname = \"runner\"\nrole = \"agent\"\n\
             token_sha256 = \"{}\"\nagents = [\"eu-*\", \"x\"]\nlabels = {{ team = \"infra\" }}\n",
            hex::encode(token_digest("other"))
        );
        let table = parse_auth_file(&text).unwrap();
        assert_eq!(table.callers.len(), 2);
        assert_eq!(table.callers[0].0, token_digest("test"));
        assert_eq!(table.callers[0].1.role, Role::Operator);
        let runner = &table.callers[1].1;
        assert_eq!(runner.scope.agents.len(), 2);
        assert_eq!(runner.scope.labels["team"], "infra");
        assert!(parse_auth_file("").unwrap().callers.is_empty());
    }

    #[test]
    fn a_bad_auth_file_is_refused_naming_the_line() {
        let entry = |extra: &str| {
            format!("# callers\n\n[[caller]]\nname = \"a\"\ntoken_sha256 = \"{DIGEST}\"\n{extra}")
        };
        let cases = [
            (entry("role = \"root\"\n"), "line 6"),
            (
                entry("role = \"agent\"\n"),
                "line 3: caller \"a\": an agent caller needs",
            ),
            (
                entry("role = \"reader\"\nagents = [\"x\"]\n"),
                "only apply to role agent",
            ),
            (
                entry("role = \"agent\"\nagents = [\"a*b\"]\n"),
                "may only end",
            ),
            (entry("role = \"reader\"\ncolour = 1\n"), "line 7"),
            (
                "[[caller]]\nname = \"a\"\nrole = \"reader\"\ntoken_sha256 = \"abc\"\n".to_string(),
                "line 1: caller \"a\": token_sha256 must be 64",
            ),
            (
                format!(
                    "{}{}",
                    entry("role = \"reader\"\n"),
                    entry("role = \"reader\"\n").replace("\"a\"", "\"b\"")
                ),
                "same as another caller's",
            ),
            ("[[caller]\n".to_string(), "line 1"),
        ];
        for (text, wanted) in cases {
            let error = parse_auth_file(&text).unwrap_err();
            assert!(
                error.contains(wanted),
                "{error:?} should contain {wanted:?}\n{text}"
            );
        }
    }

    #[test]
    fn a_new_callers_entry_reads_back() {
        let digest = token_digest("secret");
        let entry = caller_entry("runner \"eu\"", Role::Agent, &digest, &["eu-*".to_string()]);
        let table = parse_auth_file(&entry).unwrap();
        assert_eq!(table.callers[0].0, digest);
        assert_eq!(table.callers[0].1.name, "runner \"eu\"");
        assert_eq!(table.callers[0].1.scope.agents[0].to_string(), "eu-*");
    }
}
