"""Register an agent, start and finish work, and print its status.

    FLEETCARE_SERVER=127.0.0.1:50051 python examples/quickstart.py
"""

import os

from fleetcare import FleetcareClient
from fleetcare.v1 import agent_status_pb2 as pb

address = os.environ.get("FLEETCARE_SERVER", "127.0.0.1:50051")
agent_id = "quickstart-agent"

# Plaintext here; for a server started with --tls-cert/--tls-key, drop insecure=True and pass
# root_certificates=open("ca.pem", "rb").read() (or nothing, for the system's roots), and
# token="..." to send "authorization: Bearer <token>" on every call.
with FleetcareClient(address, insecure=True) as client:
    agents = client.agent_status

    registered = agents.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id, labels={"team": "infra"}))
    print(f"registered {agent_id}: {pb.AgentStatus.Name(registered.agent.status)}")

    started = agents.StartWork(pb.StartWorkRequest(agent_id=agent_id, slot_type=pb.SLOT_TYPE_WORK))
    print(f"started work: {pb.AgentStatus.Name(started.agent.status)} (revision {started.transition.revision})")

    finished = agents.FinishWork(pb.FinishWorkRequest(agent_id=agent_id))
    print(f"finished work: {pb.AgentStatus.Name(finished.agent.status)} (revision {finished.transition.revision})")

    agent = agents.GetAgent(pb.GetAgentRequest(agent_id=agent_id)).agent
    print(f"{agent.agent_id} is {pb.AgentStatus.Name(agent.status)} at revision {agent.revision}")
