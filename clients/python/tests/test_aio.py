"""fleetcare.aio against the real server: AsyncFleetcareClient's claims (held,
renewed by a task, released on exit, on an exception and on cancellation; one
winner of two; finish_work; a lost claim; a report for a quota pool parking the
sibling, seen through ``client.quota``), heartbeats as a task, the resuming
watch as an async iterator, and the token on every kind of call.

Each test runs its own event loop (asyncio.run), as an agent runner does; the
setting up and the checking go through the synchronous client."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Sequence, Tuple, TypeVar

import grpc
import pytest
from conftest import FleetcareServer, ServerFactory, agent_transitions, get_agent, register_pool, unique_name
from tcp_proxy import TcpProxy

from fleetcare import FleetcareClient, error_info
from fleetcare.aio import AsyncClaimHandle, AsyncFleetcareClient, AsyncTransitionWatch, ClaimLost
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import dispatch_pb2, quota_pb2

WAIT = 30.0
TEST_TIMEOUT = 120.0
T = TypeVar("T")


def asyncio_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Runs an async test function in a fresh event loop, with an overall timeout."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT))

    return run


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Polls `predicate` without blocking the loop; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def seconds(ts: Any) -> float:
    return ts.ToNanoseconds() / 1e9


def reason(error: grpc.RpcError) -> Any:
    info = error_info(error)
    return (error.code(), info.reason if info is not None else None)


def address(server: FleetcareServer) -> str:
    assert server.address is not None
    return server.address


# -- claims -----------------------------------------------------------------------------------


@asyncio_test
async def test_async_claim_holds_renews_and_releases(server: FleetcareServer, client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client, prefix="py-aio-claim")
    lease = 1.0
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        async with aclient.claim(labels, lease=lease) as claim:
            assert isinstance(claim, AsyncClaimHandle)
            assert claim.agent_id == agent_id
            assert claim.transition is not None and claim.transition.cause == pb.TRANSITION_CAUSE_CLAIMED
            first = pb.Claim()
            first.CopyFrom(claim.claim)
            assert first.holder == "anonymous"
            held = get_agent(client, agent_id)
            assert held.status == pb.AGENT_STATUS_BUSY and held.claim.claim_id == first.claim_id

            await eventually(
                lambda: claim.renewals >= 4
                and seconds(claim.claim.lease_expires_at) > seconds(first.claimed_at) + 3 * lease,
                "renewals past three leases",
            )
            still = get_agent(client, agent_id)
            assert still.status == pb.AGENT_STATUS_BUSY and still.claim.claim_id == first.claim_id
            assert seconds(still.claim.lease_expires_at) > seconds(first.lease_expires_at) + lease
            assert claim.active and claim.lost is None
    after = get_agent(client, agent_id)
    assert after.status == pb.AGENT_STATUS_IDLE and not after.HasField("claim")
    assert agent_transitions(client, agent_id)[-1].cause == pb.TRANSITION_CAUSE_CLAIM_RELEASED


@asyncio_test
async def test_async_claim_is_released_on_an_exception_and_on_cancellation(
    server: FleetcareServer, client: FleetcareClient
) -> None:
    labels, (agent_id,) = register_pool(client, prefix="py-aio-claim")
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        with pytest.raises(RuntimeError, match="the work failed"):
            async with aclient.claim(labels, lease=5.0):
                assert get_agent(client, agent_id).status == pb.AGENT_STATUS_BUSY
                raise RuntimeError("the work failed")
        assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE

        entered = asyncio.Event()

        async def runner() -> None:
            async with aclient.claim(labels, lease=5.0):
                entered.set()
                await asyncio.Event().wait()  # works until cancelled

        task = asyncio.ensure_future(runner())
        await asyncio.wait_for(entered.wait(), WAIT)
        assert get_agent(client, agent_id).status == pb.AGENT_STATUS_BUSY
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    after = get_agent(client, agent_id)
    assert after.status == pb.AGENT_STATUS_IDLE and not after.HasField("claim")


@asyncio_test
async def test_async_two_claimers_one_agent(server: FleetcareServer, client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client, prefix="py-aio-claim")
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        handles = [aclient.claim(labels, lease=10.0) for _ in range(2)]
        outcomes = await asyncio.gather(*(h.acquire() for h in handles), return_exceptions=True)
        won = [o for o in outcomes if isinstance(o, AsyncClaimHandle)]
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        try:
            assert len(won) == 1 and len(refused) == 1, outcomes
            assert reason(refused[0]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_AGENT_AVAILABLE")
            assert won[0].agent_id == agent_id
        finally:
            for handle in won:
                await handle.release()
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE


@asyncio_test
async def test_async_finish_work_ends_the_claim(server: FleetcareServer, client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client, prefix="py-aio-claim")
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        async with aclient.claim(labels, lease=5.0) as claim:
            finished = await claim.finish_work()
            assert finished.agent.status == pb.AGENT_STATUS_IDLE and not finished.agent.HasField("claim")
        assert claim.lost is None and claim.release_error is None
    assert agent_transitions(client, agent_id)[-1].revision == finished.transition.revision


@asyncio_test
async def test_async_claim_ended_behind_its_back_is_lost(server: FleetcareServer, client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client, prefix="py-aio-claim")
    lost: List[ClaimLost] = []

    async def on_lost(error: ClaimLost) -> None:
        lost.append(error)

    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        async with aclient.claim(labels, lease=1.0, on_lost=on_lost) as claim:
            await aclient.dispatch.ReleaseClaim(
                dispatch_pb2.ReleaseClaimRequest(claim_id=claim.claim_id, fencing_token=claim.fencing_token),
                timeout=30,
            )
            assert await claim.wait_lost(WAIT), "the renewal task did not notice"
            assert claim.lost is not None and claim.lost.reason == "STALE_FENCING_TOKEN"
            assert lost == [claim.lost]
            with pytest.raises(ClaimLost):
                claim.check()
        assert claim.release_error is None
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE


# -- quota pools ------------------------------------------------------------------------------


@asyncio_test
async def test_async_report_for_a_quota_pool_parks_the_sibling(server: FleetcareServer, client: FleetcareClient) -> None:
    pool = f"anthropic/{unique_name('aio-acct').replace('_', '-')}"
    name = unique_name("py-aio-quota").replace("_", "-")
    labels = {"pool": name}
    agent_ids = [f"{name}-0", f"{name}-1"]
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        for agent_id in agent_ids:
            registered = await aclient.agent_status.RegisterAgent(
                pb.RegisterAgentRequest(agent_id=agent_id, labels=labels, quota_pools=[pool]), timeout=30
            )
            assert list(registered.agent.quota_pools) == [pool]
        resets = int(time.time()) + 3600
        async with aclient.claim(labels, lease=5.0) as claim:
            report = await claim.report_exhausted(
                reason=pb.EXHAUSTION_REASON_RATE_LIMIT,
                message=f"Claude AI usage limit reached|{resets}",
                quota_pool=pool,
                window=pb.QUOTA_WINDOW_FIVE_HOUR,
            )
        assert claim.lost is None and claim.release_error is None
        assert report.transition.quota_pool == pool and list(report.agent.held_by_pools) == [pool]
        (sibling,) = [a for a in agent_ids if a != claim.agent_id]
        parked = (await aclient.agent_status.GetAgent(pb.GetAgentRequest(agent_id=sibling), timeout=30)).agent
        assert parked.status == pb.AGENT_STATUS_EXHAUSTED and list(parked.held_by_pools) == [pool]

        got = await aclient.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool=pool), timeout=30)
        assert got.pool.phase == quota_pb2.QUOTA_POOL_PHASE_PARKED and got.pool.held == 2
        assert list(got.held_agent_ids) == sorted(agent_ids)
        assert [w.window for w in got.pool.windows] == [pb.QUOTA_WINDOW_FIVE_HOUR]
        listed = await aclient.quota.ListQuotaPools(quota_pb2.ListQuotaPoolsRequest(parked_only=True), timeout=30)
        assert [p.phase for p in listed.pools if p.name == pool] == [quota_pb2.QUOTA_POOL_PHASE_PARKED]
    assert agent_transitions(client, sibling)[-1].cause == pb.TRANSITION_CAUSE_POOL_EXHAUSTED


# -- heartbeats -------------------------------------------------------------------------------


@pytest.fixture
def paced(server_factory: ServerFactory) -> FleetcareServer:
    """A server that tells agents to heartbeat every 200 ms."""
    return server_factory(extra_args=["--min-heartbeat-interval", "200ms"])


@asyncio_test
async def test_async_heartbeats_keep_to_the_servers_interval_and_stop_at_once(paced: FleetcareServer) -> None:
    async with AsyncFleetcareClient(address(paced), insecure=True) as aclient:
        await aclient.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-aio-hb"))
        seen: List[Tuple[float, pb.HeartbeatResponse]] = []
        beats = aclient.heartbeats("py-aio-hb", on_response=lambda r: seen.append((time.monotonic(), r))).start()
        assert beats.running and beats.task is not None
        await eventually(lambda: len(seen) >= 4, "four heartbeats")
        asked = time.monotonic()
        await beats.stop()
        assert time.monotonic() - asked < 1.0
        assert not beats.running and beats.error is None and beats.heartbeats >= 4
        for (earlier, response), (later, _) in zip(seen, seen[1:]):
            interval = response.next_heartbeat_interval.ToNanoseconds() / 1e9
            assert interval == pytest.approx(0.2)
            assert later - earlier + 0.02 >= interval
            assert later - earlier < 4.0


@asyncio_test
async def test_async_heartbeats_stop_a_long_wait_and_end_on_not_found(server: FleetcareServer) -> None:
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        await aclient.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-aio-hb-long"))
        got: List[pb.HeartbeatResponse] = []

        async def on_response(response: pb.HeartbeatResponse) -> None:
            got.append(response)

        async with aclient.heartbeats("py-aio-hb-long", on_response=on_response) as beats:
            await eventually(lambda: len(got) == 1, "the first heartbeat")
            assert got[0].next_heartbeat_interval.ToNanoseconds() / 1e9 == pytest.approx(5.0)
            asked = time.monotonic()
        assert time.monotonic() - asked < 1.0 and not beats.running and beats.heartbeats == 1

        nobody = aclient.heartbeats("py-aio-hb-nobody").start()
        assert await nobody.join(WAIT)
        assert isinstance(nobody.error, grpc.RpcError) and nobody.error.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as raised:
            await aclient.heartbeats("py-aio-hb-nobody").run()
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# -- the watch --------------------------------------------------------------------------------

Seen = Tuple[int, str, int, int]


def work_cycle(client: FleetcareClient, agents: Sequence[str]) -> List[Seen]:
    recorded: List[Seen] = []
    for agent_id in agents:
        for response in (
            client.agent_status.StartWork(pb.StartWorkRequest(agent_id=agent_id, slot_type=pb.SLOT_TYPE_WORK)),
            client.agent_status.FinishWork(pb.FinishWorkRequest(agent_id=agent_id)),
        ):
            t = response.transition
            recorded.append((t.revision, t.agent_id, t.from_status, t.to_status))
    return recorded


class Consumer:
    """Iterates a watch in a task, as an application would."""

    def __init__(self, watch: AsyncTransitionWatch) -> None:
        self.watch = watch
        self.received: List[pb.Transition] = []
        self.errors: List[BaseException] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for transition in self.watch:
                self.received.append(transition)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    async def wait_for(self, count: int, what: str) -> None:
        await eventually(lambda: len(self.received) >= count or bool(self.errors), what)
        assert not self.errors, self.errors

    def seen(self) -> List[Seen]:
        return [(t.revision, t.agent_id, t.from_status, t.to_status) for t in self.received]

    async def stop(self) -> None:
        self.watch.close()
        await asyncio.wait_for(self.task, WAIT)


@asyncio_test
async def test_async_watch_resumes_after_a_dropped_connection(server_factory: ServerFactory) -> None:
    srv = server_factory()
    proxy = TcpProxy(("127.0.0.1", srv.port)).open()
    direct = FleetcareClient(address(srv), insecure=True)
    consumer = None
    try:
        async with AsyncFleetcareClient(proxy.address, insecure=True) as through_proxy:
            agents = ["aio-cut-a", "aio-cut-b"]
            for agent_id in agents:
                direct.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id))
            # Awaiting pins "from now on": the registrations are not part of the watch.
            watch = await through_proxy.watch_transitions(agent_ids=agents, initial_backoff=0.05, max_backoff=0.5)
            consumer = Consumer(watch)

            recorded = work_cycle(direct, agents)
            await consumer.wait_for(4, "transitions before the cut")

            proxy.cut()
            await eventually(lambda: watch.streams_opened >= 2, "the watch to notice the cut")
            recorded += work_cycle(direct, agents)
            recorded += work_cycle(direct, agents)
            assert len(consumer.received) == 4, "nothing can arrive while the proxy is cut"

            proxy.open()  # same port
            recorded += work_cycle(direct, agents)
            await consumer.wait_for(16, "every transition after the proxy is back")

            revisions = [s[0] for s in consumer.seen()]
            assert consumer.seen() == sorted(recorded), "exactly the recorded transitions, in order"
            assert revisions == list(range(revisions[0], revisions[0] + 16))
            assert watch.last_revision == recorded[-1][0]
            assert proxy.connections_accepted >= 2
            await consumer.stop()
            assert consumer.task.done() and not consumer.errors
    finally:
        direct.close()
        proxy.cut()


@asyncio_test
async def test_async_watch_from_now_on_an_empty_server_misses_nothing(server_factory: ServerFactory) -> None:
    srv = server_factory()  # a fresh database: no transition yet, head revision 0
    with FleetcareClient(address(srv), insecure=True) as client:
        async with AsyncFleetcareClient(address(srv), insecure=True) as aclient:
            async with aclient.watch_transitions(agent_ids=["aio-empty-a"]) as watch:
                assert watch.last_revision == 0
                client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="aio-empty-b"))
                client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="aio-empty-a"))
                first = await asyncio.wait_for(watch.__anext__(), WAIT)
                assert (first.revision, first.agent_id) == (2, "aio-empty-a")
                client.agent_status.StartWork(pb.StartWorkRequest(agent_id="aio-empty-a", slot_type=pb.SLOT_TYPE_WORK))
                second = await asyncio.wait_for(watch.__anext__(), WAIT)
                assert (second.revision, second.to_status) == (3, pb.AGENT_STATUS_BUSY)
                assert watch.streams_opened == 1
            assert watch.closed
            with pytest.raises(StopAsyncIteration):
                await watch.__anext__()


@asyncio_test
async def test_async_watch_raises_out_of_range_and_close_ends_a_blocked_step(
    server: FleetcareServer, client: FleetcareClient
) -> None:
    head = client.agent_status.ListTransitions(pb.ListTransitionsRequest(page_size=1)).head_revision
    async with AsyncFleetcareClient(address(server), insecure=True) as aclient:
        async with aclient.watch_transitions(head + 1_000_000) as watch:
            with pytest.raises(grpc.RpcError) as error:
                await asyncio.wait_for(watch.__anext__(), WAIT)
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert watch.streams_opened == 1

        quiet = aclient.watch_transitions(agent_ids=["aio-nobody-changes-this-agent"])
        consumer = Consumer(quiet)
        await eventually(lambda: quiet.streams_opened == 1, "the stream to open")
        assert not consumer.task.done(), "waiting for a transition"
        await consumer.stop()  # close() from another task ends the iteration
        assert consumer.received == [] and consumer.errors == []


# -- the token --------------------------------------------------------------------------------


def entry(name: str, role: str, token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f'[[caller]]\nname = "{name}"\nrole = "{role}"\ntoken_sha256 = "{digest}"\n\n'


@asyncio_test
async def test_async_client_sends_its_token_on_unary_and_streaming_calls(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    callers = tmp_path / "callers.toml"
    callers.write_text(entry("ops", "operator", "ops-token") + entry("scheduler-eu", "scheduler", "sched-token"))
    srv = server_factory(extra_args=["--auth-file", str(callers)])
    async with AsyncFleetcareClient(address(srv), insecure=True) as anonymous:
        with pytest.raises(grpc.RpcError) as refused:
            await anonymous.agent_status.ListAgents(pb.ListAgentsRequest(), timeout=30)
        assert reason(refused.value) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    async with AsyncFleetcareClient(address(srv), insecure=True, token="ops-token") as ops:
        registered = await ops.agent_status.RegisterAgent(
            pb.RegisterAgentRequest(agent_id="aio-token-a", labels={"pool": "aio-token"}), timeout=30
        )
        # A call with its own authorization keeps it (here: a token the server does not know).
        with pytest.raises(grpc.RpcError) as unknown:
            await ops.agent_status.ListAgents(
                pb.ListAgentsRequest(), metadata=(("authorization", "Bearer nobody"),), timeout=30
            )
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The streaming call carries the token too.
        async with ops.watch_transitions(registered.agent.revision, agent_ids=["aio-token-a"]) as watch:
            await ops.agent_status.StartWork(
                pb.StartWorkRequest(agent_id="aio-token-a", slot_type=pb.SLOT_TYPE_WORK), timeout=30
            )
            started = await asyncio.wait_for(watch.__anext__(), WAIT)
            assert started.to_status == pb.AGENT_STATUS_BUSY and started.actor == "ops"
        await ops.agent_status.FinishWork(pb.FinishWorkRequest(agent_id="aio-token-a"), timeout=30)
    async with AsyncFleetcareClient(address(srv), insecure=True, token="sched-token") as scheduler:
        async with scheduler.claim({"pool": "aio-token"}, lease=5.0) as claim:
            assert claim.claim.holder == "scheduler-eu"
