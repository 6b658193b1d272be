"""examples/quickstart.py (pasted into the top-level README) against the live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import CLIENT_DIR, FleetcareServer

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb


def test_quickstart_runs_against_the_server(server: FleetcareServer, client: FleetcareClient) -> None:
    env = dict(os.environ, FLEETCARE_SERVER=server.address or "")
    result = subprocess.run(
        [sys.executable, str(CLIENT_DIR / "examples" / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert lines[0] == "registered quickstart-agent: AGENT_STATUS_IDLE"
    started = re.fullmatch(r"started work: AGENT_STATUS_BUSY \(revision (\d+)\)", lines[1])
    finished = re.fullmatch(r"finished work: AGENT_STATUS_IDLE \(revision (\d+)\)", lines[2])
    final = re.fullmatch(r"quickstart-agent is AGENT_STATUS_IDLE at revision (\d+)", lines[3])
    assert started and finished and final, result.stdout
    assert int(started[1]) < int(finished[1]) == int(final[1])

    # The server agrees with what the example printed.
    history = client.agent_status.ListTransitions(pb.ListTransitionsRequest(agent_id="quickstart-agent"))
    assert [(t.revision, t.to_status) for t in history.transitions][-2:] == [
        (int(started[1]), pb.AGENT_STATUS_BUSY),
        (int(finished[1]), pb.AGENT_STATUS_IDLE),
    ]
    agent = client.agent_status.GetAgent(pb.GetAgentRequest(agent_id="quickstart-agent")).agent
    assert dict(agent.labels) == {"team": "infra"}
