//! Claims: hold one agent for a piece of work, with the lease renewed in a
//! background task and the claim released at the end.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::{
    AgentStatusServiceClient, Backoff, Clients, DispatchServiceClient, Transport, is_transient, pb,
};

/// `google.rpc.ErrorInfo`, which fleetcare attaches to every error (domain
/// `fleetcare.v1`): its `reason` is stable (`NO_AGENT_AVAILABLE`,
/// `STALE_FENCING_TOKEN`, `TRANSITION_REFUSED`, ...).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ErrorInfo {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(string, tag = "2")]
    pub domain: String,
    #[prost(btree_map = "string, string", tag = "3")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// `google.rpc.Status`, the `grpc-status-details-bin` trailer.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// The `ErrorInfo` of a failed call, if it carries one.
pub fn error_info(status: &Status) -> Option<ErrorInfo> {
    let details = RpcStatus::decode(status.details()).ok()?;
    details
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .and_then(|any| ErrorInfo::decode(any.value.as_slice()).ok())
}

/// The `ErrorInfo` reason of a failed call (`NO_AGENT_AVAILABLE`, ...).
pub fn error_reason(status: &Status) -> Option<String> {
    error_info(status).map(|info| info.reason)
}

/// Whether a RenewClaim or ReleaseClaim refusal says the claim is gone:
/// `STALE_FENCING_TOKEN` (released, expired, ended by FinishWork or
/// ReportExhausted) or `NOT_FOUND`.
pub fn is_claim_ended(status: &Status) -> bool {
    match status.code() {
        Code::NotFound => true,
        Code::FailedPrecondition => {
            error_reason(status).is_some_and(|reason| reason == "STALE_FENCING_TOKEN")
        }
        _ => false,
    }
}

/// What to claim and how to hold it, for [`Clients::claim`].
///
/// ```
/// use std::time::Duration;
/// use fleetcare_client::{ClaimOptions, pb};
/// let options = ClaimOptions::new()
///     .match_label("team", "infra")
///     .slot_type(pb::SlotType::Work)
///     .lease(Duration::from_secs(30)) // renewed every 10 s by default
///     .wait(Duration::from_secs(5)); // let the server wait for an agent to come free
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimOptions {
    /// The agents the claim may take (empty: any agent).
    pub selector: pb::LabelSelector,
    /// WORK (the agent goes BUSY) or ON_CALL.
    pub slot_type: pb::SlotType,
    /// How long the claim holds without a renewal (the server takes 1 s to 1 h).
    pub lease: Duration,
    /// How long the server may wait for a matching agent (zero: answer at once).
    pub wait: Duration,
    /// The idempotency key of ClaimAgent; `None`: a fresh random one.
    pub request_id: Option<String>,
    /// Renew this often; `None`: a third of the lease.
    pub renew_every: Option<Duration>,
    /// How many ClaimAgent (and ReleaseClaim) calls to make in all when they
    /// fail transiently.
    pub attempts: u32,
    /// The deadline of each call (beyond `wait` for ClaimAgent).
    pub call_timeout: Duration,
}

impl Default for ClaimOptions {
    fn default() -> Self {
        ClaimOptions {
            selector: pb::LabelSelector::default(),
            slot_type: pb::SlotType::Work,
            lease: Duration::from_secs(30),
            wait: Duration::ZERO,
            request_id: None,
            renew_every: None,
            attempts: 5,
            call_timeout: Duration::from_secs(10),
        }
    }
}

impl ClaimOptions {
    pub fn new() -> ClaimOptions {
        ClaimOptions::default()
    }

