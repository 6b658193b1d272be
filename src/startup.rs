//! Builds the server from its configuration and runs it until shutdown.
//!
//! Tests bind a listener on port 0 first and pass it in, so they know the
//! address before the server runs and never sleep waiting for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{ServeArgs, chrono_duration};
use crate::domain::healing::PlannerConfig;
use crate::domain::liveness::HeartbeatPacing;
use crate::domain::pipeline::RetryPolicy;
use crate::domain::post_healing::PostHealingConfig;
use crate::error::Error;
use crate::grpc::agent_status::{AgentStatusApi, AgentStatusSettings};
use crate::grpc::healing::{HealingApi, HealingSettings, PostHealingApi, shared_rng};
use crate::grpc::session_pipeline::SessionPipelineApi;
use crate::processors::Registration;
use crate::proto::v1::agent_status_service_server::AgentStatusServiceServer;
use crate::proto::v1::healing_service_server::HealingServiceServer;
use crate::proto::v1::post_healing_service_server::PostHealingServiceServer;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineServiceServer;
use crate::runtime::agents::AgentWrites;
use crate::runtime::clock::Clock;
use crate::runtime::committer::Committer;
use crate::runtime::heartbeats::{self, AgentCache};
use crate::runtime::pipeline::scheduler as pipeline_scheduler;
use crate::runtime::pipeline::{Pipeline, PipelineConfig};
use crate::runtime::{fanout::TransitionFanout, health, sweeper};
use crate::storage::{AgentStore, Stores};
use crate::tls::ServerTls;

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
    /// TLS, when `--tls-cert`/`--tls-key` are given; plaintext otherwise.
    tls: Option<ServerTls>,
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
        // The TLS files are read before anything starts, so a bad path or
        // pair fails the start with the flag's name.
        let tls = match args.tls.files().map_err(Error::InvalidArgument)? {
            Some(files) => Some(ServerTls::load(files).map_err(Error::InvalidArgument)?),
            None => None,
        };
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
            tls,
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
            tls,
        } = self;
        let released = stores.released();
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
        let post_healing = PostHealingApi::new(stores.posts.clone(), post_config, rng);
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
        drop(stores);
        pipeline_scheduler::spawn(pipeline.clone(), shutdown.clone());
        let session_pipeline = SessionPipelineApi::new(pipeline, shutdown.clone());

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
        let router = Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AgentStatusServiceServer::new(agent_status))
            .add_service(HealingServiceServer::new(healing))
            .add_service(PostHealingServiceServer::new(post_healing))
            .add_service(SessionPipelineServiceServer::new(session_pipeline));
        // TLS, when configured, is terminated on the accepted TCP streams (see
        // `tls`): handshakes in tasks of their own, certificates reloaded.
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
        tokio::select! {
            served = serve => served.map_err(|e| Error::Internal(format!("server failed: {e}")))?,
            _ = drain_deadline => {
                tracing::warn!(grace = ?args.shutdown_grace, "in-flight calls did not finish in time");
            }
        }
        // The services are gone; the background tasks end with the shutdown
        // token. Once the last of them lets go of the store, its file (the
        // embedded store) is free for the next server.
        if tokio::time::timeout(args.shutdown_grace, released)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?args.shutdown_grace, "background tasks still hold the store");
        }
        tracing::info!("stopped");
        Ok(())
    }
}
