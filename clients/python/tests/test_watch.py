"""TransitionWatch: resumes without gaps or duplicates across a dropped connection
and a server restart; raises the errors it must not retry; closes on demand."""

from __future__ import annotations

import threading
from typing import List, Sequence, Tuple

import grpc
import pytest
from conftest import FleetcareServer, ServerFactory, next_within, wait_until
from tcp_proxy import TcpProxy

from fleetcare import FleetcareClient, TransitionWatch
from fleetcare.v1 import agent_status_pb2 as pb

Seen = Tuple[int, str, int, int]  # revision, agent_id, from_status, to_status


class Consumer:
    """Iterates a watch in a thread, as an application would."""

    def __init__(self, watch: TransitionWatch) -> None:
        self.watch = watch
        self.received: List[pb.Transition] = []
        self.errors: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for transition in self.watch:
                self.received.append(transition)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    def wait_for(self, count: int, what: str) -> None:
        wait_until(lambda: len(self.received) >= count or bool(self.errors), what=what)
        assert not self.errors, self.errors

    def seen(self) -> List[Seen]:
        return [(t.revision, t.agent_id, t.from_status, t.to_status) for t in self.received]

    def stop(self) -> None:
        self.watch.close()
        self.thread.join(30)
        assert not self.thread.is_alive(), "watch did not stop after close()"


def work_cycle(stub: object, agents: Sequence[str], **call: object) -> List[Seen]:
    """StartWork then FinishWork for each agent; the transitions the server recorded."""
    recorded: List[Seen] = []
    for agent_id in agents:
        for response in (
            stub.StartWork(pb.StartWorkRequest(agent_id=agent_id, slot_type=pb.SLOT_TYPE_WORK), **call),  # type: ignore[attr-defined]
            stub.FinishWork(pb.FinishWorkRequest(agent_id=agent_id), **call),  # type: ignore[attr-defined]
        ):
            t = response.transition
            recorded.append((t.revision, t.agent_id, t.from_status, t.to_status))
    return recorded


def assert_exactly(seen: List[Seen], recorded: List[Seen]) -> None:
    revisions = [s[0] for s in seen]
    assert len(set(revisions)) == len(revisions), f"duplicates in {revisions}"
    assert seen == sorted(recorded), "the watch must yield exactly the recorded transitions, in order"
    # A fresh database where only these agents change: the revisions are consecutive.
    assert revisions == list(range(revisions[0], revisions[0] + len(revisions)))


def test_watch_resumes_after_dropped_connection(server_factory: ServerFactory) -> None:
    srv = server_factory()
    proxy = TcpProxy(("127.0.0.1", srv.port)).open()
    direct = FleetcareClient(srv.address or "", insecure=True)
    through_proxy = FleetcareClient(proxy.address, insecure=True)
    consumer = None
    try:
        agents = ["cut-a", "cut-b"]
        for agent_id in agents:
            direct.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id))
        # From now on: the registrations above are not part of the watch.
        watch = through_proxy.watch_transitions(agent_ids=agents, initial_backoff=0.05, max_backoff=0.5)
        consumer = Consumer(watch)

        recorded = work_cycle(direct.agent_status, agents)
        consumer.wait_for(4, "transitions before the cut")

        proxy.cut()
        # The watch noticed the dropped stream and is trying to reopen it (refused).
        wait_until(lambda: watch.streams_opened >= 2, what="the watch to notice the cut")
        recorded += work_cycle(direct.agent_status, agents)
        recorded += work_cycle(direct.agent_status, agents)
        assert len(consumer.received) == 4, "nothing can arrive while the proxy is cut"

        proxy.open()  # same port
        recorded += work_cycle(direct.agent_status, agents)
        consumer.wait_for(16, "every transition after the proxy is back")

        assert len(recorded) == 16
        assert_exactly(consumer.seen(), recorded)
        assert watch.last_revision == recorded[-1][0]
        assert proxy.connections_accepted >= 2, "the watch must have reconnected through the proxy"
    finally:
        if consumer is not None:
            consumer.stop()
        through_proxy.close()
        direct.close()
        proxy.cut()


