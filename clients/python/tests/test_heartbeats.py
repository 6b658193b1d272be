"""Heartbeater: keeps to the interval the server gives, stops promptly (also
mid-wait), retries a cut connection, ends with NOT_FOUND for an unknown agent."""

from __future__ import annotations

import queue
import time
from typing import List, Tuple

import grpc
import pytest
from conftest import FleetcareServer, ServerFactory
from tcp_proxy import TcpProxy

from fleetcare import FleetcareClient, Heartbeater
from fleetcare.v1 import agent_status_pb2 as pb

WAIT = 30.0
# Timer and scheduling noise allowed when comparing an observed spacing with
# the interval the server asked for.
TOLERANCE = 0.02

Beat = Tuple[float, pb.HeartbeatResponse]


@pytest.fixture
def paced(server_factory: ServerFactory) -> FleetcareServer:
    """A server that tells agents to heartbeat every 200 ms."""
    return server_factory(extra_args=["--min-heartbeat-interval", "200ms"])


def recorder() -> "Tuple[queue.Queue[Beat], object]":
    beats: "queue.Queue[Beat]" = queue.Queue()
    return beats, lambda response: beats.put((time.monotonic(), response))


def take(beats: "queue.Queue[Beat]", n: int) -> List[Beat]:
    return [beats.get(timeout=WAIT) for _ in range(n)]


def seconds(d: object) -> float:
    return d.seconds + d.nanos / 1e9  # type: ignore[attr-defined]


def test_heartbeats_keep_to_the_servers_interval_and_stop_when_asked(paced: FleetcareServer) -> None:
    with FleetcareClient(paced.address or "", insecure=True) as client:
        registered = client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-hb-paced")).agent
        beats, on_response = recorder()
        heartbeater = client.heartbeats("py-hb-paced", on_response=on_response).start()  # type: ignore[arg-type]
        try:
            seen = take(beats, 4)
        finally:
            asked_to_stop = time.monotonic()
            heartbeater.stop()
        stopped = time.monotonic()
        assert stopped - asked_to_stop < 1.0, f"stop() took {stopped - asked_to_stop:.3f}s"
        assert not heartbeater.running
        assert heartbeater.error is None

        for (earlier, response), (later, _) in zip(seen, seen[1:]):
            assert response.HasField("next_heartbeat_interval")
            asked = seconds(response.next_heartbeat_interval)
            assert asked == pytest.approx(0.2), "the server's pacing"
            spacing = later - earlier
            assert spacing + TOLERANCE >= asked, f"heartbeat after {spacing:.3f}s, sooner than {asked}s"
            assert spacing < 4.0, f"heartbeat after {spacing:.3f}s: not the server's interval"
        assert all(r.agent.agent_id == "py-hb-paced" for _, r in seen)
        assert heartbeater.heartbeats >= 4
        assert heartbeater.last_response is not None

        # Nothing after stop() returned: whatever is queued came before.
        while not beats.empty():
            at, _ = beats.get_nowait()
            assert at <= stopped
        agent = client.agent_status.GetAgent(pb.GetAgentRequest(agent_id="py-hb-paced")).agent
        assert agent.last_heartbeat_at.ToNanoseconds() > registered.last_heartbeat_at.ToNanoseconds()


def test_stop_ends_a_long_wait_at_once(client: FleetcareClient) -> None:
    """The shared server keeps the default 5 s interval: stop() must cut that wait short."""
    client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-hb-long"))
    beats, on_response = recorder()
    with client.heartbeats("py-hb-long", on_response=on_response) as heartbeater:  # type: ignore[arg-type]
        (_, first), = take(beats, 1)
        assert seconds(first.next_heartbeat_interval) == pytest.approx(5.0)
        asked_to_stop = time.monotonic()
    assert time.monotonic() - asked_to_stop < 1.0
    assert not heartbeater.running
    assert heartbeater.heartbeats == 1


def test_an_unknown_agent_ends_the_loop_with_not_found(client: FleetcareClient) -> None:
    beats, on_response = recorder()
    heartbeater = client.heartbeats("py-hb-nobody", on_response=on_response).start()  # type: ignore[arg-type]
    assert heartbeater.join(WAIT), "the loop gave up"
    assert isinstance(heartbeater.error, grpc.RpcError)
    assert heartbeater.error.code() == grpc.StatusCode.NOT_FOUND
    assert beats.empty() and heartbeater.heartbeats == 0

    # run() in the calling thread raises it.
    with pytest.raises(grpc.RpcError) as raised:
        client.heartbeats("py-hb-nobody").run()
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_cut_connection_is_retried(paced: FleetcareServer) -> None:
    direct = FleetcareClient(paced.address or "", insecure=True)
    proxy = TcpProxy(("127.0.0.1", paced.port)).open()
    through_proxy = FleetcareClient(proxy.address, insecure=True)
    heartbeater = None
    try:
        direct.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-hb-cut"))
        beats, on_response = recorder()
        retries: "queue.Queue[Tuple[grpc.StatusCode, float]]" = queue.Queue()
        heartbeater = through_proxy.heartbeats(
            "py-hb-cut",
            on_response=on_response,  # type: ignore[arg-type]
            on_retry=lambda error, delay: retries.put((error.code(), delay)),
            max_backoff=0.2,
        ).start()
        take(beats, 1)

        proxy.cut()
        for _ in range(3):
            code, delay = retries.get(timeout=WAIT)
            assert code == grpc.StatusCode.UNAVAILABLE
            assert delay <= 0.2
        assert heartbeater.running, "a transient failure does not end the loop"

        while not beats.empty():  # queued before the cut
            beats.get_nowait()
        proxy.open()  # same port
        (_, back), = take(beats, 1)
        assert back.agent.agent_id == "py-hb-cut"
    finally:
        if heartbeater is not None:
            heartbeater.stop()
        through_proxy.close()
        direct.close()
        proxy.cut()
    assert heartbeater.error is None


def test_an_agent_marked_offline_comes_back_with_the_next_heartbeat(paced: FleetcareServer) -> None:
    with FleetcareClient(paced.address or "", insecure=True) as client:
        client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-hb-back"))
        beats, on_response = recorder()
        with client.heartbeats("py-hb-back", on_response=on_response):  # type: ignore[arg-type]
            take(beats, 1)
            client.agent_status.MarkOffline(pb.MarkOfflineRequest(agent_id="py-hb-back"))
            deadline = time.monotonic() + WAIT
            while True:
                _, response = beats.get(timeout=max(0.0, deadline - time.monotonic()))
                if response.HasField("transition"):
                    break
        assert response.transition.from_status == pb.AGENT_STATUS_OFFLINE
        assert response.transition.to_status == pb.AGENT_STATUS_IDLE
        assert response.transition.cause == pb.TRANSITION_CAUSE_HEARTBEAT_RESUMED
        assert response.agent.status == pb.AGENT_STATUS_IDLE


def test_intervals_fall_back_and_have_a_floor(client: FleetcareClient) -> None:
    heartbeater = Heartbeater(client.agent_status, "unused", fallback_interval=5.0, min_interval=0.1)
    response = pb.HeartbeatResponse()
    assert heartbeater.next_interval(response) == 5.0, "absent"
    response.next_heartbeat_interval.FromMilliseconds(0)
    assert heartbeater.next_interval(response) == 5.0, "zero"
    response.next_heartbeat_interval.FromMilliseconds(1)
    assert heartbeater.next_interval(response) == 0.1, "raised to the floor"
    response.next_heartbeat_interval.FromMilliseconds(2500)
    assert heartbeater.next_interval(response) == 2.5
