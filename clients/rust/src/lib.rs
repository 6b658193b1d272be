//! The Rust client of fleetcare: the generated message types and gRPC clients
//! ([`pb`]), a connection helper with TLS and token options
//! ([`ConnectOptions`]), a transition watch that resumes by itself after a
//! dropped connection ([`ResumingWatch`]), a heartbeat loop that keeps to
//! the interval the server asks for ([`Heartbeater`]), and claims that hold an
//! agent with the lease renewed in the background ([`Clients::claim`],
//! [`ClaimGuard`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fleetcare_client::{Clients, pb};
//! let mut clients = Clients::connect("127.0.0.1:50051").await?;
//! let agent = clients
//!     .agents
//!     .register_agent(pb::RegisterAgentRequest { agent_id: "a-1".into(), ..Default::default() })
//!     .await?
//!     .into_inner();
//! # Ok(()) }
//! ```

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

mod claim;

pub use claim::{
    ClaimGuard, ClaimLost, ClaimOptions, ErrorInfo, error_info, error_reason, is_claim_ended,
};

/// The generated protobuf messages and gRPC clients of `fleetcare.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("fleetcare.v1");
}

pub use pb::agent_status_service_client::AgentStatusServiceClient;
pub use pb::dispatch_service_client::DispatchServiceClient;
pub use pb::healing_service_client::HealingServiceClient;
pub use pb::post_healing_service_client::PostHealingServiceClient;
pub use pb::quota_service_client::QuotaServiceClient;
pub use pb::session_pipeline_service_client::SessionPipelineServiceClient;

/// Turns `host:port` into `http://host:port`; a URL with a scheme is kept. An
/// `https://` URL gets TLS verified against the system's roots (for a CA file
/// or a client certificate, see [`ConnectOptions`]).
pub fn endpoint(server: &str) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = plain_endpoint(server)?;
    if endpoint.uri().scheme_str() == Some("https") {
        return endpoint.tls_config(ClientTlsConfig::new().with_native_roots());
    }
    Ok(endpoint)
}

/// [`endpoint`] without TLS settings.
fn plain_endpoint(server: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(5))
        // A watch can be quiet for long stretches: keepalives notice a dead
        // peer (a half-open connection) instead of waiting forever.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// How to reach the server beyond its address: TLS and a bearer token.
///
/// TLS is used for an `https://` address, or for a `host:port` one when a CA
/// or a client identity is given; the server is then verified against the
/// CA file, else the system's roots. An `http://` address with TLS options
/// is an error rather than a silent plaintext connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), fleetcare_client::ConnectError> {
/// use fleetcare_client::{Clients, ConnectOptions};
/// let options = ConnectOptions::default()
///     .ca_file("ca.pem")
///     .identity_files("client.pem", "client-key.pem")
///     .token("s3cret");
/// let clients = Clients::connect_with("https://fleet.internal:50051", &options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// PEM CA certificate(s) to verify the server with (else the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for a server that wants mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// The name the server's certificate must carry, when it is not the
    /// address's host (e.g. connecting by IP to a certificate for a name).
    pub domain_name: Option<String>,
}

impl ConnectOptions {
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    pub fn identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    fn wants_tls(&self) -> bool {
        self.ca_file.is_some() || self.identity.is_some() || self.domain_name.is_some()
    }

