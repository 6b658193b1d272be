"""Agents sharing one Claude Code subscription: register them in its quota pool,
report a 429 from one of them, and see the whole pool parked.

    FLEETCARE_SERVER=127.0.0.1:50051 python examples/quota_pools.py
"""

import os

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import quota_pb2

address = os.environ.get("FLEETCARE_SERVER", "127.0.0.1:50051")
account = "anthropic/acct-42"  # the subscription: its 5-hour and weekly limits bind every agent on it
opus = f"{account}/opus"  # a per-model limit within it
members = {
    "claude-opus-1": [account, opus],
    "claude-sonnet-1": [account],
    "claude-sonnet-2": [account],
}

with FleetcareClient(address, insecure=True) as client:
    agents = client.agent_status

    for agent_id, pools in members.items():
        registered = agents.RegisterAgent(
            pb.RegisterAgentRequest(agent_id=agent_id, labels={"provider": "anthropic"}, quota_pools=pools)
        )
        print(f"registered {agent_id} in {', '.join(registered.agent.quota_pools)}")

    # claude-sonnet-1's run got a 429: the subscription's 5-hour limit. Reported for
    # the pool, it parks every IDLE agent on the account in the same commit.
    report = agents.ReportExhausted(
        pb.ReportExhaustedRequest(
            agent_id="claude-sonnet-1",
            reason=pb.EXHAUSTION_REASON_RATE_LIMIT,
            message="You've hit your session limit · resets 12:50am (America/Los_Angeles)",
            quota_pool=account,
            window=pb.QUOTA_WINDOW_FIVE_HOUR,
        )
    )
    print(f"claude-sonnet-1 reported {report.transition.quota_pool}: {pb.AgentStatus.Name(report.agent.status)}")

    for agent_id in members:
        agent = agents.GetAgent(pb.GetAgentRequest(agent_id=agent_id)).agent
        print(f"{agent_id} is {pb.AgentStatus.Name(agent.status)}, held by {', '.join(agent.held_by_pools)}")

    # The operator's view: every pool, parked or not (client.quota is the QuotaService stub).
    for pool in client.quota.ListQuotaPools(quota_pb2.ListQuotaPoolsRequest()).pools:
        windows = "".join(
            f", {pb.QuotaWindow.Name(w.window)} until {w.until.ToJsonString()}" for w in pool.windows if w.in_force
        )
        print(f"pool {pool.name}: {quota_pb2.QuotaPoolPhase.Name(pool.phase)}, {pool.held} held{windows}")
