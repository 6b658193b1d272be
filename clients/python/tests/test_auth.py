"""Bearer tokens against the real server, started with an auth file: the
client's token is what the server authenticates, each role is held to what it
may do, and every change records who made it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetcare import FleetcareClient, error_info
from fleetcare.v1 import agent_status_pb2 as pb
from fleetcare.v1 import healing_pb2

from conftest import ServerFactory


def entry(name: str, role: str, token: str, agents: Sequence[str] = ()) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    lines = ["[[caller]]", f'name = "{name}"', f'role = "{role}"', f'token_sha256 = "{digest}"']
    if agents:
        lines.append("agents = [" + ", ".join(f'"{a}"' for a in agents) + "]")
    return "\n".join(lines) + "\n\n"


@pytest.fixture
def auth_server(server_factory: ServerFactory, tmp_path: Path) -> str:
    callers = tmp_path / "callers.toml"
    callers.write_text(
        entry("alice", "operator", "alice-token")
        + entry("carol", "reader", "carol-token")
        + entry("runner", "agent", "runner-token", ["py-eu-*"])
    )
    srv = server_factory(extra_args=["--auth-file", str(callers)])
    assert srv.address is not None
    return srv.address


def refusal(error: pytest.ExceptionInfo[grpc.RpcError]) -> tuple:
    info = error_info(error.value)
    return (error.value.code(), info.reason if info else None)


def test_calls_without_a_known_token_are_unauthenticated(auth_server: str) -> None:
    for token in (None, "garbage"):
        with FleetcareClient(auth_server, token=token, insecure=True) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.agent_status.ListAgents(pb.ListAgentsRequest(), timeout=30)
            assert refusal(error) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
            # Health answers without a token.
            health = health_pb2_grpc.HealthStub(client.channel)
            response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_each_role_is_held_to_its_calls_and_the_actor_is_recorded(auth_server: str) -> None:
    with FleetcareClient(auth_server, token="alice-token", insecure=True) as alice:
        alice.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-us-1"), timeout=30)
    with FleetcareClient(auth_server, token="runner-token", insecure=True) as runner:
        runner.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-eu-1"), timeout=30)
        runner.agent_status.Heartbeat(pb.HeartbeatRequest(agent_id="py-eu-1"), timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            runner.agent_status.Heartbeat(pb.HeartbeatRequest(agent_id="py-us-1"), timeout=30)
        assert refusal(error) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert "py-us-1" in (error.value.details() or "")
        event = runner.healing.ReportError(
            healing_pb2.ReportErrorRequest(agent_id="py-eu-1", message="tool call failed"), timeout=30
        ).event
        assert event.actor == "runner"
    with FleetcareClient(auth_server, token="carol-token", insecure=True) as carol:
        assert len(carol.agent_status.ListAgents(pb.ListAgentsRequest(), timeout=30).agents) == 2
        with pytest.raises(grpc.RpcError) as error:
            carol.agent_status.MarkOffline(pb.MarkOfflineRequest(agent_id="py-eu-1"), timeout=30)
        assert refusal(error) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert "carol (reader) may not call MarkOffline" in (error.value.details() or "")
    with FleetcareClient(auth_server, token="alice-token", insecure=True) as alice:
        offline = alice.agent_status.MarkOffline(pb.MarkOfflineRequest(agent_id="py-eu-1"), timeout=30)
        assert offline.transition.actor == "alice"
        history = alice.agent_status.ListTransitions(
            pb.ListTransitionsRequest(agent_id="py-eu-1"), timeout=30
        ).transitions
        assert [t.actor for t in history] == ["runner", "alice"]