def test_watch_resumes_across_server_restart(server_factory: ServerFactory) -> None:
    first = server_factory()
    port = first.port
    client = FleetcareClient(first.address or "", insecure=True)
    consumer = None
    try:
        agents = ["restart-a", "restart-b"]
        for agent_id in agents:
            client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id))
        watch = client.watch_transitions(agent_ids=agents, initial_backoff=0.05, max_backoff=0.5)
        consumer = Consumer(watch)

        recorded = work_cycle(client.agent_status, agents)
        consumer.wait_for(4, "transitions before the restart")

        assert first.stop() == 0, "graceful shutdown exits 0"
        # The server ended the stream (status OK); the watch reopens it, in vain for now.
        wait_until(lambda: watch.streams_opened >= 2, what="the watch to notice the shutdown")
        second: FleetcareServer = server_factory(database=first.database, listen=f"127.0.0.1:{port}")
        assert second.port == port

        recorded += work_cycle(client.agent_status, agents, wait_for_ready=True, timeout=60)
        consumer.wait_for(8, "transitions after the restart")

        assert_exactly(consumer.seen(), recorded)
        assert not consumer.errors
    finally:
        if consumer is not None:
            consumer.stop()
        client.close()


def test_watch_delivers_missed_transitions_from_explicit_revision(client: FleetcareClient) -> None:
    agent_id = "explicit-since"
    registered = client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id))
    since = registered.agent.revision
    recorded = work_cycle(client.agent_status, [agent_id])
    # Everything after `since` was committed before the watch opened: replayed from history.
    with client.watch_transitions(since, agent_ids=[agent_id]) as watch:
        got = [next_within(watch), next_within(watch)]
    assert [(t.revision, t.agent_id, t.from_status, t.to_status) for t in got] == recorded
    assert watch.closed


def test_watch_from_now_on_an_empty_server_misses_nothing(server_factory: ServerFactory) -> None:
    srv = server_factory()  # a fresh database: no transition yet, head revision 0
    with FleetcareClient(srv.address or "", insecure=True) as client:
        with client.watch_transitions(agent_ids=["empty-a"]) as watch:
            assert watch.last_revision == 0
            # Committed after the watch was created but before its stream opens
            # (it opens lazily, on the first next()): "from now on" includes them.
            client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="empty-b"))
            client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="empty-a"))
            first = next_within(watch)
            assert (first.revision, first.agent_id) == (2, "empty-a")
            client.agent_status.StartWork(
                pb.StartWorkRequest(agent_id="empty-a", slot_type=pb.SLOT_TYPE_WORK)
            )
            second = next_within(watch)
            assert (second.revision, second.to_status) == (3, pb.AGENT_STATUS_BUSY)
            assert watch.streams_opened == 1


def test_watch_raises_out_of_range_without_retrying(client: FleetcareClient) -> None:
    head = client.agent_status.ListTransitions(pb.ListTransitionsRequest(page_size=1)).head_revision
    with client.watch_transitions(head + 1_000_000) as watch:
        with pytest.raises(grpc.RpcError) as error:
            next_within(watch)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert watch.streams_opened == 1


def test_watch_raises_invalid_argument(client: FleetcareClient) -> None:
    with client.watch_transitions(agent_ids=["not a valid id"]) as watch:
        with pytest.raises(grpc.RpcError) as error:
            next_within(watch)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert watch.streams_opened == 1


def test_close_ends_a_blocked_iteration(client: FleetcareClient) -> None:
    watch = client.watch_transitions(agent_ids=["nobody-changes-this-agent"])
    consumer = Consumer(watch)
    wait_until(lambda: watch.streams_opened == 1, what="the stream to open")
    assert consumer.thread.is_alive(), "blocked waiting for a transition"
    consumer.stop()  # close() from another thread; asserts the thread ended
    assert consumer.received == [] and consumer.errors == []
    with pytest.raises(StopIteration):
        next(watch)
