import assert from "node:assert/strict";
import { test } from "node:test";

import { Code, HealthCheckResponse_ServingStatus as ServingStatus } from "../src/index.js";
import { rejectsWithCode } from "./helpers/assert.js";
import { useServer } from "./helpers/fixture.js";

const live = useServer();

test("grpc.health.v1.Health/Check reports SERVING for the server and each service", async () => {
  for (const service of [
    "",
    "fleetcare.v1.AgentStatusService",
    "fleetcare.v1.HealingService",
    "fleetcare.v1.PostHealingService",
    "fleetcare.v1.SessionPipelineService",
  ]) {
    const res = await live.client.health.check({ service }, { timeoutMs: 10_000 });
    assert.equal(res.status, ServingStatus.SERVING, `service ${JSON.stringify(service)}`);
  }
});

test("an unknown service is NOT_FOUND", async () => {
  await rejectsWithCode(live.client.health.check({ service: "no.such.Service" }), Code.NotFound);
});