    /// Requires the label `key` with `value` (adds to the selector's `match_labels`).
    pub fn match_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.match_labels.insert(key.into(), value.into());
        self
    }

    /// Replaces the selector.
    pub fn selector(mut self, selector: pb::LabelSelector) -> Self {
        self.selector = selector;
        self
    }

    pub fn slot_type(mut self, slot_type: pb::SlotType) -> Self {
        self.slot_type = slot_type;
        self
    }

    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    fn renew_period(&self) -> Result<Duration, Status> {
        let every = self.renew_every.unwrap_or(self.lease / 3);
        if self.lease.is_zero() || every.is_zero() || every >= self.lease {
            return Err(Status::invalid_argument(
                "claim options: need 0 < renew_every < lease",
            ));
        }
        if self.attempts == 0 {
            return Err(Status::invalid_argument(
                "claim options: attempts must be at least 1",
            ));
        }
        Ok(every)
    }

    fn request(&self, request_id: &str) -> pb::ClaimAgentRequest {
        pb::ClaimAgentRequest {
            selector: Some(self.selector.clone()),
            slot_type: self.slot_type as i32,
            lease_duration: Some(proto_duration(self.lease)),
            wait_timeout: Some(proto_duration(self.wait)),
            request_id: request_id.to_string(),
        }
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A fresh random idempotency key (128 bits of the standard library's
/// randomly seeded hasher, as hex).
fn random_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let half = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

/// The claim ended while it was held: the work must stop, another holder
/// may have the agent now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("claim {claim_id} lost ({reason}): {}", status.message())]
pub struct ClaimLost {
    pub claim_id: String,
    /// `STALE_FENCING_TOKEN` or `NOT_FOUND` (the server's answer to a
    /// renewal), `LEASE_EXPIRED` (no renewal got through before the lease ran
    /// out), or the reason (else the code) of another refusal that ended the
    /// renewals.
    pub reason: String,
    /// The last failed renewal.
    pub status: Status,
}

impl ClaimLost {
    fn from_refusal(claim_id: &str, status: Status) -> ClaimLost {
        let reason = if status.code() == Code::NotFound {
            "NOT_FOUND".to_string()
        } else {
            error_reason(&status).unwrap_or_else(|| format!("{:?}", status.code()))
        };
        ClaimLost {
            claim_id: claim_id.to_string(),
            reason,
            status,
        }
    }
}

impl Clients {
    /// Claims one idle agent matching `options.selector` and holds it: the
    /// lease is renewed in a background task until the guard is released,
    /// finished or dropped. See [`ClaimGuard`].
    ///
    /// A ClaimAgent call that fails transiently (UNAVAILABLE, a dropped
    /// connection, DEADLINE_EXCEEDED) is made again, up to `options.attempts`
    /// calls, with the same `request_id`, so the server hands back the claim it
    /// may have made rather than a second one. Refusals are returned:
    /// RESOURCE_EXHAUSTED, reason `NO_AGENT_AVAILABLE`, when no matching agent
    /// is idle (after `options.wait`).
    pub async fn claim(&self, options: ClaimOptions) -> Result<ClaimGuard, Status> {
        let dispatch = self.dispatch.clone();
        ClaimGuard::acquire_with(self.dispatch.clone(), self.agents.clone(), options, {
            move |request| {
                let mut dispatch = dispatch.clone();
                async move { dispatch.claim_agent(request).await.map(|r| r.into_inner()) }
            }
        })
        .await
    }
}

/// A background task renewing the lease.
struct Renewer {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What the renewal task shares with the guard.
struct Shared {
    claim: watch::Sender<pb::Claim>,
    lost: watch::Sender<Option<ClaimLost>>,
    renewals: AtomicU64,
}

/// One claim on one agent, held while the guard lives: a tokio task renews
/// the lease every `renew_every` (a third of the lease by default).
///
/// End it with [`release`](ClaimGuard::release) (the agent back to IDLE),
/// or [`finish_work`](ClaimGuard::finish_work) /
/// [`report_exhausted`](ClaimGuard::report_exhausted), which end the claim
/// with the agent's own report. Dropped without either (an early return, an
/// error, a panic), the guard stops the renewals and spawns a best-effort
/// release on the current tokio runtime.
///
/// When the server answers a renewal that the claim is gone
/// (`STALE_FENCING_TOKEN`, `NOT_FOUND`), refuses it otherwise, or the lease
/// runs out before a renewal gets through, the renewals stop and
/// [`lost`](ClaimGuard::lost) returns a [`ClaimLost`]: stop the work
/// ([`until_lost`](ClaimGuard::until_lost) resolves then, to race the work
/// with it).
///
/// ```no_run
/// # async fn demo(clients: fleetcare_client::Clients) -> Result<(), Box<dyn std::error::Error>> {
/// use fleetcare_client::ClaimOptions;
/// let mut claim = clients.claim(ClaimOptions::new().match_label("team", "infra")).await?;
/// tokio::select! {
///     lost = claim.until_lost() => return Err(lost.into()),
///     _ = run_on(claim.agent_id()) => {}
/// }
/// claim.finish_work().await?; // or claim.release().await?
/// # Ok(()) }
/// # async fn run_on(_: &str) {}
/// ```
pub struct ClaimGuard {
    dispatch: DispatchServiceClient<Transport>,
    agents: AgentStatusServiceClient<Transport>,
    options: ClaimOptions,
    renew_every: Duration,
    request_id: String,
    agent: pb::Agent,
    transition: Option<pb::Transition>,
    first: pb::Claim,
    shared: Arc<Shared>,
    lease_deadline: Arc<std::sync::Mutex<Instant>>,
    renewer: Option<Renewer>,
    ended: bool,
}

impl std::fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("claim", &*self.shared.claim.borrow())
            .field("ended", &self.ended)
            .field("lost", &*self.shared.lost.borrow())
            .finish_non_exhaustive()
    }
}

impl ClaimGuard {
    /// [`Clients::claim`] with the ClaimAgent call made by `call` (the same
    /// request on every attempt).
    async fn acquire_with<F, Fut>(
        dispatch: DispatchServiceClient<Transport>,
        agents: AgentStatusServiceClient<Transport>,
        options: ClaimOptions,
        mut call: F,
    ) -> Result<ClaimGuard, Status>
    where
        F: FnMut(pb::ClaimAgentRequest) -> Fut,
        Fut: Future<Output = Result<pb::ClaimAgentResponse, Status>>,
    {
        let renew_every = options.renew_period()?;
        let request_id = options.request_id.clone().unwrap_or_else(random_request_id);
        let request = options.request(&request_id);
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let mut calls = 0;
        let (response, started) = loop {
            let started = Instant::now();
            let timeout = options.wait + options.call_timeout;
            let outcome = match tokio::time::timeout(timeout, call(request.clone())).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "ClaimAgent took longer than {timeout:?}"
                ))),
            };
            calls += 1;
            match outcome {
                Ok(response) => break (response, started),
                Err(status) if is_transient(&status) && calls < options.attempts => {
                    tokio::time::sleep(backoff.step()).await;
                }
                Err(status) => return Err(status),
            }
        };
        let claim = response
            .claim
            .ok_or_else(|| Status::internal("ClaimAgent answered without a claim"))?;
        let (claim_sender, _) = watch::channel(claim.clone());
        let (lost, _) = watch::channel(None);
        let mut guard = ClaimGuard {
            dispatch,
            agents,
            renew_every,
            request_id,
            agent: response.agent.unwrap_or_default(),
            transition: response.transition,
            first: claim,
            shared: Arc::new(Shared {
                claim: claim_sender,
                lost,
                renewals: AtomicU64::new(0),
            }),
            lease_deadline: Arc::new(std::sync::Mutex::new(started + options.lease)),
            options,
            renewer: None,
            ended: false,
        };
        guard.start_renewing();
        Ok(guard)
    }

    /// The claim, as the latest renewal left it (`lease_expires_at`).
    pub fn claim(&self) -> pb::Claim {
        self.shared.claim.borrow().clone()
    }

    /// The claim, updated by each renewal: `changed()` wakes on each.
    pub fn subscribe(&self) -> watch::Receiver<pb::Claim> {
        self.shared.claim.subscribe()
    }

    /// The claimed agent, as ClaimAgent returned it (or the call that ended the claim).
    pub fn agent(&self) -> &pb::Agent {
        &self.agent
    }

    /// The CLAIMED transition; `None` when the server recognised the
    /// `request_id` of an earlier call.
    pub fn transition(&self) -> Option<&pb::Transition> {
        self.transition.as_ref()
    }

    pub fn agent_id(&self) -> &str {
        &self.first.agent_id
    }

    pub fn claim_id(&self) -> &str {
        &self.first.claim_id
    }

    pub fn fencing_token(&self) -> i64 {
        self.first.fencing_token
    }

    /// The idempotency key ClaimAgent was called with.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// How many renewals the server accepted.
    pub fn renewals(&self) -> u64 {
        self.shared.renewals.load(Ordering::Relaxed)
    }

    /// Why the claim was lost, once it was.
    pub fn lost(&self) -> Option<ClaimLost> {
        self.shared.lost.borrow().clone()
    }

    /// Resolves when the claim is lost (never while it is held).
    pub async fn until_lost(&self) -> ClaimLost {
        let mut lost = self.shared.lost.subscribe();
        loop {
            if let Some(lost) = lost.borrow_and_update().clone() {
                return lost;
            }
            if lost.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Held: neither ended by this guard nor lost.
    pub fn is_active(&self) -> bool {
        !self.ended && self.shared.lost.borrow().is_none()
    }

    fn start_renewing(&mut self) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(renew(
            self.dispatch.clone(),
            self.first.clone(),
            self.options.clone(),
            self.renew_every,
            self.shared.clone(),
            self.lease_deadline.clone(),
            cancel.clone(),
        ));
        self.renewer = Some(Renewer { cancel, task });
    }

    async fn stop_renewing(&mut self) {
        if let Some(Renewer { cancel, task }) = self.renewer.take() {
            cancel.cancel();
            if let Err(e) = task.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    /// Stops renewing and releases the claim (the agent back to IDLE): the
    /// response, or `None` when there was nothing to release (the claim had
    /// ended already: `STALE_FENCING_TOKEN` or `NOT_FOUND`). Transient
    /// failures are retried (up to `attempts` calls); other refusals are returned.
    pub async fn release(mut self) -> Result<Option<pb::ReleaseClaimResponse>, Status> {
        self.stop_renewing().await;
        if self.ended {
            return Ok(None);
        }
        let outcome = release(
            self.dispatch.clone(),
            self.claim_id().to_string(),
            self.fencing_token(),
            self.options.attempts,
            self.options.call_timeout,
        )
        .await;
        // Released, gone already, or refused: either way nothing is left for drop to do.
        self.ended = true;
        outcome
    }

    /// FinishWork with the claim's fencing token: the slot is freed and the
    /// claim ends (the agent back to IDLE), so nothing is left to release.
    /// Renewals pause during the call and resume if it is refused (the
    /// refusal is returned; the claim is still held).
    pub async fn finish_work(&mut self) -> Result<pb::FinishWorkResponse, Status> {
        let request = pb::FinishWorkRequest {
            agent_id: self.agent_id().to_string(),
            fencing_token: self.fencing_token(),
        };
        let mut agents = self.agents.clone();
        let timeout = self.options.call_timeout;
        let response = self
            .end_with(async move { timed(timeout, agents.finish_work(request)).await })
            .await?;
        if let Some(agent) = &response.agent {
            self.agent = agent.clone();
        }
        Ok(response)
    }

    /// ReportExhausted with the claim's fencing token (`request`'s agent id
    /// and token are filled in; its other fields are sent as given, e.g.
    /// `quota_pool` to park the pool whose limit was hit and its IDLE
    /// members, and `window`), which ends the claim as
    /// [`finish_work`](ClaimGuard::finish_work) does.
    pub async fn report_exhausted(
        &mut self,
        request: pb::ReportExhaustedRequest,
    ) -> Result<pb::ReportExhaustedResponse, Status> {
        let request = pb::ReportExhaustedRequest {
            agent_id: self.agent_id().to_string(),
            fencing_token: self.fencing_token(),
            ..request
        };
        let mut agents = self.agents.clone();
        let timeout = self.options.call_timeout;
        let response = self
            .end_with(async move { timed(timeout, agents.report_exhausted(request)).await })
            .await?;
        if let Some(agent) = &response.agent {
            self.agent = agent.clone();
        }
        Ok(response)
    }

    async fn end_with<T>(
        &mut self,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        if self.ended {
            return Err(Status::failed_precondition("the claim has ended already"));
        }
        if let Some(lost) = self.lost() {
            return Err(lost.status);
        }
        // A renewal racing the call would be answered STALE_FENCING_TOKEN once
        // the call has ended the claim, and taken for a lost claim: pause them.
        self.stop_renewing().await;
        match call.await {
            Ok(response) => {
                self.ended = true;
                Ok(response)
            }
            Err(status) => {
                if self.lost().is_none() {
                    self.start_renewing();
                }
                Err(status)
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.cancel.cancel();
        }
        if self.ended {
            return;
        }
        // Best effort: outside a runtime (or while it shuts down) the lease
        // runs out on its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release(
                self.dispatch.clone(),
                self.claim_id().to_string(),
                self.fencing_token(),
                self.options.attempts,
                self.options.call_timeout,
            ));
        }
    }
}

