//! The HTTP listener beside the gRPC one (`--http-listen`): `/metrics` in the
//! Prometheus text format, and the dashboard: its page (`/`, embedded assets,
//! see [`assets`]) and its JSON + SSE API under `/api/v1/` (see [`api`]). It
//! stops with the server's shutdown token.
//!
//! Every URL the page uses is relative, so the dashboard also works behind a
//! reverse proxy that strips a path prefix (`/fleetcare/` to `/`).

pub mod api;
pub mod assets;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::{Apis, Dashboard};

use crate::metrics::Metrics;

/// The routes: metrics, the page's assets, the API.
pub fn router(metrics: Arc<Metrics>, dashboard: Dashboard) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    Router::new()
        .nest("/api/v1", api::routes())
        .with_state(dashboard)
        .merge(assets::routes())
        .merge(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        metrics.render().await,
    )
}

/// Serves on `listener` until `shutdown` fires (open dashboard streams end
/// with it, as gRPC watch streams do).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    dashboard: Dashboard,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(metrics, dashboard).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}