    /// The endpoint for `server` with these options' TLS settings.
    pub fn endpoint(&self, server: &str) -> Result<Endpoint, ConnectError> {
        let tls = self.wants_tls();
        let address = if server.contains("://") {
            if tls && server.starts_with("http://") {
                return Err(ConnectError::PlaintextWithTls(server.to_string()));
            }
            server.to_string()
        } else if tls {
            format!("https://{server}")
        } else {
            server.to_string()
        };
        let endpoint = plain_endpoint(&address)?;
        if endpoint.uri().scheme_str() != Some("https") {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_file {
            Some(path) => config.ca_certificate(Certificate::from_pem(read(path)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.domain_name {
            config = config.domain_name(name.clone());
        }
        Ok(endpoint.tls_config(config)?)
    }

    fn auth(&self) -> Result<BearerToken, ConnectError> {
        BearerToken::new(self.token.as_deref())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Why [`Clients::connect_with`] could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS options were given for a plaintext address ({0}): use https://")]
    PlaintextWithTls(String),
    #[error("the token cannot be sent in a header (empty, or not visible ASCII)")]
    InvalidToken,
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Adds `authorization: Bearer <token>` to every call that does not carry an
/// `authorization` header already; does nothing without a token.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<BearerToken, ConnectError> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        if token.is_empty() {
            return Err(ConnectError::InvalidToken);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnectError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0
            && !request.metadata().contains_key("authorization")
        {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// What every client here sends its calls through: the connection, with the
/// bearer token added (when there is one).
pub type Transport = InterceptedService<Channel, BearerToken>;

/// One client per service, sharing one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Clients {
    pub agents: AgentStatusServiceClient<Transport>,
    pub healing: HealingServiceClient<Transport>,
    pub posts: PostHealingServiceClient<Transport>,
    pub pipeline: SessionPipelineServiceClient<Transport>,
    pub dispatch: DispatchServiceClient<Transport>,
    pub quota: QuotaServiceClient<Transport>,
}

impl Clients {
    /// Connects now (plaintext, or TLS with the system's roots for an
    /// `https://` address), so an unreachable server is reported here.
    pub async fn connect(server: &str) -> Result<Clients, tonic::transport::Error> {
        Ok(Clients::new(endpoint(server)?.connect().await?))
    }

    /// Connects on first use and reconnects after a dropped connection.
    pub fn connect_lazy(server: &str) -> Result<Clients, tonic::transport::Error> {
        Ok(Clients::new(endpoint(server)?.connect_lazy()))
    }

    /// Connects now with TLS and token options; see [`ConnectOptions`].
    pub async fn connect_with(
        server: &str,
        options: &ConnectOptions,
    ) -> Result<Clients, ConnectError> {
        let auth = options.auth()?;
        let channel = options.endpoint(server)?.connect().await?;
        Ok(Clients::with_auth(channel, auth))
    }

    /// [`Clients::connect_with`], connecting on first use.
    pub fn connect_lazy_with(
        server: &str,
        options: &ConnectOptions,
    ) -> Result<Clients, ConnectError> {
        let auth = options.auth()?;
        Ok(Clients::with_auth(
            options.endpoint(server)?.connect_lazy(),
            auth,
        ))
    }

    /// Clients on `channel`, without a token.
    pub fn new(channel: Channel) -> Clients {
        Clients::with_auth(channel, BearerToken::default())
    }

    /// Clients on `channel` that send `auth`'s token with every call.
    pub fn with_auth(channel: Channel, auth: BearerToken) -> Clients {
        let transport = InterceptedService::new(channel, auth);
        Clients {
            agents: AgentStatusServiceClient::new(transport.clone()),
            healing: HealingServiceClient::new(transport.clone()),
            posts: PostHealingServiceClient::new(transport.clone()),
            pipeline: SessionPipelineServiceClient::new(transport.clone()),
            dispatch: DispatchServiceClient::new(transport.clone()),
            quota: QuotaServiceClient::new(transport),
        }
    }

    /// A heartbeat loop for `agent_id` on this connection; see [`Heartbeater`].
    pub fn heartbeats(&self, agent_id: impl Into<String>) -> Heartbeater {
        Heartbeater::new(self.agents.clone(), agent_id)
    }
}

/// Whether a failed watch is worth reopening: the connection dropped or the
/// server went away (a restart, a deploy), as opposed to a request the server
/// refused (OUT_OF_RANGE, INVALID_ARGUMENT), which would fail again.
fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        // A connection cut mid-stream surfaces as UNKNOWN made by tonic from
        // the transport error, which it keeps as the source; an UNKNOWN the
        // server sent has none.
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// Delay before the next reconnect: doubling from 100 ms, capped.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Backoff::FIRST,
            max,
        }
    }

    fn step(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

/// A `WatchTransitions` stream that reopens itself with `since_revision` set to
/// the last revision it saw (a transition's or a progress event's), so the
/// caller sees every transition once, in revision order, across dropped
/// connections and server restarts. Errors the server means (OUT_OF_RANGE when
/// the revision is no longer retained, INVALID_ARGUMENT) are returned.
///
/// `since_revision` 0 ("from now on") is pinned to the head revision before
/// the first stream opens, so a reconnect before the first event still
/// resumes from there rather than from a later "now". A snapshot cut off
/// before its `SnapshotComplete` starts over; after it, the watch resumes from
/// the snapshot's revision without a new snapshot.
pub struct ResumingWatch {
    client: AgentStatusServiceClient<Transport>,
    request: pb::WatchTransitionsRequest,
    stream: Option<Streaming<pb::WatchTransitionsResponse>>,
    /// Transitions read from history, delivered before the stream's.
    pending: VecDeque<pb::watch_transitions_response::Event>,
    pinned: bool,
    backoff: Backoff,
    reconnects: u64,
    /// Whether a stream is (or was last) open: a disconnect is reported once.
    connected: bool,
    on_disconnect: Option<DisconnectHook>,
}

/// Called when an open stream is lost, with the error (`None` when the
/// server ended the stream, as it does when shutting down) and the revision
/// the watch will resume after.
pub type DisconnectHook = Box<dyn FnMut(Option<&Status>, i64) + Send>;

impl ResumingWatch {
    pub fn new(
        client: AgentStatusServiceClient<Transport>,
        request: pb::WatchTransitionsRequest,
    ) -> ResumingWatch {
        ResumingWatch {
            client,
            request,
            stream: None,
            pending: VecDeque::new(),
            pinned: false,
            backoff: Backoff::new(Duration::from_secs(5)),
            reconnects: 0,
            connected: false,
            on_disconnect: None,
        }
    }

    /// Calls `hook` each time an open stream is lost (not for every failed
    /// reconnect attempt after it).
    pub fn on_disconnect(
        mut self,
        hook: impl FnMut(Option<&Status>, i64) + Send + 'static,
    ) -> ResumingWatch {
        self.on_disconnect = Some(Box::new(hook));
        self
    }

    /// Caps the delay between reconnect attempts (default 5 s).
    pub fn with_max_backoff(mut self, max: Duration) -> ResumingWatch {
        self.backoff = Backoff::new(max);
        self
    }

    /// The revision a reconnect would resume after.
    pub fn last_revision(&self) -> i64 {
        self.request.since_revision
    }

    /// How many times the stream was reopened.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The next event; waits (reconnecting as needed) until there is one.
    pub async fn next(&mut self) -> Result<pb::watch_transitions_response::Event, Status> {
        use pb::watch_transitions_response::Event;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    self.start().await?;
                    continue;
                }
            };
            match stream.message().await {
                Ok(Some(pb::WatchTransitionsResponse { event: Some(event) })) => {
                    self.backoff.reset();
                    match &event {
                        // Already delivered from history (see `open`).
                        Event::Transition(t) if t.revision <= self.request.since_revision => {
                            continue;
                        }
                        Event::Transition(t) => self.request.since_revision = t.revision,
                        Event::Progress(p) => {
                            self.request.since_revision =
                                self.request.since_revision.max(p.revision)
                        }
                        Event::SnapshotComplete(done) => {
                            self.request.since_revision = done.revision;
                            self.request.include_snapshot = false;
                        }
                        Event::SnapshotAgent(_) => {}
                    }
                    return Ok(event);
                }
                // An event kind this client does not know: skip it.
                Ok(Some(pb::WatchTransitionsResponse { event: None })) => {}
                // The server ended the stream (it is shutting down): reopen.
                Ok(None) => self.pause(None).await,
                Err(status) if is_transient(&status) => self.pause(Some(&status)).await,
                Err(status) => return Err(status),
            }
        }
    }

    /// Opens the stream now (retrying while the server is unreachable), so
    /// that every transition committed after this returns is delivered.
    /// `next` does this by itself; call it to fix "now" before acting.
    pub async fn start(&mut self) -> Result<(), Status> {
        while self.stream.is_none() {
            match self.open().await {
                Ok(()) => {}
                Err(status) if is_transient(&status) => self.pause(Some(&status)).await,
                Err(status) => return Err(status),
            }
        }
        Ok(())
    }

    async fn open(&mut self) -> Result<(), Status> {
        let from_now = !self.request.include_snapshot && self.request.since_revision == 0;
        if from_now && !self.pinned {
            let head = self
                .client
                .list_transitions(pb::ListTransitionsRequest {
                    page_size: 1,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .head_revision;
            self.request.since_revision = head;
        }
        self.pinned = true;
        let stream = self
            .client
            .watch_transitions(self.request.clone())
            .await?
            .into_inner();
        if self.request.since_revision == 0 && from_now {
            // The history was empty when pinned, and since_revision 0 means
            // "the head when the stream opened", which may already be past
            // transitions committed since. The stream is open now: anything
            // before it is in the history, anything after comes on the stream
            // (and is skipped there if it was read here too).
            self.read_history().await?;
        }
        self.stream = Some(stream);
        self.connected = true;
        Ok(())
    }

    async fn read_history(&mut self) -> Result<(), Status> {
        const PAGE: i32 = 1000;
        loop {
            let page = self
                .client
                .list_transitions(pb::ListTransitionsRequest {
                    after_revision: self.request.since_revision,
                    page_size: PAGE,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let full = page.transitions.len() == PAGE as usize;
            for t in page.transitions {
                self.request.since_revision = t.revision;
                if watched(&self.request, &t) {
                    let event = pb::watch_transitions_response::Event::Transition(t);
                    self.pending.push_back(event);
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    async fn pause(&mut self, error: Option<&Status>) {
        if std::mem::take(&mut self.connected)
            && let Some(hook) = &mut self.on_disconnect
        {
            hook(error, self.request.since_revision);
        }
        self.stream = None;
        self.reconnects += 1;
        tokio::time::sleep(self.backoff.step()).await;
    }
}

/// Called with every successful heartbeat's response.
pub type ResponseHook = Box<dyn FnMut(&pb::HeartbeatResponse) + Send>;
/// Called after each transient failure, with the error and the delay before
/// the next attempt.
pub type RetryHook = Box<dyn FnMut(&Status, Duration) + Send>;

/// Heartbeats one agent in a loop at the interval the server asks for: after
/// each response it waits that response's `next_heartbeat_interval` (the
/// server paces the fleet under its `--max-heartbeat-rate`), or the fallback
/// interval (5 s) when the server sent none or zero, and never less than the
/// minimum interval (100 ms), so a misbehaving server cannot make it spin.
///
/// Transient failures (UNAVAILABLE: a dropped connection, a restarting
/// server; a call that outlives its timeout) are retried after a backoff
/// doubling from 100 ms up to the max backoff (5 s). Any other error ends
/// the loop and is returned: NOT_FOUND when the agent was never registered,
/// INVALID_ARGUMENT for a malformed id. Cancellation ends it with `Ok(())`,
/// also in the middle of a wait or a call.
///
/// ```no_run
/// # async fn demo(clients: fleetcare_client::Clients) -> Result<(), tonic::Status> {
/// let beats = clients.heartbeats("a-1").spawn();
/// let mut last = beats.subscribe();
/// // ... run the agent; `last` holds the newest HeartbeatResponse ...
/// # let _ = last.changed().await;
/// beats.stop().await?;
/// # Ok(()) }
/// ```
pub struct Heartbeater {
    client: AgentStatusServiceClient<Transport>,
    agent_id: String,
    fallback_interval: Duration,
    min_interval: Duration,
    max_backoff: Duration,
    call_timeout: Duration,
    on_response: Option<ResponseHook>,
    on_retry: Option<RetryHook>,
}

impl Heartbeater {
    /// The interval used when a response carries none (or zero).
    pub const FALLBACK_INTERVAL: Duration = Duration::from_secs(5);
    /// The shortest wait between heartbeats, whatever the server says.
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

    pub fn new(
        client: AgentStatusServiceClient<Transport>,
        agent_id: impl Into<String>,
    ) -> Heartbeater {
        Heartbeater {
            client,
            agent_id: agent_id.into(),
            fallback_interval: Heartbeater::FALLBACK_INTERVAL,
            min_interval: Heartbeater::MIN_INTERVAL,
            max_backoff: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            on_response: None,
            on_retry: None,
        }
    }

    /// The interval when the server gives none (default 5 s).
    pub fn with_fallback_interval(mut self, interval: Duration) -> Heartbeater {
        self.fallback_interval = interval;
        self
    }

    /// The floor of the interval (default 100 ms).
    pub fn with_min_interval(mut self, interval: Duration) -> Heartbeater {
        self.min_interval = interval;
        self
    }

    /// Caps the delay between retries of a transient failure (default 5 s).
    pub fn with_max_backoff(mut self, max: Duration) -> Heartbeater {
        self.max_backoff = max;
        self
    }

    /// How long one Heartbeat call may take before it counts as a transient
    /// failure (default 10 s).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Heartbeater {
        self.call_timeout = timeout;
        self
    }

    /// Calls `hook` with every response, in order (e.g. to see the agent come
    /// back from OFFLINE: `transition` is then HEARTBEAT_RESUMED).
    pub fn on_response(
        mut self,
        hook: impl FnMut(&pb::HeartbeatResponse) + Send + 'static,
    ) -> Heartbeater {
        self.on_response = Some(Box::new(hook));
        self
    }

    /// Calls `hook` after each transient failure, before the backoff.
    pub fn on_retry(mut self, hook: impl FnMut(&Status, Duration) + Send + 'static) -> Heartbeater {
        self.on_retry = Some(Box::new(hook));
        self
    }

    /// Heartbeats until `cancel` is cancelled (`Ok(())`) or the server
    /// refuses a heartbeat (that error).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Status> {
        self.run_reporting(cancel, None).await
    }

    /// Runs the loop on a tokio task; the handle stops it (or, dropped,
    /// cancels it) and shows the newest response.
    pub fn spawn(self) -> HeartbeatHandle {
        let cancel = CancellationToken::new();
        let (last, receiver) = watch::channel(None);
        let task = tokio::spawn(self.run_reporting(cancel.clone(), Some(last)));
        HeartbeatHandle {
            cancel,
            task,
            last: receiver,
        }
    }

    async fn run_reporting(
        mut self,
        cancel: CancellationToken,
        last: Option<watch::Sender<Option<pb::HeartbeatResponse>>>,
    ) -> Result<(), Status> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let request = pb::HeartbeatRequest {
                agent_id: self.agent_id.clone(),
            };
            let call = tokio::time::timeout(self.call_timeout, self.client.heartbeat(request));
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                outcome = call => outcome,
            };
            let wait = match outcome {
                Ok(Ok(response)) => {
                    backoff.reset();
                    let response = response.into_inner();
                    let wait = next_interval(&response, self.fallback_interval, self.min_interval);
                    if let Some(hook) = &mut self.on_response {
                        hook(&response);
                    }
                    if let Some(last) = &last {
                        last.send_replace(Some(response));
                    }
                    wait
                }
                Ok(Err(status)) if is_transient(&status) => self.retry(&status, &mut backoff),
                Ok(Err(status)) => return Err(status),
                Err(_elapsed) => {
                    let status = Status::deadline_exceeded(format!(
                        "heartbeat took longer than {:?}",
                        self.call_timeout
                    ));
                    self.retry(&status, &mut backoff)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn retry(&mut self, status: &Status, backoff: &mut Backoff) -> Duration {
        let delay = backoff.step();
        if let Some(hook) = &mut self.on_retry {
            hook(status, delay);
        }
        delay
    }
}

/// How long to wait after `response`: its `next_heartbeat_interval`, the
/// fallback when that is absent, zero or negative, and never under `min`.
fn next_interval(response: &pb::HeartbeatResponse, fallback: Duration, min: Duration) -> Duration {
    let given = response
        .next_heartbeat_interval
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero());
    given.unwrap_or(fallback).max(min)
}

/// A running [`Heartbeater`]. Dropping it cancels the loop; [`stop`] cancels
/// and waits for it.
///
/// [`stop`]: HeartbeatHandle::stop
pub struct HeartbeatHandle {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), Status>>,
    last: watch::Receiver<Option<pb::HeartbeatResponse>>,
}

impl HeartbeatHandle {
    /// The newest response (`None` before the first one); `changed()` wakes
    /// on each new one.
    pub fn subscribe(&self) -> watch::Receiver<Option<pb::HeartbeatResponse>> {
        self.last.clone()
    }

    /// Whether the loop has ended (cancelled, or refused by the server).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Cancels the loop and waits for it: `Ok(())`, or the error that had
    /// already ended it (NOT_FOUND, ...).
    pub async fn stop(mut self) -> Result<(), Status> {
        self.cancel.cancel();
        self.join().await
    }

    /// Waits for the loop to end by itself, i.e. for the server to refuse a
    /// heartbeat; returns that error.
    pub async fn finished(mut self) -> Result<(), Status> {
        self.join().await
    }

    async fn join(&mut self) -> Result<(), Status> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Status::cancelled(format!("heartbeat task: {e}"))),
        }
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Whether the watch's filters keep `t`, as the server applies them.
fn watched(request: &pb::WatchTransitionsRequest, t: &pb::Transition) -> bool {
    let agent = request.agent_ids.is_empty() || request.agent_ids.contains(&t.agent_id);
    let status = request.statuses.is_empty()
        || request.statuses.contains(&t.from_status)
        || request.statuses.contains(&t.to_status);
    agent && status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.step().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.step(), Duration::from_millis(100));
    }

    #[test]
    fn transport_failures_are_transient_and_server_refusals_are_not() {
        assert!(is_transient(&Status::unavailable("connection refused")));
        let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transient(&Status::from_error(Box::new(cut))));
        assert!(!is_transient(&Status::unknown("handler failed")));
        assert!(!is_transient(&Status::out_of_range("revision pruned")));
        assert!(!is_transient(&Status::invalid_argument("bad filter")));
    }

    #[test]
    fn history_is_filtered_as_the_server_filters_the_stream() {
        let t = pb::Transition {
            agent_id: "a".into(),
            from_status: pb::AgentStatus::Idle as i32,
            to_status: pb::AgentStatus::Busy as i32,
            ..Default::default()
        };
        let request = |agents: &[&str], statuses: &[pb::AgentStatus]| pb::WatchTransitionsRequest {
            agent_ids: agents.iter().map(|a| a.to_string()).collect(),
            statuses: statuses.iter().map(|s| *s as i32).collect(),
            ..Default::default()
        };
        assert!(watched(&request(&[], &[]), &t));
        assert!(watched(&request(&["a"], &[pb::AgentStatus::Idle]), &t));
        assert!(watched(&request(&[], &[pb::AgentStatus::Busy]), &t));
        assert!(!watched(&request(&["b"], &[]), &t));
        assert!(!watched(&request(&[], &[pb::AgentStatus::Offline]), &t));
    }

    fn response_with(interval: Option<prost_types::Duration>) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            next_heartbeat_interval: interval,
            ..Default::default()
        }
    }

    #[test]
    fn heartbeat_interval_is_the_servers_with_a_fallback_and_a_floor() {
        let fallback = Duration::from_secs(5);
        let min = Duration::from_millis(100);
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        let next = |interval| next_interval(&response_with(interval), fallback, min);
        assert_eq!(next(d(2, 500_000_000)), Duration::from_millis(2500));
        assert_eq!(next(d(0, 200_000_000)), Duration::from_millis(200));
        assert_eq!(next(None), fallback, "absent");
        assert_eq!(next(d(0, 0)), fallback, "zero");
        assert_eq!(next(d(-3, 0)), fallback, "negative");
        assert_eq!(next(d(0, 1_000)), min, "1 µs is raised to the floor");
    }

    #[test]
    fn the_token_goes_in_an_authorization_header_unless_one_is_set() {
        let mut auth = BearerToken::new(Some("s3cret")).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );

        let mut own = tonic::Request::new(());
        own.metadata_mut()
            .insert("authorization", "Bearer mine".parse().unwrap());
        let request = auth.call(own).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer mine"
        );

