//! What lets a call in, written once for the gRPC server and the dashboard's
//! API ([`Admission::admit`]), and the tower layer that applies it in front of
//! every gRPC call ([`Admission::layer`]), with the codes tonic's own refusals
//! are answered with. In this order:
//!
//! - While the store is known to be down ([`StoreHealth`], set by the health
//!   probe, backend-neutral), a fleetcare call fails at once UNAVAILABLE
//!   ("database unreachable, retrying") instead of waiting the whole
//!   `--db-acquire-timeout`: a caller with a short deadline sees UNAVAILABLE,
//!   which it retries, not DEADLINE_EXCEEDED. (Before the store is first open,
//!   [`Gate`] answers the same.)
//! - At most `--max-concurrent-calls` calls run at once, gRPC and dashboard
//!   calls alike: one beyond is RESOURCE_EXHAUSTED at once, never queued.
//! - The caller is found from `authorization: Bearer <token>`
//!   (`runtime::auth::Callers`) and put into the request's extensions, where
//!   the handlers find it (`grpc::auth::caller`); no valid token is
//!   UNAUTHENTICATED.
//! - A request over `--max-message-size` is answered RESOURCE_EXHAUSTED, the
//!   gRPC convention, where tonic answers OUT_OF_RANGE.
//!
//! Health and reflection pass untouched: a load balancer must see
//! NOT_SERVING, not a refusal, and needs no token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service, ServiceExt};

use crate::domain::auth::Caller;
use crate::runtime::auth::Callers;
pub use crate::runtime::health::StoreHealth;

/// What a call refused while the store is down is told.
pub const STORE_DOWN: &str = "database unreachable, retrying";

/// Paths that are never refused: health and reflection.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// The server's admission of calls: the store's health, the server-wide cap
/// on calls in progress (`--max-concurrent-calls`, one semaphore however often
/// this is cloned) and the callers. The gRPC layer and the dashboard's API
/// hold clones of one, so both refuse alike and count against one limit.
#[derive(Clone)]
pub struct Admission {
    store: StoreHealth,
    calls: Arc<Semaphore>,
    max_calls: usize,
    callers: Arc<Callers>,
}

/// A call let in: who makes it, and its slot of the call limit (held until
/// dropped).
pub struct Admitted {
    pub caller: Arc<Caller>,
    pub slot: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(store: StoreHealth, max_concurrent_calls: usize, callers: Arc<Callers>) -> Self {
        Admission {
            store,
            calls: Arc::new(Semaphore::new(max_concurrent_calls)),
            max_calls: max_concurrent_calls,
            callers,
        }
    }

    /// Lets a call in, or says why not: the store down (UNAVAILABLE), every
    /// slot taken (RESOURCE_EXHAUSTED), no valid token (UNAUTHENTICATED), in
    /// that order. `authorization` is the header's value; `peer` only names
    /// the caller in the log line of a refused token (never the token).
    pub fn admit(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<SocketAddr>,
    ) -> Result<Admitted, Status> {
        if !self.store.is_up() {
            return Err(Status::unavailable(STORE_DOWN));
        }
        let slot = self
            .calls
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(self.max_calls))?;
        let caller = self.callers.authenticate(authorization).map_err(|error| {
            let peer = peer.map(|p| p.to_string());
            tracing::warn!(peer = peer.as_deref().unwrap_or("-"), %error, "unauthenticated call");
            Status::from(error)
        })?;
        Ok(Admitted { caller, slot })
    }

    /// The tower layer that admits every gRPC call but health and reflection.
    pub fn layer(&self) -> AdmissionLayer {
        AdmissionLayer(self.clone())
    }
}

/// What a call beyond the limit is told.
fn busy(max_calls: usize) -> Status {
    Status::resource_exhausted(format!(
        "server busy: {max_calls} calls in progress (--max-concurrent-calls), retry later"
    ))
}

