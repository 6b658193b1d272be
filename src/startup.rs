//! Builds the server from its configuration and runs it until shutdown.
//!
//! Tests bind a listener on port 0 first and pass it in, so they know the
//! address before the server runs and never sleep waiting for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{Exposure, ServeArgs, chrono_duration};
use crate::domain::brakes::HealingPolicy;
use crate::domain::healing::PlannerConfig;
use crate::domain::liveness::HeartbeatPacing;
use crate::domain::pipeline::RetryPolicy;
use crate::domain::post_healing::PostHealingConfig;
use crate::error::Error;
use crate::grpc::agent_status::{AgentStatusApi, AgentStatusSettings};
use crate::grpc::auth::Guard;
use crate::grpc::callers::WatchSlots;
use crate::grpc::dispatch::{DispatchApi, DispatchSettings};
use crate::grpc::guard::{Admission, Gate};
use crate::grpc::healing::{HealingApi, HealingSettings, PostHealingApi, shared_rng};
use crate::grpc::metrics::MetricsLayer;
use crate::grpc::quota::QuotaApi;
use crate::grpc::session_pipeline::SessionPipelineApi;
use crate::grpc::watch_route::WatchRoute;
use crate::http::{Apis, Dashboard};
use crate::metrics::Metrics;
use crate::processors::Registration;
use crate::proto::v1::agent_status_service_server::AgentStatusServiceServer;
use crate::proto::v1::dispatch_service_server::DispatchServiceServer;
use crate::proto::v1::healing_service_server::HealingServiceServer;
use crate::proto::v1::post_healing_service_server::PostHealingServiceServer;
use crate::proto::v1::quota_service_server::QuotaServiceServer;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineServiceServer;
use crate::runtime::agent_cache::AgentCache;
use crate::runtime::agents::AgentWrites;
use crate::runtime::auth::{Callers, RELOAD_INTERVAL};
use crate::runtime::claims::ClaimWaiters;
use crate::runtime::committer::Committer;
use crate::runtime::connections::{self, ConnectionLimits};
use crate::runtime::healing_policy::PolicyHandle;
use crate::runtime::health::StoreHealth;
use crate::runtime::heartbeats;
use crate::runtime::pipeline::scheduler as pipeline_scheduler;
use crate::runtime::pipeline::{Pipeline, PipelineConfig};
use crate::runtime::{fanout::TransitionFanout, health, sweeper};
use crate::storage::{AgentStore, StoreLocation, StoreOptions, Stores};
use crate::tls::ServerTls;

/// A vanished client's connection is noticed within interval + timeout.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

pub struct Application {
    listener: TcpListener,
    args: ServeArgs,
    /// The store, once [`prepare`] has opened it and started the services.
    opening: watch::Receiver<Opening>,
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    gates: Gates,
    /// TLS, when `--tls-cert`/`--tls-key` are given; plaintext otherwise.
    tls: Option<ServerTls>,
    /// This server's metrics, and the HTTP listener serving them (`--http-listen`).
    metrics: Arc<Metrics>,
    http: Option<TcpListener>,
    /// The dashboard's API on the HTTP listener, opened with the services.
    dashboard: Dashboard,
    /// What lets a call in (store up, `--max-concurrent-calls`, a known
    /// caller), one for the gRPC server and the dashboard's API.
    admission: Admission,
    shutdown: CancellationToken,
}

/// Where reaching the store stands.
#[derive(Clone)]
enum Opening {
    Waiting,
    Open(Stores),
    /// It cannot be opened (not a matter of waiting), or the services cannot
    /// start on it: the server stops.
    Failed(String),
}

/// The first wait after a failed attempt to reach the store; it doubles up to
/// [`STORE_RETRY_MAX`].
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

