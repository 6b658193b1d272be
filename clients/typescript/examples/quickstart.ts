import { AgentStatus, createFleetcareClient, SlotType } from "@fleetcare/client";

const fleet = createFleetcareClient({ address: process.env.FLEETCARE_SERVER ?? "127.0.0.1:50051" });
const agents = fleet.agentStatus;
const agentId = `quickstart-${process.pid}`;

try {
  const { agent, created } = await agents.registerAgent({ agentId, labels: { team: "docs" } });
  console.log(`registered ${agentId}: ${AgentStatus[agent!.status]} (created: ${created})`);

  const started = await agents.startWork({ agentId, slotType: SlotType.WORK });
  console.log(`started work: ${AgentStatus[started.agent!.status]} at revision ${started.transition!.revision}`);

  const finished = await agents.finishWork({ agentId });
  console.log(`finished work: ${AgentStatus[finished.agent!.status]} at revision ${finished.transition!.revision}`);

  const { agent: now } = await agents.getAgent({ agentId });
  console.log(`status of ${now!.agentId}: ${AgentStatus[now!.status]}`);
} finally {
  fleet.close();
}
