"""grpc.health.v1 through the grpcio-health-checking package."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetcare import FleetcareClient


@pytest.mark.parametrize(
    "service",
    [
        "",
        "fleetcare.v1.AgentStatusService",
        "fleetcare.v1.HealingService",
        "fleetcare.v1.PostHealingService",
        "fleetcare.v1.SessionPipelineService",
    ],
)
def test_serving(client: FleetcareClient, service: str) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_service_is_not_found(client: FleetcareClient) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="fleetcare.v1.NoSuchService"), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