impl Application {
    /// Checks the settings and starts reaching the store (connect, migrate) in
    /// the background, retrying with capped exponential backoff while it is
    /// unreachable, then the background tasks and the services: a server
    /// started before its database waits for it, its port answering health
    /// NOT_SERVING meanwhile (once [`Application::run`] runs). Everything
    /// stops when `shutdown` fires.
    pub async fn build(
        args: ServeArgs,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        Application::build_with_processors(args, listener, shutdown, crate::processors::registry())
            .await
    }

    /// [`Application::build`] with these session processors instead of the
    /// built-in ones (tests pass processors they can hold open).
    pub async fn build_with_processors(
        args: ServeArgs,
        listener: TcpListener,
        shutdown: CancellationToken,
        processors: Vec<Registration>,
    ) -> Result<Self, Error> {
        args.validate().map_err(Error::InvalidArgument)?;
        dispatch_settings(&args)?;
        pool_release_settings(&args)?;
        // The TLS files are read before anything starts, so a bad path or
        // pair fails the start with the flag's name.
        let tls = match args.tls.files().map_err(Error::InvalidArgument)? {
            Some(files) => Some(ServerTls::load(files).map_err(Error::InvalidArgument)?),
            None => None,
        };
        // The address actually bound (tests pass a listener of their own).
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("listener: {e}")))?;
        let exposure = args.exposure_at(bound).map_err(Error::InvalidArgument)?;
        let callers = match &args.auth_file {
            Some(path) => Callers::watch(path, RELOAD_INTERVAL, shutdown.child_token())?,
            None => Callers::open(),
        };
        match exposure {
            Exposure::Authenticated => {}
            Exposure::Loopback => {
                tracing::info!(addr = %bound, "no --auth-file: serving loopback only, every caller is the anonymous operator")
            }
            Exposure::Insecure => tracing::warn!(
                addr = %bound,
                "--insecure-no-auth: serving without authentication, anyone who can reach this port may do everything"
            ),
        }
        // Bound here, so a taken port fails the start and tests learn the address.
        let http = match args.http_listen.0 {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::InvalidArgument(format!("--http-listen {addr}: cannot listen: {e}"))
            })?),
            None => None,
        };
        let metrics = Metrics::new();
        let health = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        )
        .max_decoding_message_size(args.limits.max_message_size);
        // Known from the first call, so a health Watch never sees an unknown service.
        health::set_all(&health, ServingStatus::NotServing).await;
        let (opened, opening) = watch::channel(Opening::Waiting);
        let store_health = StoreHealth::default();
        let gates = Gates::default();
        let admission = Admission::new(
            store_health.clone(),
            args.limits.max_concurrent_calls,
            callers.clone(),
        );
        let mut dashboard = Dashboard::new(admission.clone(), metrics.clone());
        // The dashboard's API acts as its callers: on a listener that is not
        // loopback, only with an auth file (or --insecure-no-auth), as gRPC.
        if let Some(addr) = http.as_ref().and_then(|l| l.local_addr().ok())
            && let Err(why) = args.exposure_at(addr)
        {
            tracing::warn!(%addr, %why, "the dashboard API is off on this --http-listen address");
            dashboard = dashboard.turned_off(format!(
                "the dashboard API is off: --http-listen {addr} is not a loopback address and the server has no --auth-file"
            ));
        }
        // The embedded store is a local file: nothing to wait for, and a refusal
        // (another server holds it) must stop the start at once. Postgres is
        // reached in the background, with backoff.
        let store_options = args.store_options().map_err(Error::InvalidArgument)?;
        let preopened = match &store_options.location {
            StoreLocation::Sqlite(path) => {
                let stores = Stores::open(&store_options, shutdown.child_token()).await?;
                tracing::info!(path = %path.display(), "store: embedded sqlite");
                Some(stores)
            }
            StoreLocation::Postgres(_) => None,
        };
        tokio::spawn(prepare(
            args.clone(),
            preopened,
            processors,
            metrics.clone(),
            gates.clone(),
            dashboard.clone(),
            health.clone(),
            store_health.clone(),
            shutdown.clone(),
            opened,
        ));
        Ok(Application {
            listener,
            args,
            opening,
            health,
            health_service,
            gates,
            tls,
            metrics,
            http,
            dashboard,
            admission,
            shutdown,
        })
    }

    /// The store this server runs on, once it is open and the services have
    /// started on it (tests and benches read it directly; a test that awaits
    /// it knows every call is served from then on).
    pub async fn stores(&self) -> Result<Stores, Error> {
        wait_for_store(self.opening.clone()).await
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the HTTP (metrics) listener is bound to; `None` when
    /// `--http-listen` is empty.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This server's metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` fires, then: health NOT_SERVING, no new calls, watch
    /// streams ended, in-flight calls given `--shutdown-grace` to finish.
    ///
    /// The port answers from the start: health NOT_SERVING and every fleetcare
    /// call UNAVAILABLE until the store is open, then the services start.
    pub async fn run(self) -> Result<(), Error> {
        let Application {
            listener,
            args,
            opening,
            health,
            health_service,
            gates,
            tls,
            metrics,
            http,
            dashboard,
            admission,
            shutdown,
        } = self;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;

        // Fails only when the store cannot be opened (not a matter of waiting)
        // or the services cannot start on it: then the server stops.
        let setup = wait_for_store(opening);

        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving");
        }
        let stopping = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.cancelled().await;
                health::set_all(&health, ServingStatus::NotServing).await;
                tracing::info!("shutting down: no new calls, draining in-flight ones");
            }
        };
        // The listener comes from outside (tests bind port 0 first): the accept
        // loop bounds connections and sets their socket options.
        let incoming = connections::incoming(
            listener,
            ConnectionLimits {
                max_connections: args.limits.max_connections,
                handshake_timeout: args.limits.handshake_timeout,
                tcp_keepalive: TCP_KEEPALIVE,
            },
        );
        match http {
            Some(http) => {
                if let Ok(addr) = http.local_addr() {
                    tracing::info!(%addr, "serving the dashboard at / and metrics at /metrics");
                }
                let metrics = metrics.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(error) = crate::http::serve(http, metrics, dashboard, shutdown).await
                    {
                        tracing::error!(%error, "http listener failed");
                    }
                });
            }
            // No listener serves the dashboard: let go of it now, or its
            // handle on the services (and so on the store) would outlive them,
            // and the shutdown would wait out its whole grace for the store.
            None => drop(dashboard),
        }
        let router = Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            // Outermost: every call is timed, refusals included.
            .layer(MetricsLayer::new(metrics))
            .layer(crate::grpc::trace::TraceLayer)
            .layer(admission.layer())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(gates.agent_status)
            .add_service(gates.healing)
            .add_service(gates.post_healing)
            .add_service(gates.session_pipeline)
            .add_service(gates.dispatch)
            .add_service(gates.quota);
        // TLS, when configured, is terminated on the accepted connections (see
        // `tls`): handshakes in tasks of their own, within each connection's
        // slot, certificates reloaded without a restart.
        let serve = match tls {
            None => Either::Left(router.serve_with_incoming_shutdown(incoming, stopping)),
            Some(tls) => {
                let files = tls.files();
                let mutual = files.client_ca.is_some();
                tracing::info!(cert = %files.cert.display(), mutual, "tls on");
                tls.spawn_reloader(args.tls.tls_reload_interval, shutdown.clone());
                Either::Right(router.serve_with_incoming_shutdown(tls.incoming(incoming), stopping))
            }
        };
        let drain_deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(args.shutdown_grace).await;
        };
        // The futures (the router and the services in it) are dropped at the
        // end of this block.
        let released = {
            tokio::pin!(serve, drain_deadline, setup);
            let mut setting_up = true;
            // Resolves once the last handle on the store is gone (see below).
            let mut released = None;
            loop {
                tokio::select! {
                    served = &mut serve => {
                        served.map_err(|e| Error::Internal(format!("server failed: {e}")))?;
                        break;
                    }
                    set_up = &mut setup, if setting_up => {
                        setting_up = false;
                        match set_up {
                            Ok(stores) => released = Some(stores.released()),
                            Err(error) if !shutdown.is_cancelled() => {
                                shutdown.cancel();
                                return Err(error);
                            }
                            Err(_) => {}
                        }
                    }
                    _ = &mut drain_deadline => {
                        tracing::warn!(grace = ?args.shutdown_grace, "in-flight calls did not finish in time");
                        break;
                    }
                }
            }
            released
        };
        // The services are gone; the background tasks end with the shutdown
        // token. Once the last of them lets go of the store, its file (the
        // embedded store) is free for the next server.
        if let Some(released) = released
            && tokio::time::timeout(args.shutdown_grace, released)
                .await
                .is_err()
        {
            tracing::warn!(grace = ?args.shutdown_grace, "background tasks still hold the store");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The fleetcare services, reachable from the first call and opened once the
/// store is.
#[derive(Clone, Default)]
struct Gates {
    agent_status: Gate<WatchRoute<AgentStatusServiceServer<AgentStatusApi>>>,
    healing: Gate<HealingServiceServer<HealingApi>>,
    post_healing: Gate<PostHealingServiceServer<PostHealingApi>>,
    session_pipeline: Gate<SessionPipelineServiceServer<SessionPipelineApi>>,
    dispatch: Gate<DispatchServiceServer<DispatchApi>>,
    quota: Gate<QuotaServiceServer<QuotaApi>>,
}

/// Opens the store (unless it was opened already), starts the services on
/// it, and says how that went. Every argument is one part of the server this
/// task finishes building.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    args: ServeArgs,
    preopened: Option<Stores>,
    processors: Vec<Registration>,
    metrics: Arc<Metrics>,
    gates: Gates,
    dashboard: Dashboard,
    health: HealthReporter,
    store_health: StoreHealth,
    shutdown: CancellationToken,
    opened: watch::Sender<Opening>,
) {
    let opening = match preopened {
        Some(stores) => Ok(stores),
        // Validated in `build`: the location parses.
        None => match args.store_options() {
            Ok(options) => open_store(&options, &shutdown).await,
            Err(why) => Err(why),
        },
    };
    let stores = match opening {
        Ok(stores) => stores,
        Err(why) => {
            let _ = opened.send(Opening::Failed(why));
            return;
        }
    };
    let started = start_services(
        &args,
        stores.clone(),
        processors,
        metrics,
        &gates,
        &dashboard,
        &health,
        &store_health,
        &shutdown,
    )
    .await;
    let _ = opened.send(match started {
        Ok(()) => Opening::Open(stores),
        Err(Error::Internal(detail)) => Opening::Failed(detail),
        Err(other) => Opening::Failed(other.to_string()),
    });
}

