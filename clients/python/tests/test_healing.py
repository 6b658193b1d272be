"""HealingService: report, plan, outcome, statistics."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import duration_pb2

from fleetcare import FleetcareClient, error_info
from fleetcare.v1 import healing_pb2 as pb


def test_report_plan_outcome_and_statistics(client: FleetcareClient) -> None:
    healing = client.healing
    agent_id = f"healer-{uuid.uuid4().hex[:12]}"
    # A component nobody else uses: nothing is learned for this context signature yet.
    component = f"gateway-{uuid.uuid4().hex[:12]}"
    before = healing.GetHealingStatistics(pb.GetHealingStatisticsRequest())

    event = healing.ReportError(
        pb.ReportErrorRequest(
            agent_id=agent_id,
            message="connection reset by peer while calling the upstream API",
            context={"component": component, "request_id": "r-1"},
        )
    ).event
    assert event.id > 0
    assert event.agent_id == agent_id
    assert event.error_type == pb.ERROR_TYPE_COMMUNICATION_ERROR  # classified from "connection"
    assert 0.0 < event.severity < 0.8 and not event.critical
    assert not event.recurring
    assert dict(event.context) == {"component": component, "request_id": "r-1"}

    action = healing.PlanRecovery(pb.PlanRecoveryRequest(error_event_id=event.id)).action
    assert action.error_event_id == event.id
    assert action.agent_id == agent_id
    assert action.status == pb.RECOVERY_STATUS_ACTIVE
    # Nothing learned: the heuristic for a communication error, far below the safety limit.
    assert action.strategy == pb.RECOVERY_STRATEGY_WAIT_AND_RETRY
    assert action.chosen_strategy == pb.RECOVERY_STRATEGY_WAIT_AND_RETRY
    assert action.reason == "heuristic"
    assert not action.escalated
    assert action.risk_score == pytest.approx(0.2)
    assert action.context_signature == f"component={component}"  # request_id is not identifying
    assert action.HasField("lease_expires_at")

    # At most one active recovery per agent.
    second = healing.ReportError(
        pb.ReportErrorRequest(agent_id=agent_id, message="network timeout", context={"component": component})
    ).event
    with pytest.raises(grpc.RpcError) as busy:
        healing.PlanRecovery(pb.PlanRecoveryRequest(error_event_id=second.id))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(action.id) in (busy.value.details() or "")

    mid = healing.GetHealingStatistics(pb.GetHealingStatisticsRequest())
    assert mid.active_recoveries == before.active_recoveries + 1

    done = healing.ReportRecoveryOutcome(
        pb.ReportRecoveryOutcomeRequest(
            action_id=action.id, success=True, duration=duration_pb2.Duration(seconds=42), details="reconnected"
        )
    ).action
    assert done.id == action.id
    assert done.status == pb.RECOVERY_STATUS_SUCCEEDED
    assert done.duration.seconds == 42
    assert done.details == "reconnected"
    assert done.HasField("completed_at")

    with pytest.raises(grpc.RpcError) as twice:
        healing.ReportRecoveryOutcome(pb.ReportRecoveryOutcomeRequest(action_id=action.id, success=False))
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(twice.value)
    assert info is not None and info.reason == "OUTCOME_ALREADY_RECORDED"

    after = healing.GetHealingStatistics(pb.GetHealingStatisticsRequest())
    assert after.total_errors == before.total_errors + 2
    assert after.errors_last_hour == before.errors_last_hour + 2
    by_type = {c.error_type: c.count for c in after.errors_by_type}
    before_by_type = {c.error_type: c.count for c in before.errors_by_type}
    assert by_type[pb.ERROR_TYPE_COMMUNICATION_ERROR] == before_by_type.get(pb.ERROR_TYPE_COMMUNICATION_ERROR, 0) + 2
    assert after.active_recoveries == before.active_recoveries

    learned = [p for p in after.patterns if p.context_signature == action.context_signature]
    assert len(learned) == 1
    pattern = learned[0]
    assert pattern.error_type == pb.ERROR_TYPE_COMMUNICATION_ERROR
    assert pattern.strategy == pb.RECOVERY_STRATEGY_WAIT_AND_RETRY
    assert (pattern.successes, pattern.failures, pattern.use_count) == (1, 0, 1)
    assert pattern.success_rate == pytest.approx(1.0)
    assert pattern.mean_recovery_time.seconds == 42
    assert 0.0 < after.overall_success_rate <= 1.0

    history = healing.ListRecoveryActions(pb.ListRecoveryActionsRequest(agent_id=agent_id))
    assert [(a.id, a.status) for a in history.actions] == [(action.id, pb.RECOVERY_STATUS_SUCCEEDED)]
    events = healing.ListErrorEvents(pb.ListErrorEventsRequest(agent_id=agent_id))
    assert [e.id for e in events.events] == [second.id, event.id]  # newest first
