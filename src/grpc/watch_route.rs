//! `WatchTransitions` with each transition encoded once for all watchers.
//!
//! The generated server encodes every message of every stream itself, so
//! 1,000 watchers of one transition meant 1,000 conversions and prost
//! encodings of the same message. This route sits in front of the generated
//! `AgentStatusService` server (behind the admission layer, so calls arrive
//! with their caller exactly as at the generated one) and serves
//! that one method with [`FrameCodec`]: a transition goes out as the bytes
//! [`WireCache`] encoded once; every other call goes to the generated server.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tower::{Service, ServiceExt};

use crate::grpc::agent_status::AgentStatusApi;
use crate::grpc::codec::{FrameCodec, FrameStream, WatchFrame};
use crate::proto::v1 as pb;

const WATCH_PATH: &str = "/fleetcare.v1.AgentStatusService/WatchTransitions";

/// The generated server `S`, with `WatchTransitions` served here.
#[derive(Clone)]
pub struct WatchRoute<S> {
    inner: S,
    api: Arc<AgentStatusApi>,
    max_message_size: usize,
}

impl<S> WatchRoute<S> {
    /// `inner` serves everything but `WatchTransitions`, which `api` serves
    /// with the same message size limit as `inner`.
    pub fn new(inner: S, api: Arc<AgentStatusApi>, max_message_size: usize) -> Self {
        WatchRoute {
            inner,
            api,
            max_message_size,
        }
    }
}

impl<S: NamedService> NamedService for WatchRoute<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for WatchRoute<S>
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
        if request.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.clone().oneshot(request));
        }
        let api = self.api.clone();
        let size = self.max_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(FrameCodec::<pb::WatchTransitionsRequest>::default())
                .apply_max_message_size_config(Some(size), Some(size));
            Ok(grpc.server_streaming(Watch(api), request).await)
        })
    }
}

struct Watch(Arc<AgentStatusApi>);

impl ServerStreamingService<pb::WatchTransitionsRequest> for Watch {
    type Response = WatchFrame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<'static, Result<tonic::Response<FrameStream>, Status>>;

    fn call(&mut self, request: tonic::Request<pb::WatchTransitionsRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.watch_frames(request).await })
    }
}
