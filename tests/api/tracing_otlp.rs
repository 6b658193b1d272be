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

    /// The span named `name` in trace `trace_id`, once it has arrived.
    async fn span_named(&self, trace_id: &[u8], name: &str) -> Span {
        eventually(
            Duration::from_secs(20),
            &format!("the {name} span exported"),
            || async {
                self.spans
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, s)| s.trace_id == trace_id && s.name == name)
                    .map(|(_, s)| s.clone())
            },
        )
        .await
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
                quota_pools: Vec::new(),
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

/// A server process exporting to `collector` every 100 ms, with the pipeline's
/// session root at `session_dir` and its schedule off.
async fn traced_server(collector: &Collector, db: &TestDb, session_dir: &str) -> ServerProcess {
    let endpoint = collector.start().await;
    ServerProcess::start_with_env(
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        &[
            "--database-url",
            &db.url,
            "--otlp-endpoint",
            &endpoint,
            "--session-dir",
            session_dir,
            "--pipeline-interval-usage",
            "0s",
            "--pipeline-interval-errors",
            "0s",
        ],
    )
    .await
}

#[tokio::test]
async fn a_lone_call_commits_in_a_child_span_of_its_rpc_span_with_the_batch_attributes() {
    let collector = Collector::default();
    let db = TestDb::new();
    let root = crate::pipeline::SessionRoot::new();
    let server = traced_server(&collector, &db, root.path.to_str().unwrap()).await;
    let mut client = server.client().await;
    client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "traced-2".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let started = client
        .start_work(with_traceparent(
            pb::StartWorkRequest {
                agent_id: "traced-2".into(),
                slot_type: pb::SlotType::Work as i32,
            },
            &format!("00-{trace_id}-{caller_span}-01"),
        ))
        .await
        .unwrap()
        .into_inner();
    let revision = started.transition.expect("a transition").revision;

    let trace_id = hex::decode(trace_id).unwrap();
    let (_, rpc) = collector.rpc_span(&trace_id, "StartWork").await;
    assert_eq!(rpc.parent_span_id, hex::decode(caller_span).unwrap());
    let commit = collector.span_named(&trace_id, "commit_batch").await;
    assert_eq!(commit.parent_span_id, rpc.span_id, "under the call's span");
    let a = &commit.attributes;
    assert_eq!(int_attr(a, "size"), Some(1), "{a:?}");
    assert_eq!(string_attr(a, "outcome").as_deref(), Some("committed"));
    assert_eq!(int_attr(a, "first_revision"), Some(revision));
    assert_eq!(int_attr(a, "last_revision"), Some(revision));
    assert!(attr(a, "elapsed_ms").is_some(), "{a:?}");
}

/// Whether the call whose server span is `rpc` has its commit exported: a
/// `commit_batch` span under it (a lone call) or linking to it (a batch).
fn commit_of(spans: &[(String, Span)], rpc: &Span) -> Option<Span> {
    spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "commit_batch")
        .find(|s| {
            (s.trace_id == rpc.trace_id && s.parent_span_id == rpc.span_id)
                || s.links
                    .iter()
                    .any(|l| l.trace_id == rpc.trace_id && l.span_id == rpc.span_id)
        })
        .cloned()
}