async fn timed<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(outcome) => outcome.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the call took longer than {timeout:?}"
        ))),
    }
}

async fn release(
    mut dispatch: DispatchServiceClient<Transport>,
    claim_id: String,
    fencing_token: i64,
    attempts: u32,
    timeout: Duration,
) -> Result<Option<pb::ReleaseClaimResponse>, Status> {
    let request = pb::ReleaseClaimRequest {
        claim_id,
        fencing_token,
    };
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let mut calls = 0;
    loop {
        calls += 1;
        match timed(timeout, dispatch.release_claim(request.clone())).await {
            Ok(response) => return Ok(Some(response)),
            Err(status) if is_claim_ended(&status) => return Ok(None),
            Err(status) if is_transient(&status) && calls < attempts => {
                tokio::time::sleep(backoff.step()).await;
            }
            Err(status) => return Err(status),
        }
    }
}

async fn renew(
    mut dispatch: DispatchServiceClient<Transport>,
    claim: pb::Claim,
    options: ClaimOptions,
    renew_every: Duration,
    shared: Arc<Shared>,
    lease_deadline: Arc<std::sync::Mutex<Instant>>,
    cancel: CancellationToken,
) {
    let request = pb::RenewClaimRequest {
        claim_id: claim.claim_id.clone(),
        fencing_token: claim.fencing_token,
        lease_duration: Some(proto_duration(options.lease)),
    };
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let mut wait = renew_every;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = Instant::now();
        let deadline = *lease_deadline.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = options
            .call_timeout
            .min(deadline.saturating_duration_since(started))
            .max(Duration::from_millis(50));
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = timed(timeout, dispatch.renew_claim(request.clone())) => outcome,
        };
        match outcome {
            Ok(response) => {
                backoff.reset();
                wait = renew_every;
                *lease_deadline.lock().unwrap_or_else(|e| e.into_inner()) = started + options.lease;
                if let Some(renewed) = response.claim {
                    shared.claim.send_replace(renewed);
                }
                shared.renewals.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) if is_transient(&status) && Instant::now() < deadline => {
                wait = backoff
                    .step()
                    .min(deadline.saturating_duration_since(Instant::now()));
            }
            Err(status) => {
                let lost = if is_transient(&status) {
                    ClaimLost {
                        claim_id: claim.claim_id.clone(),
                        reason: "LEASE_EXPIRED".into(),
                        status,
                    }
                } else {
                    ClaimLost::from_refusal(&claim.claim_id, status)
                };
                if !cancel.is_cancelled() {
                    shared.lost.send_replace(Some(lost));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_clients() -> Clients {
        Clients::connect_lazy("127.0.0.1:1").unwrap()
    }

    fn answer(agent_id: &str) -> pb::ClaimAgentResponse {
        pb::ClaimAgentResponse {
            claim: Some(pb::Claim {
                claim_id: "c-1".into(),
                agent_id: agent_id.into(),
                fencing_token: 7,
                ..Default::default()
            }),
            agent: Some(pb::Agent {
                agent_id: agent_id.into(),
                ..Default::default()
            }),
            transition: None,
        }
    }

    #[tokio::test]
    async fn claim_agent_is_retried_on_transient_failures_with_the_same_request_id() {
        let clients = lazy_clients();
        let mut seen = Vec::new();
        let options = ClaimOptions::new().lease(Duration::from_secs(60));
        let guard = ClaimGuard::acquire_with(
            clients.dispatch.clone(),
            clients.agents.clone(),
            options,
            |request: pb::ClaimAgentRequest| {
                seen.push(request.request_id.clone());
                let calls = seen.len();
                async move {
                    match calls {
                        1 => Err(Status::unavailable("connection refused")),
                        2 => Err(Status::deadline_exceeded("answer lost")),
                        _ => Ok(answer("a-1")),
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter()
                .all(|id| id == guard.request_id() && id.len() == 32)
        );
        assert_eq!(guard.agent_id(), "a-1");
        assert_eq!(guard.fencing_token(), 7);
        assert!(guard.transition().is_none());
        assert!(guard.is_active());
    }

    #[tokio::test]
    async fn refusals_are_not_retried_and_transient_failures_are_bounded() {
        let clients = lazy_clients();
        for (failure, attempts, expected_calls) in [
            (Status::resource_exhausted("no agent"), 5, 1),
            (Status::unavailable("down"), 3, 3),
        ] {
            let mut calls = 0;
            let options = ClaimOptions::new().attempts(attempts);
            let outcome = ClaimGuard::acquire_with(
                clients.dispatch.clone(),
                clients.agents.clone(),
                options,
                |_| {
                    calls += 1;
                    let failure = failure.clone();
                    async move { Err::<pb::ClaimAgentResponse, _>(failure) }
                },
            )
            .await;
            assert_eq!(outcome.unwrap_err().code(), failure.code());
            assert_eq!(calls, expected_calls, "{failure:?}");
        }
    }

    #[test]
    fn options_need_a_renewal_shorter_than_the_lease() {
        let ok = ClaimOptions::new().lease(Duration::from_secs(3));
        assert_eq!(ok.renew_period().unwrap(), Duration::from_secs(1));
        let bad = ok.clone().renew_every(Duration::from_secs(3));
        assert_eq!(
            bad.renew_period().unwrap_err().code(),
            Code::InvalidArgument
        );
        let none = ClaimOptions::new().attempts(0);
        assert!(none.renew_period().is_err());
        let request = ClaimOptions::new()
            .match_label("team", "infra")
            .wait(Duration::from_millis(1500))
            .request("r-1");
        assert_eq!(request.selector.unwrap().match_labels["team"], "infra");
        assert_eq!(
            request.wait_timeout,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_ne!(random_request_id(), random_request_id());
    }

    #[test]
    fn error_info_is_read_from_the_status_details() {
        let info = ErrorInfo {
            reason: "STALE_FENCING_TOKEN".into(),
            domain: "fleetcare.v1".into(),
            metadata: Default::default(),
        };
        let details = RpcStatus {
            code: Code::FailedPrecondition as i32,
            message: "stale".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        let status = Status::with_details(
            Code::FailedPrecondition,
            "stale",
            details.encode_to_vec().into(),
        );
        assert_eq!(error_info(&status), Some(info));
        assert!(is_claim_ended(&status));
        assert!(is_claim_ended(&Status::not_found("no such claim")));
        assert!(!is_claim_ended(&Status::failed_precondition("other")));
        assert_eq!(error_reason(&Status::internal("none")), None);
    }
}
