"""TLS and the bearer token against the real server: `fleetcare serve
--tls-cert/--tls-key` (and `--tls-client-ca` for mutual TLS) with certificates
from a test CA made with the openssl CLI (conftest.make_pki)."""

from __future__ import annotations

import grpc
import pytest
from conftest import Pki, ServerFactory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb


def health(client: FleetcareClient) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status


def refused(client: FleetcareClient) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        health(client)
    return error.value.code()


def test_tls_with_the_ca_file_and_a_token(server_factory: ServerFactory, pki: Pki) -> None:
    server = server_factory(extra_args=pki.server_args())
    with FleetcareClient(f"localhost:{server.port}", token="s3cret", root_certificates=pki.ca.read_bytes()) as client:
        assert health(client) == health_pb2.HealthCheckResponse.SERVING
        # A fleetcare call that reads no agent: only the connection is under test.
        explained = client.agent_status.ExplainRecovery(
            pb.ExplainRecoveryRequest(message="rate limit exceeded, try again in 30 seconds"), timeout=30
        )
        assert explained.HasField("recovery_at")


def test_tls_refuses_plaintext_and_clients_that_do_not_trust_the_ca(server_factory: ServerFactory, pki: Pki) -> None:
    server = server_factory(extra_args=pki.server_args())
    # The system's roots do not include the test CA.
    with FleetcareClient(f"localhost:{server.port}") as untrusting:
        assert refused(untrusting) == grpc.StatusCode.UNAVAILABLE
    with FleetcareClient(f"127.0.0.1:{server.port}", insecure=True) as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE


def test_register_agent_over_tls_with_a_token(server_factory: ServerFactory, pki: Pki) -> None:
    server = server_factory(extra_args=pki.server_args())
    with FleetcareClient(f"localhost:{server.port}", token="s3cret", root_certificates=pki.ca.read_bytes()) as client:
        registered = client.agent_status.RegisterAgent(pb.RegisterAgentRequest(agent_id="py-tls"), timeout=30)
        assert registered.agent.agent_id == "py-tls"
        got = client.agent_status.GetAgent(pb.GetAgentRequest(agent_id="py-tls"), timeout=30)
        assert got.agent.status == pb.AGENT_STATUS_IDLE


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory(extra_args=pki.server_args(mutual=True))
    address = f"localhost:{server.port}"
    roots = pki.ca.read_bytes()
    with FleetcareClient(address, root_certificates=roots) as anonymous:
        assert refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    with FleetcareClient(
        address,
        token="s3cret",
        root_certificates=roots,
        certificate_chain=pki.client_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
    ) as client:
        assert health(client) == health_pb2.HealthCheckResponse.SERVING
