//! Request tracing exported over OTLP: a receiver in the test, the server a
//! process of its own (the tracing subscriber is process-wide).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::transport::Server;

use fleetcare::proto::v1 as pb;

use crate::helpers::{ServerProcess, TestDb, eventually};

/// An in-process OTLP/gRPC collector: keeps every span it is sent, with its
/// resource's `service.name`.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                kept.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts it on a port of its own; its `http://` address.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// The `rpc` span of `method` in trace `trace_id`, once it has arrived.
    async fn rpc_span(&self, trace_id: &[u8], method: &str) -> (String, Span) {
        eventually(
            Duration::from_secs(20),
            &format!("the {method} span exported"),
            || async {
                self.spans
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, s)| {
                        s.trace_id == trace_id
                            && string_attr(&s.attributes, "rpc.method").as_deref() == Some(method)
                    })
                    .cloned()
            },
        )
        .await
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|AnyValue { value }| value.as_ref())
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

#[tokio::test]
async fn a_call_with_a_traceparent_is_exported_as_a_child_span_with_its_service_method_and_status()
{
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let db = TestDb::new();
    let server = ServerProcess::start_with_env(
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        &[
            "--database-url",
            &db.url,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-service-name",
            "fleetcare-test",
        ],
    )
    .await;
    let mut client = server.client().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    client
        .register_agent(with_traceparent(
            pb::RegisterAgentRequest {
                agent_id: "traced-1".into(),
                labels: Default::default(),
            },
            &traceparent,
        ))
        .await
        .unwrap();
    // An error: its status is in the headers (trailers-only).
    let missing = client
        .get_agent(with_traceparent(
            pb::GetAgentRequest {
                agent_id: "ghost".into(),
            },
            &traceparent,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let trace_id = hex::decode(trace_id).unwrap();
    let (service, register) = collector.rpc_span(&trace_id, "RegisterAgent").await;
    assert_eq!(service, "fleetcare-test");
    assert_eq!(register.parent_span_id, hex::decode(caller_span).unwrap());
    assert_eq!(
        register.name,
        "fleetcare.v1.AgentStatusService/RegisterAgent"
    );
    let a = &register.attributes;
    assert_eq!(
        string_attr(a, "rpc.service").as_deref(),
        Some("fleetcare.v1.AgentStatusService")
    );
    assert_eq!(string_attr(a, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(0), "{a:?}");
    assert_eq!(string_attr(a, "agent_id").as_deref(), Some("traced-1"));
    assert!(attr(a, "latency_ms").is_some(), "{a:?}");
    // SPAN_KIND_SERVER
    assert_eq!(register.kind, 2);

    let (_, get) = collector.rpc_span(&trace_id, "GetAgent").await;
    assert_eq!(get.parent_span_id, hex::decode(caller_span).unwrap());
    assert_eq!(int_attr(&get.attributes, "rpc.grpc.status_code"), Some(5));
    assert_eq!(
        string_attr(&get.attributes, "agent_id").as_deref(),
        Some("ghost")
    );
    // STATUS_CODE_ERROR
    assert_eq!(get.status.map(|s| s.code), Some(2));
}
