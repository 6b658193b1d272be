"""ClaimHandle (``with client.claim(...)``) against the real server: the claim
makes the agent BUSY under its holder, the lease is renewed in the background,
leaving the block releases (also on an exception), two claimers never get the
same agent, finish_work ends the claim, a claim ended behind the handle's back
is reported lost (also when no renewal reaches the server before the lease runs
out, and the server expires it), and a ClaimAgent retried after a lost answer
is the same claim."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any, List

import grpc
import pytest
from conftest import FleetcareServer, ServerFactory, agent_transitions, get_agent, register_pool, wait_until
from tcp_proxy import TcpProxy

from fleetcare import ClaimHandle, ClaimLost, FleetcareClient, error_info
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import dispatch_pb2

WAIT = 30.0


def seconds(ts: Any) -> float:
    return ts.ToNanoseconds() / 1e9


def reason(error: grpc.RpcError) -> Any:
    info = error_info(error)
    return (error.code(), info.reason if info is not None else None)


def test_a_claim_holds_the_agent_renews_its_lease_and_releases_on_exit(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    lease = 1.0
    with client.claim(labels, lease=lease) as claim:
        # The agent is BUSY, held by this caller (the server without an auth file
        # calls everyone "anonymous"), and the handle shows the same claim.
        assert claim.agent_id == agent_id
        assert claim.agent is not None and claim.agent.status == pb.AGENT_STATUS_BUSY
        assert claim.transition is not None
        assert claim.transition.cause == pb.TRANSITION_CAUSE_CLAIMED
        assert claim.fencing_token == claim.transition.revision
        first = pb.Claim()
        first.CopyFrom(claim.claim)
        assert first.holder == "anonymous"
        assert first.slot_type == pb.SLOT_TYPE_WORK
        assert first.request_id == claim.request_id != ""
        held = get_agent(client, agent_id)
        assert held.status == pb.AGENT_STATUS_BUSY
        assert held.claim.claim_id == first.claim_id
        assert held.claim.fencing_token == first.fencing_token

        # Renewed in the background: still held after several leases, the
        # server's expiry moving forward with each renewal.
        wait_until(
            lambda: claim.renewals >= 4 and seconds(claim.claim.lease_expires_at) > seconds(first.claimed_at) + 3 * lease,
            timeout=WAIT,
            what="renewals past three leases",
        )
        still = get_agent(client, agent_id)
        assert still.status == pb.AGENT_STATUS_BUSY
        assert still.claim.claim_id == first.claim_id
        assert seconds(still.claim.lease_expires_at) > seconds(first.lease_expires_at) + lease
        assert claim.lost is None and claim.active
    # Leaving the block released it: IDLE, no claim, a CLAIM_RELEASED transition.
    after = get_agent(client, agent_id)
    assert after.status == pb.AGENT_STATUS_IDLE
    assert not after.HasField("claim")
    assert not claim.active and claim.lost is None
    last = agent_transitions(client, agent_id)[-1]
    assert last.cause == pb.TRANSITION_CAUSE_CLAIM_RELEASED
    assert (last.from_status, last.to_status) == (pb.AGENT_STATUS_BUSY, pb.AGENT_STATUS_IDLE)
    listed = client.dispatch.ListClaims(dispatch_pb2.ListClaimsRequest(), timeout=30).claims
    assert first.claim_id not in [c.claim_id for c in listed]


def test_an_exception_in_the_block_still_releases(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    with pytest.raises(RuntimeError, match="the work failed"):
        with client.claim(labels, lease=5.0) as claim:
            assert get_agent(client, agent_id).status == pb.AGENT_STATUS_BUSY
            raise RuntimeError("the work failed")
    after = get_agent(client, agent_id)
    assert after.status == pb.AGENT_STATUS_IDLE and not after.HasField("claim")
    assert claim.release_error is None


def test_two_claimers_of_one_idle_agent_one_gets_it_the_other_no_agent_available(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    start = threading.Barrier(2)
    won: List[ClaimHandle] = []
    refused: List[grpc.RpcError] = []

    def claimer() -> None:
        handle = client.claim(labels, lease=10.0)
        start.wait(WAIT)
        try:
            won.append(handle.acquire())
        except grpc.RpcError as error:
            refused.append(error)

    threads = [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    try:
        assert len(won) == 1 and len(refused) == 1, (won, refused)
        assert reason(refused[0]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_AGENT_AVAILABLE")
        assert won[0].agent_id == agent_id
        assert get_agent(client, agent_id).claim.claim_id == won[0].claim_id
    finally:
        for handle in won:
            handle.release()
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE


def test_finish_work_in_the_block_ends_the_claim_and_exit_is_clean(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    with client.claim(labels, lease=5.0) as claim:
        finished = claim.finish_work()
        assert finished.agent.status == pb.AGENT_STATUS_IDLE
        assert not finished.agent.HasField("claim")
        assert not claim.active
    assert claim.lost is None and claim.release_error is None
    # Nothing was released after FinishWork: its transition is the agent's last.
    last = agent_transitions(client, agent_id)[-1]
    assert last.revision == finished.transition.revision
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE
    assert claim.release() is None


def test_report_exhausted_with_the_token_ends_the_claim(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    with client.claim(labels, lease=5.0) as claim:
        report = claim.report_exhausted(
            reason=pb.EXHAUSTION_REASON_RATE_LIMIT, message="Claude AI usage limit reached|4102444800"
        )
        assert report.agent.status == pb.AGENT_STATUS_EXHAUSTED
    after = get_agent(client, agent_id)
    assert after.status == pb.AGENT_STATUS_EXHAUSTED and not after.HasField("claim")
    assert claim.lost is None and claim.release_error is None


def test_a_claim_ended_behind_the_handles_back_is_lost(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    lost: List[ClaimLost] = []
    with client.claim(labels, lease=1.0, on_lost=lost.append) as claim:
        # Someone else ends the claim with its token (an operator, a second
        # process of the same runner): the next renewal is refused.
        client.dispatch.ReleaseClaim(
            dispatch_pb2.ReleaseClaimRequest(claim_id=claim.claim_id, fencing_token=claim.fencing_token), timeout=30
        )
        assert claim.wait_lost(WAIT), "the renewal thread did not notice"
        assert claim.lost is not None and claim.lost.reason == "STALE_FENCING_TOKEN"
        assert lost == [claim.lost]
        assert not claim.active
        with pytest.raises(ClaimLost):
            claim.check()
    # The exit's release was answered STALE_FENCING_TOKEN too: not an error.
    assert claim.release_error is None
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE


def test_a_claim_waits_for_an_agent_to_come_free(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    with client.claim(labels, lease=10.0) as first:
        with pytest.raises(grpc.RpcError) as refused:
            client.claim(labels, lease=10.0).acquire()
        assert reason(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_AGENT_AVAILABLE")

        waiting = client.claim(labels, lease=10.0, wait=WAIT)
        got: List[Any] = []
        waiter = threading.Thread(target=lambda: got.append(waiting.acquire()))
        waiter.start()
        first.release()  # the waiter gets the agent as soon as it is IDLE again
        waiter.join(WAIT)
    assert got == [waiting]
    try:
        assert waiting.agent_id == agent_id and waiting.fencing_token > first.fencing_token
        assert get_agent(client, agent_id).claim.claim_id == waiting.claim_id
    finally:
        waiting.release()


def test_an_expression_selector_and_an_on_call_slot(client: FleetcareClient) -> None:
    labels, (agent_id,) = register_pool(client)
    selector = dispatch_pb2.LabelSelector(
        match_expressions=[
            dispatch_pb2.LabelSelectorRequirement(
                key="pool", operator=dispatch_pb2.SELECTOR_OPERATOR_IN, values=[labels["pool"]]
            )
        ]
    )
    with client.claim(selector, slot_type=pb.SLOT_TYPE_ON_CALL, lease=5.0) as claim:
        assert claim.agent_id == agent_id
        assert claim.claim.slot_type == pb.SLOT_TYPE_ON_CALL
        assert get_agent(client, agent_id).status == pb.AGENT_STATUS_ON_CALL
    assert get_agent(client, agent_id).status == pb.AGENT_STATUS_IDLE


class LosesFirstAnswer:
    """A DispatchService stub whose first `cuts` ClaimAgent calls reach the
    server but fail as a cut connection would, after the server made the claim."""

    class Cut(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection cut before the answer arrived"

    def __init__(self, stub: Any, cuts: int = 1) -> None:
        self._stub = stub
        self._cuts = cuts
        self.requests: List[dispatch_pb2.ClaimAgentRequest] = []

    def ClaimAgent(self, request: dispatch_pb2.ClaimAgentRequest, **kwargs: Any) -> Any:
        self.requests.append(request)
        response = self._stub.ClaimAgent(request, **kwargs)
        if len(self.requests) <= self._cuts:
            raise LosesFirstAnswer.Cut()
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


def test_claim_agent_is_retried_with_the_same_request_id(client: FleetcareClient) -> None:
    labels, agent_ids = register_pool(client, size=2)
    flaky = LosesFirstAnswer(client.dispatch)
    with ClaimHandle(flaky, client.agent_status, labels, lease=5.0) as claim:  # type: ignore[arg-type]
        assert len(flaky.requests) == 2
        assert flaky.requests[0].request_id == flaky.requests[1].request_id == claim.request_id
        # The retry got back the claim the lost answer carried, not a second agent.
        assert claim.transition is None, "a repeated request_id returns the claim without a transition"
        held = [a for a in agent_ids if get_agent(client, a).HasField("claim")]
        assert held == [claim.agent_id]
    assert all(get_agent(client, a).status == pb.AGENT_STATUS_IDLE for a in agent_ids)


def test_refusals_other_than_a_cut_are_not_retried(client: FleetcareClient) -> None:
    counting = LosesFirstAnswer(client.dispatch, cuts=0)
    handle = ClaimHandle(counting, client.agent_status, {"pool": "nobody-has-this-label"}, lease=5.0)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as refused:
        handle.acquire()
    assert reason(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_AGENT_AVAILABLE")
    assert len(counting.requests) == 1, "not retried"
    with pytest.raises(ValueError):
        client.claim(lease=1.0, renew_every=1.0)


def entry(name: str, role: str, token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f'[[caller]]\nname = "{name}"\nrole = "{role}"\ntoken_sha256 = "{digest}"\n\n'


def test_the_holder_is_the_authenticated_caller(server_factory: ServerFactory, tmp_path: Path) -> None:
    callers = tmp_path / "callers.toml"
    callers.write_text(entry("ops", "operator", "ops-token") + entry("scheduler-eu", "scheduler", "sched-token"))
    srv = server_factory(extra_args=["--auth-file", str(callers)])
    with FleetcareClient(srv.address or "", insecure=True, token="ops-token") as ops, FleetcareClient(
        srv.address or "", insecure=True, token="sched-token"
    ) as scheduler:
        labels, (agent_id,) = register_pool(ops)
        with scheduler.claim(labels, lease=5.0) as claim:
            assert claim.claim.holder == "scheduler-eu"
            assert get_agent(ops, agent_id).claim.holder == "scheduler-eu"
            mine = scheduler.dispatch.ListClaims(dispatch_pb2.ListClaimsRequest(holder="scheduler-eu"), timeout=30)
            assert [c.claim_id for c in mine.claims] == [claim.claim_id]
        assert not get_agent(ops, agent_id).HasField("claim")


def test_a_lease_that_no_renewal_reaches_is_lost_and_expires(server: FleetcareServer) -> None:
    """Cut off from the server, the renewals fail until the lease has run out:
    the handle reports LEASE_EXPIRED, and the server (sweeping every second)
    has expired the claim: without the renewals a 1 s lease does not last."""
    direct = FleetcareClient(server.address or "", insecure=True)
    proxy = TcpProxy(("127.0.0.1", server.port)).open()
    through_proxy = FleetcareClient(proxy.address, insecure=True)
    try:
        labels, (agent_id,) = register_pool(direct)
        with through_proxy.claim(labels, lease=1.0) as claim:
            proxy.cut()
            assert claim.wait_lost(WAIT), "the renewals' failures did not end in a lost claim"
            assert claim.lost is not None and claim.lost.reason == "LEASE_EXPIRED"
            assert claim.lost.error is not None and claim.lost.error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            wait_until(lambda: get_agent(direct, agent_id).status == pb.AGENT_STATUS_IDLE, what="the expiry")
            expired = agent_transitions(direct, agent_id)[-1]
            assert expired.cause == pb.TRANSITION_CAUSE_CLAIM_EXPIRED
            assert not get_agent(direct, agent_id).HasField("claim")
            proxy.open()  # same port: the release at the end is answered STALE_FENCING_TOKEN
            # Once the channel is back (its reconnect backoff may still be running).
            through_proxy.agent_status.GetAgent(
                pb.GetAgentRequest(agent_id=agent_id), wait_for_ready=True, timeout=WAIT
            )
        assert claim.release_error is None
        assert agent_transitions(direct, agent_id)[-1].revision == expired.revision
    finally:
        through_proxy.close()
        direct.close()
        proxy.cut()