/// The peer of a gRPC request, plain or over TLS (what tonic's
/// `Request::remote_addr` reads, before tonic has made one).
fn peer<B>(request: &Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// See [`Admission::layer`].
#[derive(Clone)]
pub struct AdmissionLayer(Admission);

impl<S> Layer<S> for AdmissionLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            admission: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    admission: Admission,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> Service<Request<Body>> for Guard<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Admission is decided per call below, and never waits.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        if exempt(request.uri().path()) {
            return Box::pin(async move {
                let response = inner.oneshot(request).await.map_err(Into::into)?;
                Ok(remap_decode_refusal(response))
            });
        }
        let authorization = request
            .headers()
            .get("authorization")
            .map(HeaderValue::as_bytes);
        match self.admission.admit(authorization, peer(&request)) {
            Err(refused) => Box::pin(async move { Ok(refused.into_http()) }),
            Ok(Admitted { caller, slot }) => {
                request.extensions_mut().insert(caller);
                Box::pin(async move {
                    let response = inner.oneshot(request).await.map_err(Into::into);
                    // The slot is held until the handler has answered (for a
                    // stream: until it started).
                    drop(slot);
                    Ok(remap_size_refusal(response?))
                })
            }
        }
    }
}

/// A service that exists from the first call but answers only once `open`ed:
/// the router is complete while the store is still being reached, and until
/// then its calls fail UNAVAILABLE.
pub struct Gate<S> {
    inner: Arc<std::sync::OnceLock<S>>,
}

impl<S> Gate<S> {
    pub fn new() -> Self {
        Gate {
            inner: Arc::default(),
        }
    }

    /// Lets calls through to `service` from now on (once; later calls are ignored).
    pub fn open(&self, service: S) {
        let _ = self.inner.set(service);
    }
}

impl<S> Default for Gate<S> {
    fn default() -> Self {
        Gate::new()
    }
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate {
            inner: self.inner.clone(),
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self.inner.get() {
            Some(service) => Box::pin(service.clone().oneshot(request)),
            None => Box::pin(async { Ok(Status::unavailable(STORE_DOWN).into_http()) }),
        }
    }
}

/// tonic answers a request over the decoding limit OUT_OF_RANGE in a
/// trailers-only response; the gRPC convention for a size limit is
/// RESOURCE_EXHAUSTED. Only tonic's own message is rewritten: OUT_OF_RANGE
/// from a handler (a pruned watch revision) passes unchanged.
fn remap_size_refusal(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers();
    let is_out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let is_size_refusal = is_out_of_range
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if is_size_refusal {
        let headers = response.headers_mut();
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("request%20message%20larger%20than%20--max-message-size"),
        );
    }
    response
}

/// Health and reflection decode with tonic-prost's own codec, which answers a
/// malformed request INTERNAL: the caller's fault is INVALID_ARGUMENT (the
/// fleetcare services get that from `grpc::codec`).
fn remap_decode_refusal(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers();
    let is_decode_refusal = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"13")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("decode%20Protobuf%20message") || m.contains("decode Protobuf message")
            });
    if is_decode_refusal {
        let headers = response.headers_mut();
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("message%20is%20not%20valid%20protobuf"),
        );
    }
    response
}

