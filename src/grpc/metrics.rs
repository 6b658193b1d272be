//! The tower layer that times every call by service, method and gRPC status
//! code (`fleetcare_rpc_duration_seconds`, `transport="grpc"`). It sits
//! outside the guard, so refusals (store down, server busy) are counted too.
//! The dashboard's API times its in-process calls with the same [`Timing`]
//! (`transport="http"`).
//!
//! A call is recorded once, when it is over, with its final code: from the
//! response headers for a trailers-only answer (every refusal and error before
//! the first message), else from the trailers when the body ends (a stream's
//! OK at its end, OUT_OF_RANGE or UNAVAILABLE in the middle of it). A body
//! dropped before its trailers (the client cancelled, or went away) is
//! `CANCELLED`. A server stream is so timed from its call to its end.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;
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
        Some(code) => code_of(code),
        None => "UNKNOWN",
    }
}

/// The canonical name of a numeric gRPC status code.
pub fn code_of(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
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
        let mut timing = Timing::start(self.metrics.clone(), service, method, GRPC);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = match call.await {
                Ok(response) => response,
                Err(error) => {
                    timing.record("UNKNOWN");
                    return Err(error);
                }
            };
            if let Some(code) = response.headers().get("grpc-status") {
                // Trailers-only: the call is over.
                timing.record(code_name(Some(code.as_bytes())));
                return Ok(response);
            }
            Ok(response.map(|inner| Body::new(MeteredBody { inner, timing })))
        })
    }
}

/// The `transport` label of a call that came over gRPC.
pub const GRPC: &str = "grpc";
/// The `transport` label of a dashboard API call (`http::api`).
pub const HTTP: &str = "http";

/// One call's labels and start, recorded once: with the first code given to
/// [`Timing::record`], or `CANCELLED` when dropped before (the client went
/// away before the answer, or before the end of the stream). The dashboard's
/// API times its calls into the services with it too (transport `http`).
pub struct Timing {
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    transport: &'static str,
    started: Instant,
    recorded: bool,
}

impl Timing {
    /// `service` and `method` must come from a fixed set (never from the caller).
    pub fn start(
        metrics: Arc<Metrics>,
        service: String,
        method: String,
        transport: &'static str,
    ) -> Timing {
        Timing {
            metrics,
            service,
            method,
            transport,
            started: Instant::now(),
            recorded: false,
        }
    }

    pub fn record(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.metrics
            .rpc_duration
            .get_or_create(&RpcLabels {
                service: std::mem::take(&mut self.service),
                method: std::mem::take(&mut self.method),
                code,
                transport: self.transport,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Records the code of `status`.
    pub fn record_status(&mut self, status: &Status) {
        self.record(code_of(status.code() as i32));
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

/// The response body, timing the call until its trailers.
struct MeteredBody {
    inner: Body,
    timing: Timing,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.timing
                        .record(code_name(trailers.get("grpc-status").map(|v| v.as_bytes())));
                }
            }
            Poll::Ready(Some(Err(status))) => this.timing.record(code_of(status.code() as i32)),
            // Ended without trailers: not a gRPC answer.
            Poll::Ready(None) => this.timing.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
        assert_eq!(code_name(Some(b"99")), "UNKNOWN");
        assert_eq!(code_of(tonic::Code::OutOfRange as i32), "OUT_OF_RANGE");
    }
}