/// Reaches the store, retrying with capped exponential backoff while it is
/// unreachable (each wait logged); any other failure is final.
async fn open_store(
    options: &StoreOptions,
    shutdown: &CancellationToken,
) -> Result<Stores, String> {
    let mut wait = STORE_RETRY_FIRST;
    loop {
        let error = match Stores::open(options, shutdown.child_token()).await {
            Ok(stores) => {
                match &stores.location {
                    StoreLocation::Postgres(_) => tracing::info!("store: postgres"),
                    StoreLocation::Sqlite(path) => {
                        tracing::info!(path = %path.display(), "store: embedded sqlite")
                    }
                }
                return Ok(stores);
            }
            Err(Error::Unavailable(error)) => error,
            Err(Error::Internal(detail)) => return Err(detail),
            Err(other) => return Err(other.to_string()),
        };
        tracing::warn!(%error, retry_in = ?wait, "store unreachable, health NOT_SERVING, retrying");
        tokio::select! {
            _ = shutdown.cancelled() => {
                return Err("shut down before the store was reached".into());
            }
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(STORE_RETRY_MAX);
    }
}

async fn wait_for_store(mut opening: watch::Receiver<Opening>) -> Result<Stores, Error> {
    let state = opening
        .wait_for(|state| !matches!(state, Opening::Waiting))
        .await
        .map_err(|_| Error::Internal("the store opener stopped".into()))?
        .clone();
    match state {
        Opening::Open(stores) => Ok(stores),
        Opening::Failed(why) => Err(Error::Internal(why)),
        Opening::Waiting => unreachable!("waited for a decided state"),
    }
}

/// Starts the background tasks and the services on an open store, opens the
/// gates, and hands health to the store probe.
#[allow(clippy::too_many_arguments)]
async fn start_services(
    args: &ServeArgs,
    stores: Stores,
    processors: Vec<Registration>,
    metrics: Arc<Metrics>,
    gates: &Gates,
    dashboard: &Dashboard,
    health: &HealthReporter,
    store_health: &StoreHealth,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let agents: Arc<dyn AgentStore> = stores.agents.clone();
    metrics.set_store(agents.clone());
    metrics.set_clock(stores.clock.clone());
    let fanout = TransitionFanout::start(
        agents.clone(),
        args.watch_buffer,
        shutdown.child_token(),
        metrics.clone(),
    );
    // The store's clock (a test's manual one moves both).
    let clock = stores.clock.clone();
    let cache = AgentCache::with_flush_window(clock.clone(), args.heartbeat_flush_interval);
    heartbeats::spawn_observer(
        cache.clone(),
        agents.clone(),
        fanout.clone(),
        shutdown.child_token(),
    );
    heartbeats::spawn_flusher(
        cache.clone(),
        agents.clone(),
        args.heartbeat_flush_interval,
        metrics.clone(),
        shutdown.child_token(),
    );
    let committer = Committer::start_publishing(
        agents.clone(),
        clock.clone(),
        cache.clone(),
        args.commit_batch,
        args.commit_pipeline_depth,
        metrics.clone(),
        Some(fanout.local_commits()),
    );
    sweeper::spawn(
        agents.clone(),
        committer.clone(),
        clock.clone(),
        sweeper::SweeperConfig {
            heartbeat_timeout: args.heartbeat_timeout,
            heartbeat_flush_interval: args.heartbeat_flush_interval,
            sweep_interval: args.sweep_interval,
            transition_retention: args.transition_retention,
            offline_agent_retention: chrono_duration(
                "--offline-agent-retention",
                args.offline_agent_retention,
            )
            .map_err(Error::InvalidArgument)?,
            pool_release: pool_release_settings(args)?,
        },
        metrics.clone(),
        shutdown.child_token(),
    );
    // Healing records are pruned as often as transitions are.
    let healing_retention = chrono_duration("--healing-retention", args.healing.healing_retention)
        .map_err(Error::InvalidArgument)?;
    sweeper::spawn_healing_pruner(
        stores.healing.clone(),
        clock.clone(),
        healing_retention,
        sweeper::prune_interval(args.healing.healing_retention, args.sweep_interval),
        shutdown.child_token(),
    );
    let pacing = HeartbeatPacing {
        max_rate: args.max_heartbeat_rate,
        min_interval: chrono_duration("--min-heartbeat-interval", args.min_heartbeat_interval)
            .map_err(Error::InvalidArgument)?,
        heartbeat_timeout: chrono_duration("--heartbeat-timeout", args.heartbeat_timeout)
            .map_err(Error::InvalidArgument)?,
    };
    let guard = Guard::new(cache.clone(), agents.clone());
    let waiters = ClaimWaiters::start(
        &fanout,
        cache.clone(),
        metrics.clone(),
        shutdown.child_token(),
    );
    let writes = AgentWrites::new(
        agents.clone(),
        committer,
        cache,
        clock.clone(),
        pacing,
        args.heartbeat_flush_interval,
    )
    .with_fresh_replies(args.heartbeat_fresh_replies)
    .with_metrics(metrics.clone());
    let shutdown = shutdown.clone();
    let watch_slots = WatchSlots::new(args.limits.max_watches_per_caller);
    let size = args.limits.max_message_size;
    let settings = AgentStatusSettings {
        default_recovery: chrono::Duration::from_std(args.default_recovery)
            .map_err(|_| Error::invalid("--default-recovery is too large"))?,
        default_billing_recovery: chrono::Duration::from_std(args.default_billing_recovery)
            .map_err(|_| Error::invalid("--default-billing-recovery is too large"))?,
        watch_progress_interval: args.watch_progress_interval,
    };
    let quota = QuotaApi::new(writes.clone(), guard.clone(), pool_release_settings(args)?);
    let dispatch = DispatchApi::new(
        agents.clone(),
        writes.clone(),
        guard.clone(),
        waiters,
        dispatch_settings(args)?,
        metrics.clone(),
    );
    let agent_status = AgentStatusApi::new(
        stores.agents.clone(),
        writes,
        fanout,
        settings,
        shutdown.clone(),
        guard.clone(),
    );
    let h = &args.healing;
    let duration = |flag: &str, value| {
        crate::config::chrono_duration(flag, value).map_err(Error::InvalidArgument)
    };
    let rng = shared_rng(h.healing_seed);
    let healing = HealingApi::new(
        stores.healing.clone(),
        HealingSettings {
            planner: PlannerConfig {
                safety_limit: h.safety_limit,
                ..PlannerConfig::default()
            },
            recovery_lease: duration("--recovery-lease", h.recovery_lease)?,
            policy: healing_policy(args, shutdown.child_token())?,
        },
        rng.clone(),
        guard.clone(),
    )
    .with_metrics(metrics.clone());
    let post_config = PostHealingConfig {
        window: duration("--post-window", h.post_window)?,
        max_actions_per_window: h.post_max_actions_per_window,
        cooldown_comment: duration("--post-cooldown-comment", h.post_cooldown_comment)?,
        cooldown_edit: duration("--post-cooldown-edit", h.post_cooldown_edit)?,
        cooldown_thread: duration("--post-cooldown-thread", h.post_cooldown_thread)?,
        claim_lease: duration("--post-claim-lease", h.post_claim_lease)?,
        max_attempts: h.post_max_attempts,
        healthy_rate: h.post_healthy_rate,
        min_impressions: h.post_min_impressions,
        ..PostHealingConfig::default()
    };
    let post_healing = PostHealingApi::new(stores.posts.clone(), post_config, rng, guard.clone())
        .with_metrics(metrics.clone());
    let p = &args.pipeline;
    let pipeline = Pipeline::new(
        stores.pipeline.clone(),
        PipelineConfig {
            root: p.session_dir.clone(),
            retry: RetryPolicy {
                max_attempts: p.max_attempts,
                base_delay: duration("--pipeline-retry-base", p.pipeline_retry_base)?,
                ..RetryPolicy::default()
            },
            intervals: [
                ("usage".to_string(), p.pipeline_interval_usage),
                ("errors".to_string(), p.pipeline_interval_errors),
            ]
            .into(),
            parallelism: crate::runtime::pipeline::default_parallelism(),
            run_retention: p.run_retention,
            clock: clock.clone(),
        },
        processors,
        shutdown.clone(),
    )
    .with_metrics(metrics.clone());
    pipeline_scheduler::spawn(pipeline.clone(), shutdown.clone());
    let session_pipeline = SessionPipelineApi::new(pipeline, shutdown.clone(), guard)
        .with_watch_slots(watch_slots.clone());
    let agent_status = Arc::new(agent_status.with_watch_slots(watch_slots));
    let healing = Arc::new(healing);
    let session_pipeline = Arc::new(session_pipeline);
    let dispatch = Arc::new(dispatch);
    let quota = Arc::new(quota);
    // The dashboard's API calls the same service implementations.
    dashboard.open(Apis {
        agents: agent_status.clone(),
        dispatch: dispatch.clone(),
        healing: healing.clone(),
        pipeline: session_pipeline.clone(),
        quota: quota.clone(),
    });

    gates.agent_status.open(WatchRoute::new(
        AgentStatusServiceServer::from_arc(agent_status.clone())
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
        agent_status,
        size,
    ));
    gates.healing.open(
        HealingServiceServer::from_arc(healing)
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
    );
    gates.post_healing.open(
        PostHealingServiceServer::new(post_healing)
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
    );
    gates.session_pipeline.open(
        SessionPipelineServiceServer::from_arc(session_pipeline)
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
    );
    gates.dispatch.open(
        DispatchServiceServer::from_arc(dispatch)
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
    );
    gates.quota.open(
        QuotaServiceServer::from_arc(quota.clone())
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
    );
    // The store answered (it just ran migrations): serving, and from here on the
    // probe decides.
    store_health.set_up(true);
    if shutdown.is_cancelled() {
        // Shutdown owns the health status.
        return Ok(());
    }
    health::set_all(health, ServingStatus::Serving).await;
    health::spawn_monitor(
        agents,
        health.clone(),
        store_health.clone(),
        args.health_check_interval,
        shutdown,
    );
    tracing::info!("store open, serving");
    Ok(())
}

/// The quota pools' release settings (`--pool-canary-timeout`,
/// `--pool-release-spread`, `--pool-release-rate`), each checked by the
/// domain's rules.
/// The remediation policy: the flags', checked by the domain, with
/// `--healing-policy` read over it and watched (a bad file stops the start
/// naming its line).
fn healing_policy(
    args: &ServeArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Arc<PolicyHandle>, Error> {
    let h = &args.healing;
    let duration = |flag: &str, value| chrono_duration(flag, value).map_err(Error::InvalidArgument);
    let base = HealingPolicy {
        max_unhealthy_percent: h.healing_max_unhealthy,
        min_unhealthy: h.healing_min_unhealthy,
        group_by: h.healing_group_by.clone(),
        max_plans_per_minute: h.healing_max_plans_per_minute,
        max_group_plans_per_minute: h.healing_max_group_plans_per_minute,
        retry_budget: h.healing_retry_budget,
        retry_window: duration("--healing-retry-window", h.healing_retry_window)?,
        min_healthy_period: duration("--healing-min-healthy-period", h.healing_min_healthy_period)?,
        breaker_failures: h.healing_breaker_failures,
        breaker_cooldown: duration("--healing-breaker-cooldown", h.healing_breaker_cooldown)?,
        dry_run: h.healing_dry_run,
        brakes: h.healing_brakes,
    }
    .checked(|key| {
        let flag = match key {
            "max_unhealthy_percent" => "max-unhealthy",
            other => return format!("--healing-{}", other.replace('_', "-")),
        };
        format!("--healing-{flag}")
    })
    .map_err(Error::InvalidArgument)?;
    match &h.healing_policy {
        Some(path) => PolicyHandle::watch(path, base, RELOAD_INTERVAL, shutdown),
        None => Ok(PolicyHandle::fixed(base)),
    }
}

fn pool_release_settings(args: &ServeArgs) -> Result<crate::domain::quota::ReleaseSettings, Error> {
    crate::domain::quota::ReleaseSettings::new(
        chrono_duration("--pool-canary-timeout", args.pool_canary_timeout)
            .map_err(Error::InvalidArgument)?,
        chrono_duration("--pool-release-spread", args.pool_release_spread)
            .map_err(Error::InvalidArgument)?,
        args.pool_release_rate,
    )
    .map_err(Error::InvalidArgument)
}

/// The dispatch service's settings, checked by the domain's rules.
fn dispatch_settings(args: &ServeArgs) -> Result<DispatchSettings, Error> {
    Ok(DispatchSettings {
        max_claim_lease: chrono_duration("--max-claim-lease", args.max_claim_lease)
            .and_then(crate::domain::dispatch::max_claim_lease_setting)
            .map_err(Error::InvalidArgument)?,
    })
}