/// A trailers-only response, for tests.
#[cfg(test)]
fn trailers_only(code: &'static str, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", HeaderValue::from_static(code));
    response
        .headers_mut()
        .insert("grpc-message", HeaderValue::from_static(message));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_size_refusal_becomes_resource_exhausted() {
        let size = trailers_only(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205000000%20bytes",
        );
        assert_eq!(remap_size_refusal(size).headers()["grpc-status"], "8");
        let pruned = trailers_only("11", "revision%203%20was%20pruned");
        assert_eq!(remap_size_refusal(pruned).headers()["grpc-status"], "11");
    }

    #[test]
    fn a_decode_failure_of_health_is_invalid_argument() {
        let decode = trailers_only(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type",
        );
        assert_eq!(remap_decode_refusal(decode).headers()["grpc-status"], "3");
        let other = trailers_only("13", "internal%20error");
        assert_eq!(remap_decode_refusal(other).headers()["grpc-status"], "13");
    }

    fn admission(store: &StoreHealth, max_calls: usize) -> Admission {
        Admission::new(store.clone(), max_calls, Callers::open())
    }

    #[tokio::test]
    async fn the_call_limit_is_shared_with_whoever_else_admits_calls() {
        let store = StoreHealth::default();
        store.set_up(true);
        let ok = tower::service_fn(|request: Request<Body>| async move {
            assert!(
                request.extensions().get::<Arc<Caller>>().is_some(),
                "the handler finds the caller"
            );
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let admission = admission(&store, 1);
        let guard = admission.layer().layer(ok);
        let call = || {
            let request = Request::builder()
                .uri("/fleetcare.v1.AgentStatusService/ListAgents")
                .body(Body::empty())
                .unwrap();
            guard.clone().oneshot(request)
        };
        // A dashboard call holds the one slot: a gRPC call is shed, and a
        // second dashboard call is refused the same way.
        let held = admission.admit(None, None).expect("a free slot");
        assert_eq!(call().await.unwrap().headers()["grpc-status"], "8");
        let Err(refused) = admission.admit(None, None) else {
            panic!("a second call while the only slot is held is admitted");
        };
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-concurrent-calls"));
        drop(held);
        let again = call().await.unwrap();
        assert!(again.headers().get("grpc-status").is_none());
        assert!(
            admission.admit(None, None).is_ok(),
            "the gRPC call gave its slot back"
        );
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_are_shed_resource_exhausted_and_health_is_not() {
        let store = StoreHealth::default();
        store.set_up(true);
        let (release, released) = tokio::sync::watch::channel(false);
        let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
        let pending = tower::service_fn(move |_req: Request<Body>| {
            let mut released = released.clone();
            let started = started.clone();
            async move {
                let _ = started.send(());
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        });
        let guard = admission(&store, 1).layer().layer(pending);
        let call = |path: &str| {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            guard.clone().oneshot(request)
        };
        let held = tokio::spawn(call("/fleetcare.v1.AgentStatusService/GetAgent"));
        running.recv().await.expect("the first call runs");
        let shed = call("/fleetcare.v1.AgentStatusService/GetAgent")
            .await
            .unwrap();
        assert_eq!(shed.headers()["grpc-status"], "8");
        let health = tokio::spawn(call("/grpc.health.v1.Health/Check"));
        running
            .recv()
            .await
            .expect("health runs while the slot is held");
        release.send(true).unwrap();
        assert!(health.await.unwrap().is_ok());
        assert!(held.await.unwrap().is_ok());
        let again = call("/fleetcare.v1.AgentStatusService/GetAgent")
            .await
            .unwrap();
        assert!(
            again.headers().get("grpc-status").is_none(),
            "a slot is free again"
        );
    }

    #[tokio::test]
    async fn while_the_store_is_down_calls_fail_at_once_unavailable() {
        let store = StoreHealth::default();
        let ok = tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let guard = admission(&store, 4).layer().layer(ok);
        let call = |path: &str| {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            guard.clone().oneshot(request)
        };
        let refused = call("/fleetcare.v1.HealingService/ReportError")
            .await
            .unwrap();
        assert_eq!(refused.headers()["grpc-status"], "14");
        let health = call("/grpc.health.v1.Health/Check").await.unwrap();
        assert!(health.headers().get("grpc-status").is_none());
        store.set_up(true);
        let served = call("/fleetcare.v1.HealingService/ReportError")
            .await
            .unwrap();
        assert!(served.headers().get("grpc-status").is_none());
    }

    #[test]
    fn health_and_reflection_are_exempt() {
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(exempt(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!exempt("/fleetcare.v1.AgentStatusService/GetAgent"));
    }
}
