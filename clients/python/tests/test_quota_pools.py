"""Quota pools through the package against the real server: agents registered
with ``quota_pools``, one member's report (``claim.report_exhausted`` with
``quota_pool`` and ``window``) parking its IDLE sibling, ``client.quota``
(QuotaService) showing the pool PARKED, an operator's ParkPool and ReleasePool
(the canary first, the rest after its work slot), and examples/quota_pools.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from conftest import CLIENT_DIR, ServerFactory, agent_transitions, get_agent, register_pool, unique_name, wait_until
from google.protobuf import timestamp_pb2

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import quota_pb2

WAIT = 30.0


def quota_pool_name(prefix: str = "anthropic") -> str:
    return f"{prefix}/{unique_name('acct').replace('_', '-')}"


def test_a_report_for_the_pool_parks_the_idle_sibling_and_quota_service_shows_it(client: FleetcareClient) -> None:
    pool = quota_pool_name()
    labels, agent_ids = register_pool(client, 2, prefix="py-quota", quota_pools=[pool])
    for agent_id in agent_ids:
        agent = get_agent(client, agent_id)
        assert list(agent.quota_pools) == [pool]
        assert agent.status == pb.AGENT_STATUS_IDLE and not agent.held_by_pools

    # One member's run hits the 5-hour limit: it reports for the pool, with its claim's token.
    resets = int(time.time()) + 2 * 3600
    with client.claim(labels, lease=5.0) as claim:
        report = claim.report_exhausted(
            reason=pb.EXHAUSTION_REASON_RATE_LIMIT,
            message=f"Claude AI usage limit reached|{resets}",
            quota_pool=pool,
            window=pb.QUOTA_WINDOW_FIVE_HOUR,
        )
    assert claim.lost is None and claim.release_error is None
    reporter = claim.agent_id
    (sibling,) = [a for a in agent_ids if a != reporter]
    assert report.agent.status == pb.AGENT_STATUS_EXHAUSTED
    assert list(report.agent.held_by_pools) == [pool]
    assert report.transition.cause == pb.TRANSITION_CAUSE_EXHAUSTED
    assert report.transition.quota_pool == pool

    # The sibling, IDLE, was parked in the same commit, held by the pool.
    parked = get_agent(client, sibling)
    assert parked.status == pb.AGENT_STATUS_EXHAUSTED
    assert list(parked.held_by_pools) == [pool]
    last = agent_transitions(client, sibling)[-1]
    assert (last.cause, last.quota_pool) == (pb.TRANSITION_CAUSE_POOL_EXHAUSTED, pool)
    assert last.revision == report.transition.revision + 1

    # The operator's view through client.quota.
    got = client.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool=pool), timeout=30)
    assert got.pool.name == pool
    assert got.pool.phase == quota_pb2.QUOTA_POOL_PHASE_PARKED
    assert got.pool.held == 2
    assert list(got.held_agent_ids) == sorted(agent_ids)
    assert got.pool.parked_until.seconds == resets
    (window,) = got.pool.windows
    assert window.window == pb.QUOTA_WINDOW_FIVE_HOUR and window.in_force
    assert window.reported_by == reporter
    assert {m.status: m.count for m in got.pool.members} == {pb.AGENT_STATUS_EXHAUSTED: 2}

    listed = client.quota.ListQuotaPools(quota_pb2.ListQuotaPoolsRequest(parked_only=True), timeout=30).pools
    mine = [p for p in listed if p.name == pool]
    assert len(mine) == 1 and mine[0].phase == quota_pb2.QUOTA_POOL_PHASE_PARKED and mine[0].held == 2
    every = [p.name for p in client.quota.ListQuotaPools(quota_pb2.ListQuotaPoolsRequest(), timeout=30).pools]
    assert pool in every and every == sorted(every)


def test_an_operator_parks_and_releases_a_pool_canary_first(server_factory: ServerFactory) -> None:
    # No spread: the members after the canary follow as soon as it completes a work slot.
    server = server_factory(extra_args=["--pool-release-spread", "0s"])
    assert server.address is not None
    with FleetcareClient(server.address, insecure=True) as client:
        pool = quota_pool_name("key")
        _, agent_ids = register_pool(client, 2, prefix="py-quota-op", quota_pools=[pool])
        until = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
        parked = client.quota.ParkPool(
            quota_pb2.ParkPoolRequest(pool=pool, until=until, window=pb.QUOTA_WINDOW_BILLING, reason="invoice unpaid"),
            timeout=30,
        )
        assert parked.members_parked == 2
        assert parked.pool.phase == quota_pb2.QUOTA_POOL_PHASE_PARKED
        assert parked.pool.windows[0].source == "OPERATOR"
        for agent_id in agent_ids:
            agent = get_agent(client, agent_id)
            assert agent.status == pb.AGENT_STATUS_EXHAUSTED and list(agent.held_by_pools) == [pool]

        released = client.quota.ReleasePool(quota_pb2.ReleasePoolRequest(pool=pool, reason="paid"), timeout=30)
        assert not any(w.in_force for w in released.pool.windows)
        # The canary comes back first, then the other after the canary's work slot.
        wait_until(
            lambda: client.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool=pool), timeout=30).pool.canary_agent_id,
            timeout=WAIT,
            what="the canary released",
        )
        canary = client.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool=pool), timeout=30).pool.canary_agent_id
        back = get_agent(client, canary)
        assert back.status == pb.AGENT_STATUS_IDLE and not back.held_by_pools
        last = agent_transitions(client, canary)[-1]
        assert (last.cause, last.quota_pool) == (pb.TRANSITION_CAUSE_POOL_RELEASED, pool)
        client.agent_status.StartWork(pb.StartWorkRequest(agent_id=canary, slot_type=pb.SLOT_TYPE_WORK), timeout=30)
        client.agent_status.FinishWork(pb.FinishWorkRequest(agent_id=canary), timeout=30)
        wait_until(
            lambda: all(get_agent(client, a).status == pb.AGENT_STATUS_IDLE for a in agent_ids),
            timeout=WAIT,
            what="every member released",
        )
        wait_until(
            lambda: client.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool=pool), timeout=30).pool.phase
            == quota_pb2.QUOTA_POOL_PHASE_OPEN,
            timeout=WAIT,
            what="the pool open",
        )


def test_the_quota_pools_example_runs_against_a_fresh_server(server_factory: ServerFactory) -> None:
    server = server_factory()
    env = dict(os.environ, FLEETCARE_SERVER=server.address or "")
    result = subprocess.run(
        [sys.executable, str(CLIENT_DIR / "examples" / "quota_pools.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "registered claude-opus-1 in anthropic/acct-42, anthropic/acct-42/opus",
        "registered claude-sonnet-1 in anthropic/acct-42",
        "registered claude-sonnet-2 in anthropic/acct-42",
        "claude-sonnet-1 reported anthropic/acct-42: AGENT_STATUS_EXHAUSTED",
        "claude-opus-1 is AGENT_STATUS_EXHAUSTED, held by anthropic/acct-42",
        "claude-sonnet-1 is AGENT_STATUS_EXHAUSTED, held by anthropic/acct-42",
        "claude-sonnet-2 is AGENT_STATUS_EXHAUSTED, held by anthropic/acct-42",
    ], result.stdout
    assert len(lines) == 9, result.stdout
    assert re.fullmatch(
        r"pool anthropic/acct-42: QUOTA_POOL_PHASE_PARKED, 3 held, QUOTA_WINDOW_FIVE_HOUR until \S+Z", lines[7]
    ), lines[7]
    assert lines[8] == "pool anthropic/acct-42/opus: QUOTA_POOL_PHASE_OPEN, 0 held"

    # The server agrees with what the example printed.
    with FleetcareClient(server.address or "", insecure=True) as client:
        got = client.quota.GetQuotaPool(quota_pb2.GetQuotaPoolRequest(pool="anthropic/acct-42"), timeout=30)
        assert list(got.held_agent_ids) == ["claude-opus-1", "claude-sonnet-1", "claude-sonnet-2"]
        assert got.pool.windows[0].reported_by == "claude-sonnet-1"
        assert list(get_agent(client, "claude-opus-1").quota_pools) == ["anthropic/acct-42", "anthropic/acct-42/opus"]
