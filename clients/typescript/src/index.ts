// @fleetcare/client: generated messages and service descriptors for
// fleetcare.v1 (and grpc.health.v1), plus a thin convenience layer.

export * from "./gen/fleetcare/v1/agent_status_pb.js";
export * from "./gen/fleetcare/v1/dispatch_pb.js";
export * from "./gen/fleetcare/v1/healing_pb.js";
export * from "./gen/fleetcare/v1/quota_pb.js";
export * from "./gen/fleetcare/v1/session_pipeline_pb.js";
export * from "./gen/grpc/health/v1/health_pb.js";
export * from "./client.js";
export * from "./watch.js";
export * from "./heartbeat.js";
export * from "./claim.js";
export { Code, ConnectError } from "@connectrpc/connect";
