//! Builds the server from its configuration and runs it until shutdown.
//!
//! Tests bind a listener on port 0 first and pass it in, so they know the
//! address before the server runs and never sleep waiting for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{Exposure, ServeArgs, chrono_duration};
use crate::domain::healing::PlannerConfig;
use crate::domain::liveness::HeartbeatPacing;
use crate::domain::pipeline::RetryPolicy;
use crate::domain::post_healing::PostHealingConfig;
use crate::error::Error;
use crate::grpc::agent_status::{AgentStatusApi, AgentStatusSettings};
use crate::grpc::auth::{Authenticate, Guard};
use crate::grpc::healing::{HealingApi, HealingSettings, PostHealingApi, shared_rng};
use crate::grpc::session_pipeline::SessionPipelineApi;
use crate::processors::Registration;
use crate::proto::v1::agent_status_service_server::AgentStatusServiceServer;
use crate::proto::v1::healing_service_server::HealingServiceServer;
use crate::proto::v1::post_healing_service_server::PostHealingServiceServer;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineServiceServer;
use crate::runtime::agents::AgentWrites;
use crate::runtime::auth::{Callers, RELOAD_INTERVAL};
use crate::runtime::clock::Clock;
use crate::runtime::committer::Committer;
use crate::runtime::heartbeats::{self, AgentCache};
use crate::runtime::pipeline::scheduler as pipeline_scheduler;
use crate::runtime::pipeline::{Pipeline, PipelineConfig};
use crate::runtime::{fanout::TransitionFanout, health, sweeper};
use crate::storage::{AgentStore, Stores};

/// A vanished client's connection is noticed within interval + timeout.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

pub struct Application {
    listener: TcpListener,
    args: ServeArgs,
    stores: Stores,
    writes: AgentWrites,
    fanout: TransitionFanout,
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    shutdown: CancellationToken,
    /// The session processors; `processors::registry()` unless replaced.
    processors: Vec<Registration>,
    /// Who may call (the auth file's callers, or the anonymous operator).
    callers: Arc<Callers>,
    guard: Guard,
}

impl Application {
    /// Connects to the store, applies migrations and starts the background tasks.
    /// Everything stops when `shutdown` fires.
    pub async fn build(
        args: ServeArgs,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        args.validate().map_err(Error::InvalidArgument)?;
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
        let stores = Stores::open(&args.database, shutdown.child_token()).await?;
        match &stores.location {
            crate::config::StoreLocation::Postgres(_) => tracing::info!("store: postgres"),
            crate::config::StoreLocation::Sqlite(path) => {
                tracing::info!(path = %path.display(), "store: embedded sqlite")
            }
        }
        let agents: Arc<dyn AgentStore> = stores.agents.clone();
        let fanout =
            TransitionFanout::start(agents.clone(), args.watch_buffer, shutdown.child_token());
        let clock = Clock::system();
        let cache = AgentCache::new();
        heartbeats::spawn_observer(
            cache.clone(),
            agents.clone(),
            fanout.subscribe(),
            shutdown.child_token(),
        );
        heartbeats::spawn_flusher(
            cache.clone(),
            agents.clone(),
            args.heartbeat_flush_interval,
            shutdown.child_token(),
        );
        let committer = Committer::start(
            agents.clone(),
            clock.clone(),
            cache.clone(),
            args.commit_batch,
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
            },
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
        let writes = AgentWrites::new(agents.clone(), committer, cache, clock, pacing);
        let health = HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        // The store answered (it just ran migrations): serving from the first call,
        // so a health Watch never sees an unknown service.
        health::set_all(&health, ServingStatus::Serving).await;
        health::spawn_monitor(
            agents,
            health.clone(),
            args.health_check_interval,
            shutdown.clone(),
        );
        Ok(Application {
            listener,
            args,
            stores,
            writes,
            fanout,
            health,
            health_service,
            shutdown,
            processors: crate::processors::registry(),
            callers,
            guard,
        })
    }

    /// Runs these session processors instead of the built-in ones (tests pass
    /// processors they can hold open).
    pub fn with_processors(mut self, processors: Vec<Registration>) -> Self {
        self.processors = processors;
        self
    }

    /// The store this server runs on (tests and benches read it directly).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then: health NOT_SERVING, no new calls, watch
    /// streams ended, in-flight calls given `--shutdown-grace` to finish.
    pub async fn run(self) -> Result<(), Error> {
        let Application {
            listener,
            args,
            stores,
            writes,
            fanout,
            health,
            health_service,
            shutdown,
            processors,
            callers,
            guard,
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

        let settings = AgentStatusSettings {
            default_recovery: chrono::Duration::from_std(args.default_recovery)
                .map_err(|_| Error::invalid("--default-recovery is too large"))?,
            default_billing_recovery: chrono::Duration::from_std(args.default_billing_recovery)
                .map_err(|_| Error::invalid("--default-billing-recovery is too large"))?,
            watch_progress_interval: args.watch_progress_interval,
        };
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
            },
            rng.clone(),
            guard.clone(),
        );
        let post_config = PostHealingConfig {
            window: duration("--post-window", h.post_window)?,
            max_actions_per_window: h.post_max_actions_per_window,
            cooldown_comment: duration("--post-cooldown-comment", h.post_cooldown_comment)?,
            cooldown_edit: duration("--post-cooldown-edit", h.post_cooldown_edit)?,
            cooldown_thread: duration("--post-cooldown-thread", h.post_cooldown_thread)?,
            claim_lease: duration("--post-claim-lease", h.post_claim_lease)?,
            max_attempts: h.post_max_attempts,
            ..PostHealingConfig::default()
        };
        let post_healing =
            PostHealingApi::new(stores.posts.clone(), post_config, rng, guard.clone());
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
            },
            processors,
            shutdown.clone(),
        );
        pipeline_scheduler::spawn(pipeline.clone(), shutdown.clone());
        let session_pipeline = SessionPipelineApi::new(pipeline, shutdown.clone(), guard);
        let authenticate = Authenticate(callers);

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
        // The listener comes from outside (tests bind port 0 first), so the
        // per-connection socket options are set here: without TCP_NODELAY, Nagle
        // holds a response's last frame until the client's delayed ACK.
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let serve = Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            // Health and reflection answer without a token; every fleetcare
            // service goes through the authenticating interceptor.
            .add_service(AgentStatusServiceServer::with_interceptor(
                agent_status,
                authenticate.clone(),
            ))
            .add_service(HealingServiceServer::with_interceptor(
                healing,
                authenticate.clone(),
            ))
            .add_service(PostHealingServiceServer::with_interceptor(
                post_healing,
                authenticate.clone(),
            ))
            .add_service(SessionPipelineServiceServer::with_interceptor(
                session_pipeline,
                authenticate,
            ))
            .serve_with_incoming_shutdown(incoming, stopping);
        let drain_deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(args.shutdown_grace).await;
        };
        tokio::select! {
            served = serve => served.map_err(|e| Error::Internal(format!("server failed: {e}")))?,
            _ = drain_deadline => {
                tracing::warn!(grace = ?args.shutdown_grace, "in-flight calls did not finish in time");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}
