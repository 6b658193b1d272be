//! The tower layer that times every call by service, method and gRPC status
//! code (`fleetcare_rpc_duration_seconds`). It sits outside the guard, so
//! refusals (store down, server busy) are counted too.
//!
//! The code is read from the response headers: a unary call's error is a
//! trailers-only response, so its code is there; a response whose status comes
//! in the trailers is OK as far as its headers go. A server stream is timed to
//! its response headers (its opening), not to its end.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use crate::metrics::{Metrics, RpcLabels};

/// Every `/package.Service/Method` path this server serves: anything else is
/// labelled `unknown`, so a caller cannot grow the label set.
fn known_paths() -> &'static HashSet<String> {
    static PATHS: OnceLock<HashSet<String>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let mut paths = HashSet::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = format!("{package}.{}", service.name.unwrap_or_default());
                    for method in service.method {
                        paths.insert(format!(
                            "/{service_name}/{}",
                            method.name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        for reflection in ["grpc.reflection.v1", "grpc.reflection.v1alpha"] {
            paths.insert(format!(
                "/{reflection}.ServerReflection/ServerReflectionInfo"
            ));
        }
        paths
    })
}

/// (service, method) of a request path, `unknown` for one this server does not serve.
pub fn labels_of(path: &str) -> (String, String) {
    if known_paths().contains(path)
        && let Some((service, method)) = path.trim_start_matches('/').split_once('/')
    {
        return (service.to_owned(), method.to_owned());
    }
    ("unknown".to_owned(), "unknown".to_owned())
}

/// The canonical name of a gRPC status code, as `grpc-status` carries it.
pub fn code_name(code: Option<&[u8]>) -> &'static str {
    let Some(code) = code else { return "OK" };
    match std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<i32>().ok())
    {
        Some(0) => "OK",
        Some(1) => "CANCELLED",
        Some(2) => "UNKNOWN",
        Some(3) => "INVALID_ARGUMENT",
        Some(4) => "DEADLINE_EXCEEDED",
        Some(5) => "NOT_FOUND",
        Some(6) => "ALREADY_EXISTS",
        Some(7) => "PERMISSION_DENIED",
        Some(8) => "RESOURCE_EXHAUSTED",
        Some(9) => "FAILED_PRECONDITION",
        Some(10) => "ABORTED",
        Some(11) => "OUT_OF_RANGE",
        Some(12) => "UNIMPLEMENTED",
        Some(13) => "INTERNAL",
        Some(14) => "UNAVAILABLE",
        Some(15) => "DATA_LOSS",
        Some(16) => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<Body>> for RpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (service, method) = labels_of(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => {
                    code_name(response.headers().get("grpc-status").map(|v| v.as_bytes()))
                }
                Err(_) => "UNKNOWN",
            };
            metrics
                .rpc_duration
                .get_or_create(&RpcLabels {
                    service,
                    method,
                    code,
                })
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        assert_eq!(
            labels_of("/fleetcare.v1.AgentStatusService/Heartbeat"),
            (
                "fleetcare.v1.AgentStatusService".to_owned(),
                "Heartbeat".to_owned()
            )
        );
        assert_eq!(
            labels_of("/grpc.health.v1.Health/Check").1,
            "Check".to_owned()
        );
        for made_up in ["/fleetcare.v1.AgentStatusService/Nope", "/x/y", "/", ""] {
            assert_eq!(labels_of(made_up).0, "unknown", "{made_up}");
        }
        assert_eq!(code_name(None), "OK");
        assert_eq!(code_name(Some(b"14")), "UNAVAILABLE");
        assert_eq!(code_name(Some(b"x")), "UNKNOWN");
    }
}
