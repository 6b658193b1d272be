// A thin convenience layer over the generated code: one HTTP/2 connection
// (gRPC protocol) and a typed client per service. The generated descriptors
// and messages (src/gen) stay the main API.

import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { SecureClientSessionOptions } from "node:http2";

import { AgentStatusService } from "./gen/fleetcare/v1/agent_status_pb.js";
import { DispatchService } from "./gen/fleetcare/v1/dispatch_pb.js";
import { HealingService, PostHealingService } from "./gen/fleetcare/v1/healing_pb.js";
import { QuotaService } from "./gen/fleetcare/v1/quota_pb.js";
import { SessionPipelineService } from "./gen/fleetcare/v1/session_pipeline_pb.js";
import { Health } from "./gen/grpc/health/v1/health_pb.js";

/** TLS settings; `tls: true` means TLS with the system's root certificates. */
export interface TlsOptions {
  /** PEM root certificate(s) to trust instead of the system's. */
  ca?: string | Buffer;
  /** PEM client certificate, for mutual TLS. */
  cert?: string | Buffer;
  /** PEM private key of `cert`. */
  key?: string | Buffer;
  /** Server name to verify (SNI), when it differs from the address's host. */
  servername?: string;
  /** Defaults to true; false skips certificate verification (tests only). */
  rejectUnauthorized?: boolean;
}

export interface FleetcareClientOptions {
  /** "host:port" (e.g. "127.0.0.1:50051"), or a URL "http://host:port" / "https://host:port". */
  address: string;
  /** Sent on every call as `authorization: Bearer <token>`. */
  token?: string;
  /** TLS: true, or TLS options. Default: plaintext HTTP/2 (h2c), unless `address` is an https URL. */
  tls?: boolean | TlsOptions;
  /** Extra interceptors, run after the token interceptor. */
  interceptors?: Interceptor[];
  /** Default deadline of every call, in milliseconds (none by default; streams usually want none). */
  defaultTimeoutMs?: number;
  /** HTTP/2 PING interval to detect dead connections under long-lived streams (default: 30 s; 0 disables). */
  pingIntervalMs?: number;
}

export interface FleetcareClient {
  agentStatus: Client<typeof AgentStatusService>;
  healing: Client<typeof HealingService>;
  postHealing: Client<typeof PostHealingService>;
  sessionPipeline: Client<typeof SessionPipelineService>;
  /** Claims, cordons, resume and delete (see claimAgent and withClaim for claims). */
  dispatch: Client<typeof DispatchService>;
  /** Quota pools: list and show them, park and release them by hand. */
  quota: Client<typeof QuotaService>;
  /** grpc.health.v1.Health (from the vendored upstream proto). */
  health: Client<typeof Health>;
  /** The underlying gRPC transport, to create clients for other services on the same connection. */
  transport: Transport;
  /** Closes the connection; calls in flight fail with Code.Canceled. */
  close(): void;
}

/** An interceptor that sends `authorization: Bearer <token>` on every call. */
export function bearerTokenInterceptor(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => async (req) => {
    req.header.set("authorization", value);
    return next(req);
  };
}

/** Turns "host:port" or a URL into the base URL of the transport. */
export function baseUrlFor(address: string, tls: boolean): string {
  if (address.includes("://")) {
    return address.replace(/\/+$/, "");
  }
  return `${tls ? "https" : "http"}://${address}`;
}

/** Creates typed clients for the fleetcare services over one gRPC (HTTP/2) connection. */
export function createFleetcareClient(options: FleetcareClientOptions): FleetcareClient {
  const useTls =
    options.tls === undefined ? options.address.startsWith("https://") : options.tls !== false;
  const baseUrl = baseUrlFor(options.address, useTls);
  const nodeOptions: SecureClientSessionOptions = {};
  if (typeof options.tls === "object") {
    const { ca, cert, key, servername, rejectUnauthorized } = options.tls;
    Object.assign(nodeOptions, { ca, cert, key, servername, rejectUnauthorized });
    for (const k of Object.keys(nodeOptions) as (keyof SecureClientSessionOptions)[]) {
      if (nodeOptions[k] === undefined) delete nodeOptions[k];
    }
  }
  const pingIntervalMs = options.pingIntervalMs ?? 30_000;
  const sessionManager = new Http2SessionManager(
    baseUrl,
    pingIntervalMs > 0 ? { pingIntervalMs } : {},
    nodeOptions,
  );
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined && options.token !== "") {
    interceptors.push(bearerTokenInterceptor(options.token));
  }
  interceptors.push(...(options.interceptors ?? []));
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager,
    interceptors,
    defaultTimeoutMs: options.defaultTimeoutMs,
  });
  return {
    agentStatus: createClient(AgentStatusService, transport),
    healing: createClient(HealingService, transport),
    postHealing: createClient(PostHealingService, transport),
    sessionPipeline: createClient(SessionPipelineService, transport),
    dispatch: createClient(DispatchService, transport),
    quota: createClient(QuotaService, transport),
    health: createClient(Health, transport),
    transport,
    close: () => sessionManager.abort(),
  };
}
