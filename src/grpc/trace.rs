//! The tower layer that gives every call a span, `rpc`, in front of
//! everything else (the guard's refusals included):
//!
//! - `rpc.service`, `rpc.method` from the path; `rpc.grpc.status_code` once
//!   it is known: from the response headers (a trailers-only answer, every
//!   error) or from the trailers when the body ends, `CANCELLED` (1) when the
//!   body is dropped before its trailers (the client went away); `latency_ms` when the
//!   response body is done (for a stream: when it ends); `agent_id`, recorded
//!   by the handlers that have one ([`record_agent_id`]).
//! - `otel.name` (`package.Service/Method`, the OpenTelemetry convention),
//!   `otel.kind = server`, `otel.status_code = ERROR` on a non-OK status.
//! - A W3C `traceparent` (and `tracestate`) on the call becomes the span's
//!   remote parent, so a caller's trace continues into fleetcare.
//!
//! Health and reflection calls get the same span at debug level: a load
//! balancer's probes stay out of the exported traces by default.
//!
//! The span is entered while the handler runs and while a streamed body is
//! polled, so log lines inside a call carry its fields when the logs take it
//! (not by default: see `telemetry::DEFAULT_LOG_FILTER`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Records the agent a call is about on the current call's span (a no-op
/// outside one).
pub fn record_agent_id(agent_id: &str) {
    tracing::Span::current().record("agent_id", agent_id);
}

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let span = call_span(request.uri().path(), request.headers());
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(async move {
            let response = future.instrument(span.clone()).await?;
            let status_known = match grpc_status(response.headers()) {
                Some(code) => {
                    record_status(&span, code);
                    true
                }
                None => false,
            };
            Ok(response.map(|inner| {
                Body::new(TracedBody {
                    inner,
                    span,
                    started,
                    status_known,
                })
            }))
        })
    }
}

/// Calls that are not fleetcare's own: traced at debug level.
fn infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The span's target is this module's path, `fleetcare::grpc::trace`, which
/// the default log filter (`telemetry::DEFAULT_LOG_FILTER`) leaves out.
fn call_span(path: &str, headers: &HeaderMap) -> tracing::Span {
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    macro_rules! rpc_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "rpc",
                otel.name = name,
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                agent_id = Empty,
                latency_ms = Empty,
            )
        };
    }
    let span = if infrastructure(path) {
        rpc_span!(tracing::Level::DEBUG)
    } else {
        rpc_span!(tracing::Level::INFO)
    };
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            // Fails only when no OpenTelemetry layer is installed (no export).
            let _ = span.set_parent(parent);
        }
    }
    span
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn record_status(span: &tracing::Span, code: i32) {
    span.record("rpc.grpc.status_code", code);
    if code != tonic::Code::Ok as i32 {
        span.record("otel.status_code", "ERROR");
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The response body, holding the call's span open until it is done: the
/// status from its trailers (`CANCELLED` when it is dropped before them: the
/// client went away), the latency when it is dropped.
struct TracedBody {
    inner: Body,
    span: tracing::Span,
    started: Instant,
    status_known: bool,
}

impl http_body::Body for TracedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(grpc_status)
        {
            record_status(&this.span, code);
            this.status_known = true;
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

impl Drop for TracedBody {
    fn drop(&mut self) {
        if !self.status_known {
            record_status(&self.span, tonic::Code::Cancelled as i32);
        }
        let latency = self.started.elapsed().as_secs_f64() * 1000.0;
        self.span.record("latency_ms", latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_reflection_are_infrastructure() {
        assert!(infrastructure("/grpc.health.v1.Health/Check"));
        assert!(infrastructure(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!infrastructure(
            "/fleetcare.v1.HealingService/RequestRecovery"
        ));
    }

    #[test]
    fn the_status_is_read_from_headers_or_trailers() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(5));
    }

    #[test]
    fn a_traceparent_is_extracted_as_the_remote_parent() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        let parent = cx.span().span_context().clone();
        assert!(parent.is_remote());
        assert_eq!(
            parent.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.span_id().to_string(), "00f067aa0ba902b7");
    }
}
