"""The convenience layer against an in-process gRPC server: the bearer token
really is sent (the real server does not check tokens yet, so only a stand-in
can show the header), and the watch's resume logic step by step. TLS is tested
against the real server, in test_tls.py."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
from conftest import free_port, next_within, wait_until

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import agent_status_pb2_grpc

Abort = Tuple[grpc.StatusCode, str]


class FakeAgentStatus(agent_status_pb2_grpc.AgentStatusServiceServicer):
    """Records each call's metadata; WatchTransitions plays one script per call."""

    def __init__(self, head: int = 0, scripts: Optional[List[List[Any]]] = None) -> None:
        self.head = head
        self.scripts = scripts or []
        self.calls: List[Tuple[str, Dict[str, List[str]]]] = []
        self.watch_requests: List[pb.WatchTransitionsRequest] = []
        self._lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata: Dict[str, List[str]] = {}
        for key, value in context.invocation_metadata():
            metadata.setdefault(key, []).append(value)
        with self._lock:
            self.calls.append((method, metadata))

    def GetAgent(self, request: pb.GetAgentRequest, context: grpc.ServicerContext) -> pb.GetAgentResponse:
        self._record("GetAgent", context)
        return pb.GetAgentResponse(agent=pb.Agent(agent_id=request.agent_id, status=pb.AGENT_STATUS_IDLE))

    def ListTransitions(
        self, request: pb.ListTransitionsRequest, context: grpc.ServicerContext
    ) -> pb.ListTransitionsResponse:
        self._record("ListTransitions", context)
        return pb.ListTransitionsResponse(head_revision=self.head)

    def WatchTransitions(
        self, request: pb.WatchTransitionsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchTransitionsResponse]:
        self._record("WatchTransitions", context)
        with self._lock:
            self.watch_requests.append(request)
            script = self.scripts.pop(0) if self.scripts else []
        for step in script:
            if isinstance(step, tuple):  # (code, details): end the stream with this error
                context.abort(step[0], step[1])
            yield step


def transition(revision: int) -> pb.WatchTransitionsResponse:
    return pb.WatchTransitionsResponse(transition=pb.Transition(revision=revision, agent_id="a1"))


def progress(revision: int) -> pb.WatchTransitionsResponse:
    return pb.WatchTransitionsResponse(progress=pb.Progress(revision=revision))


@pytest.fixture
def fake() -> Iterator[Tuple[FakeAgentStatus, grpc.Server, int]]:
    servicer = FakeAgentStatus(head=7)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_status_pb2_grpc.add_AgentStatusServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, server, port
    finally:
        server.stop(None)


def test_token_is_sent_on_unary_and_streaming_calls(fake: Tuple[FakeAgentStatus, grpc.Server, int]) -> None:
    servicer, _, port = fake
    servicer.scripts = [[transition(8)]]
    with FleetcareClient(f"127.0.0.1:{port}", token="s3cret", insecure=True) as client:
        agent = client.agent_status.GetAgent(pb.GetAgentRequest(agent_id="a1")).agent
        assert agent.agent_id == "a1"
        with client.watch_transitions() as watch:  # ListTransitions (head), then the stream
            assert next_within(watch).revision == 8
    assert [method for method, _ in servicer.calls] == ["GetAgent", "ListTransitions", "WatchTransitions"]
    for method, metadata in servicer.calls:
        assert metadata.get("authorization") == ["Bearer s3cret"], method


def test_no_token_sends_no_authorization(fake: Tuple[FakeAgentStatus, grpc.Server, int]) -> None:
    servicer, _, port = fake
    with FleetcareClient(f"127.0.0.1:{port}", insecure=True) as client:
        client.agent_status.GetAgent(pb.GetAgentRequest(agent_id="a1"))
    assert "authorization" not in servicer.calls[0][1]


def test_explicit_call_metadata_wins(fake: Tuple[FakeAgentStatus, grpc.Server, int]) -> None:
    servicer, _, port = fake
    with FleetcareClient(f"127.0.0.1:{port}", token="s3cret", insecure=True) as client:
        client.agent_status.GetAgent(
            pb.GetAgentRequest(agent_id="a1"), metadata=[("authorization", "Bearer other"), ("x-trace", "t1")]
        )
    metadata = servicer.calls[0][1]
    assert metadata["authorization"] == ["Bearer other"]
    assert metadata["x-trace"] == ["t1"]


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError):
        FleetcareClient("127.0.0.1:1", token="", insecure=True)
    with pytest.raises(ValueError):
        FleetcareClient("127.0.0.1:1", insecure=True, root_certificates=b"pem")


def test_watch_resumes_from_last_transition_or_progress(fake: Tuple[FakeAgentStatus, grpc.Server, int]) -> None:
    servicer, _, port = fake
    servicer.scripts = [
        # Stream 1 (since = head 7): a transition, a progress, then a clean end (server shutdown).
        [transition(8), progress(10)],
        # Stream 2 (since 10): a stale duplicate, a new one, then the connection drops.
        [transition(9), transition(10), transition(11), (grpc.StatusCode.UNAVAILABLE, "connection reset")],
        # Stream 3 (since 11): one more, then an error that must not be retried.
        [transition(12), (grpc.StatusCode.OUT_OF_RANGE, "pruned")],
    ]
    with FleetcareClient(f"127.0.0.1:{port}", insecure=True) as client:
        watch = client.watch_transitions(agent_ids=["a1"], statuses=[pb.AGENT_STATUS_IDLE], initial_backoff=0.01)
        got = [next_within(watch).revision for _ in range(3)]
        with pytest.raises(grpc.RpcError) as error:
            next_within(watch)
        watch.close()
    assert got == [8, 11, 12]
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert watch.streams_opened == 3
    assert watch.last_revision == 12
    assert [r.since_revision for r in servicer.watch_requests] == [7, 10, 11]
    for request in servicer.watch_requests:  # the filters are kept on every reconnect
        assert list(request.agent_ids) == ["a1"]
        assert list(request.statuses) == [pb.AGENT_STATUS_IDLE]
        assert not request.include_snapshot


def test_watch_retries_while_the_server_is_down() -> None:
    port = free_port()  # nothing listens here yet: every attempt fails with UNAVAILABLE
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    servicer = FakeAgentStatus(scripts=[[transition(4)]])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_status_pb2_grpc.add_AgentStatusServiceServicer_to_server(servicer, server)
    with FleetcareClient(f"127.0.0.1:{port}", insecure=True, options=options) as client:
        watch = client.watch_transitions(3, initial_backoff=0.01, max_backoff=0.05)
        result: List[int] = []
        consumer = threading.Thread(target=lambda: result.append(next(watch).revision), daemon=True)
        consumer.start()
        try:
            wait_until(lambda: watch.streams_opened >= 3, what="repeated attempts while down")
            assert result == []
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()
            consumer.join(60)
            assert result == [4]
            assert [r.since_revision for r in servicer.watch_requests] == [3]
        finally:
            watch.close()
            server.stop(None)