        let mut none = BearerToken::new(None).unwrap();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());

        assert!(matches!(
            BearerToken::new(Some("")),
            Err(ConnectError::InvalidToken)
        ));
        assert!(matches!(
            BearerToken::new(Some("a\nb")),
            Err(ConnectError::InvalidToken)
        ));
    }

    #[test]
    fn tls_options_pick_https_and_refuse_a_plaintext_url() {
        let none = ConnectOptions::default();
        assert_eq!(
            none.endpoint("127.0.0.1:1").unwrap().uri().scheme_str(),
            Some("http")
        );
        let https = none.endpoint("https://fleet.internal:1").unwrap();
        assert_eq!(https.uri().scheme_str(), Some("https"));

        let missing = ConnectOptions::default().ca_file("/nonexistent/ca.pem");
        assert!(matches!(
            missing.endpoint("127.0.0.1:1"),
            Err(ConnectError::Read { .. })
        ));
        assert!(matches!(
            missing.endpoint("http://127.0.0.1:1"),
            Err(ConnectError::PlaintextWithTls(_))
        ));
        let named = ConnectOptions::default().domain_name("fleet.internal");
        assert_eq!(
            named.endpoint("10.0.0.1:1").unwrap().uri().scheme_str(),
            Some("https")
        );
    }

    #[test]
    fn endpoint_accepts_host_port_and_urls() {
        assert_eq!(
            endpoint("127.0.0.1:50051").unwrap().uri().to_string(),
            "http://127.0.0.1:50051/"
        );
        assert_eq!(
            endpoint("http://fleet.internal:8080")
                .unwrap()
                .uri()
                .to_string(),
            "http://fleet.internal:8080/"
        );
    }
}