#[tokio::test]
async fn a_batch_of_several_calls_is_a_root_span_linked_to_each_call_span() {
    const CALLS: usize = 32;
    let collector = Collector::default();
    let db = TestDb::new();
    let root = crate::pipeline::SessionRoot::new();
    let server = traced_server(&collector, &db, root.path.to_str().unwrap()).await;
    let client = server.client().await;
    // Concurrent calls queue while the committer commits the first of them, so
    // a wave of them forms batches of several calls; the batching itself is the
    // runtime's, so waves go until one did (the first, in practice).
    let mut several = None;
    for wave in 0..10 {
        let ids: Vec<String> = (0..CALLS).map(|i| format!("batched-{wave}-{i}")).collect();
        for id in &ids {
            client
                .clone()
                .register_agent(pb::RegisterAgentRequest {
                    agent_id: id.clone(),
                    labels: Default::default(),
                    quota_pools: Vec::new(),
                })
                .await
                .unwrap();
        }
        // Distinct traces, one per call.
        let traces: Vec<(String, String)> = (0..CALLS)
            .map(|i| {
                (
                    format!("{:08x}{:024x}", wave + 1, i + 1),
                    format!("{:016x}", i + 1),
                )
            })
            .collect();
        let calls = ids.iter().zip(&traces).map(|(id, (trace, caller))| {
            let mut client = client.clone();
            let request = with_traceparent(
                pb::StartWorkRequest {
                    agent_id: id.clone(),
                    slot_type: pb::SlotType::Work as i32,
                },
                &format!("00-{trace}-{caller}-01"),
            );
            async move { client.start_work(request).await.unwrap().into_inner() }
        });
        let replies = futures::future::join_all(calls).await;
        assert!(replies.iter().all(|r| r.transition.is_some()));

        // Every call's server span, and the commit that carried it.
        let mut rpcs = Vec::new();
        for (trace, caller) in &traces {
            let (_, rpc) = collector
                .rpc_span(&hex::decode(trace).unwrap(), "StartWork")
                .await;
            assert_eq!(rpc.parent_span_id, hex::decode(caller).unwrap());
            rpcs.push(rpc);
        }
        let commits: Vec<Span> = eventually(
            Duration::from_secs(20),
            "every call's commit exported",
            || async {
                let spans = collector.spans.lock().unwrap();
                rpcs.iter().map(|rpc| commit_of(&spans, rpc)).collect()
            },
        )
        .await;
        let mut calls_in_batches = 0;
        for (rpc, commit) in rpcs.iter().zip(&commits) {
            let size = int_attr(&commit.attributes, "size").expect("a size");
            assert_eq!(
                string_attr(&commit.attributes, "outcome").as_deref(),
                Some("committed")
            );
            if size == 1 {
                assert_eq!(commit.parent_span_id, rpc.span_id, "a lone call's child");
                assert!(commit.links.is_empty(), "{:?}", commit.links);
                continue;
            }
            calls_in_batches += 1;
            // A root of a trace of its own, linked to each call it carried:
            // this one among them, each once, and every link a StartWork call
            // of this wave (nothing else was in flight).
            assert!(commit.parent_span_id.is_empty(), "a batch is a root span");
            assert!(
                traces
                    .iter()
                    .all(|(t, _)| commit.trace_id != hex::decode(t).unwrap())
            );
            assert_eq!(commit.links.len() as i64, size, "{:?}", commit.links);
            let mut linked: Vec<(&[u8], &[u8])> = commit
                .links
                .iter()
                .map(|l| (l.trace_id.as_slice(), l.span_id.as_slice()))
                .collect();
            linked.sort();
            linked.dedup();
            assert_eq!(linked.len() as i64, size, "each call linked once");
            for (trace_id, span_id) in linked {
                assert!(
                    rpcs.iter()
                        .any(|r| r.trace_id == trace_id && r.span_id == span_id),
                    "a link to a call of the batch"
                );
            }
            assert!(
                commit
                    .links
                    .iter()
                    .any(|l| l.trace_id == rpc.trace_id && l.span_id == rpc.span_id)
            );
        }
        // Each batch of several covers exactly its `size` calls of this wave.
        let mut batches: Vec<&Span> = commits
            .iter()
            .filter(|c| int_attr(&c.attributes, "size") > Some(1))
            .collect();
        batches.sort_by(|a, b| a.span_id.cmp(&b.span_id));
        batches.dedup_by(|a, b| a.span_id == b.span_id);
        let covered: i64 = batches
            .iter()
            .map(|c| int_attr(&c.attributes, "size").unwrap())
            .sum();
        assert_eq!(covered, calls_in_batches);
        if let Some(batch) = batches.first() {
            several = Some((wave, (*batch).clone()));
            break;
        }
    }
    let (_, batch) = several.expect("no wave of 32 concurrent calls formed a batch of several");
    assert!(
        int_attr(&batch.attributes, "first_revision")
            < int_attr(&batch.attributes, "last_revision")
    );
}

#[tokio::test]
async fn a_run_processor_call_yields_a_pipeline_run_span_with_its_counts() {
    let collector = Collector::default();
    let db = TestDb::new();
    let root = crate::pipeline::SessionRoot::new();
    for (file, msg) in [("alice/s1.jsonl", "msg_1"), ("bob/s2.jsonl", "msg_2")] {
        root.write(
            file,
            &crate::pipeline::assistant(
                msg,
                "req_1",
                "claude-sonnet-4",
                "2026-03-14T10:00:00Z",
                [10, 20, 30, 40],
            ),
        );
    }
    let server = traced_server(&collector, &db, root.path.to_str().unwrap()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut pipeline =
        pb::session_pipeline_service_client::SessionPipelineServiceClient::new(channel);
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let caller_span = "eee19b7ec3c1b174";
    let stats = pipeline
        .run_processor(with_traceparent(
            pb::RunProcessorRequest {
                name: "usage".into(),
            },
            &format!("00-{trace_id}-{caller_span}-01"),
        ))
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(stats.processed, 2);

    let trace_id = hex::decode(trace_id).unwrap();
    let (_, rpc) = collector.rpc_span(&trace_id, "RunProcessor").await;
    let run = collector.span_named(&trace_id, "pipeline_run").await;
    assert_eq!(run.parent_span_id, rpc.span_id, "under the call's span");
    let a = &run.attributes;
    assert_eq!(
        string_attr(a, "processor").as_deref(),
        Some("usage"),
        "{a:?}"
    );
    assert_eq!(string_attr(a, "outcome").as_deref(), Some("ok"));
    assert_eq!(int_attr(a, "scanned"), Some(2));
    assert_eq!(int_attr(a, "processed"), Some(2));
    assert_eq!(int_attr(a, "failed"), Some(0));
    assert!(attr(a, "elapsed_ms").is_some(), "{a:?}");
    // Its sessions committed in spans of their own, under the run's.
    let commit = collector.span_named(&trace_id, "pipeline_commit").await;
    assert_eq!(commit.parent_span_id, run.span_id);
    assert!(int_attr(&commit.attributes, "sessions").is_some_and(|n| n >= 1));
}
