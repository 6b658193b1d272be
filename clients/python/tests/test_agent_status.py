"""AgentStatusService through the generated stubs: lifecycle, refusals, listing."""

from __future__ import annotations

import uuid

import grpc
import pytest

from fleetcare import FleetcareClient, error_info
from fleetcare.v1 import agent_status_pb2 as pb


def test_register_start_finish_and_refusals(client: FleetcareClient) -> None:
    stub = client.agent_status
    agent_id = f"worker-{uuid.uuid4().hex[:12]}"

    registered = stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id, labels={"team": "infra"}))
    assert registered.created
    assert registered.agent.agent_id == agent_id
    assert registered.agent.status == pb.AGENT_STATUS_IDLE
    assert dict(registered.agent.labels) == {"team": "infra"}
    assert registered.agent.revision > 0

    again = stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id, labels={"team": "infra"}))
    assert not again.created
    assert again.agent.revision == registered.agent.revision  # no transition for a re-registration

    started = stub.StartWork(pb.StartWorkRequest(agent_id=agent_id, slot_type=pb.SLOT_TYPE_WORK))
    assert started.agent.status == pb.AGENT_STATUS_BUSY
    t = started.transition
    assert (t.agent_id, t.from_status, t.to_status, t.cause) == (
        agent_id,
        pb.AGENT_STATUS_IDLE,
        pb.AGENT_STATUS_BUSY,
        pb.TRANSITION_CAUSE_WORK_STARTED,
    )
    assert t.revision > registered.agent.revision
    assert started.agent.revision == t.revision

    # BUSY cannot start work again.
    with pytest.raises(grpc.RpcError) as refused:
        stub.StartWork(pb.StartWorkRequest(agent_id=agent_id, slot_type=pb.SLOT_TYPE_WORK))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused.value)
    assert info is not None
    assert (info.domain, info.reason) == ("fleetcare.v1", "TRANSITION_REFUSED")

    finished = stub.FinishWork(pb.FinishWorkRequest(agent_id=agent_id))
    assert finished.agent.status == pb.AGENT_STATUS_IDLE
    assert finished.transition.from_status == pb.AGENT_STATUS_BUSY
    assert finished.transition.cause == pb.TRANSITION_CAUSE_WORK_FINISHED
    assert finished.transition.revision > t.revision

    # IDLE cannot finish work.
    with pytest.raises(grpc.RpcError) as refused_finish:
        stub.FinishWork(pb.FinishWorkRequest(agent_id=agent_id))
    assert refused_finish.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    got = stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id)).agent
    assert got.status == pb.AGENT_STATUS_IDLE
    assert got.revision == finished.transition.revision

    history = stub.ListTransitions(pb.ListTransitionsRequest(agent_id=agent_id))
    assert [(x.revision, x.cause) for x in history.transitions] == [
        (registered.agent.revision, pb.TRANSITION_CAUSE_REGISTERED),
        (t.revision, pb.TRANSITION_CAUSE_WORK_STARTED),
        (finished.transition.revision, pb.TRANSITION_CAUSE_WORK_FINISHED),
    ]
    assert history.head_revision >= finished.transition.revision


def test_unknown_agent_is_not_found(client: FleetcareClient) -> None:
    missing = f"ghost-{uuid.uuid4().hex[:12]}"
    with pytest.raises(grpc.RpcError) as get:
        client.agent_status.GetAgent(pb.GetAgentRequest(agent_id=missing))
    assert get.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as start:
        client.agent_status.StartWork(pb.StartWorkRequest(agent_id=missing, slot_type=pb.SLOT_TYPE_WORK))
    assert start.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(start.value)
    assert info is not None and info.reason == "NOT_FOUND"


def test_invalid_agent_id_is_invalid_argument(client: FleetcareClient) -> None:
    with pytest.raises(grpc.RpcError) as bad:
        client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="no spaces allowed"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_agents_filters_and_pages(client: FleetcareClient) -> None:
    stub = client.agent_status
    run = uuid.uuid4().hex[:12]
    ids = [f"list-{run}-{i}" for i in range(3)]
    for agent_id in reversed(ids):
        stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id, labels={"run": run}))
    stub.StartWork(pb.StartWorkRequest(agent_id=ids[1], slot_type=pb.SLOT_TYPE_WORK))
    stub.StartWork(pb.StartWorkRequest(agent_id=ids[2], slot_type=pb.SLOT_TYPE_ON_CALL))

    everything = stub.ListAgents(pb.ListAgentsRequest(labels={"run": run}))
    assert [(a.agent_id, a.status) for a in everything.agents] == [
        (ids[0], pb.AGENT_STATUS_IDLE),
        (ids[1], pb.AGENT_STATUS_BUSY),
        (ids[2], pb.AGENT_STATUS_ON_CALL),
    ]
    assert everything.next_page_token == ""

    busy = stub.ListAgents(pb.ListAgentsRequest(labels={"run": run}, statuses=[pb.AGENT_STATUS_BUSY]))
    assert [a.agent_id for a in busy.agents] == [ids[1]]

    first = stub.ListAgents(pb.ListAgentsRequest(labels={"run": run}, page_size=2))
    assert [a.agent_id for a in first.agents] == ids[:2]
    assert first.next_page_token
    second = stub.ListAgents(pb.ListAgentsRequest(labels={"run": run}, page_size=2, page_token=first.next_page_token))
    assert [a.agent_id for a in second.agents] == ids[2:]
    assert second.next_page_token == ""
