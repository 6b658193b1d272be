// Claims: hold one agent for a piece of work, with the lease renewed in the
// background and the claim released at the end, also when the work throws.

import { randomUUID } from "node:crypto";
import { performance } from "node:perf_hooks";

import type { MessageInitShape } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

import {
  SlotType,
  type Agent,
  type Claim,
  type FinishWorkResponse,
  type ReportExhaustedRequest,
  type ReportExhaustedResponse,
  type Transition,
} from "./gen/fleetcare/v1/agent_status_pb.js";
import type { LabelSelectorSchema, ReleaseClaimResponse } from "./gen/fleetcare/v1/dispatch_pb.js";
import type { FleetcareClient } from "./client.js";
import { isRetryableHeartbeatError } from "./heartbeat.js";

/** The google.rpc.ErrorInfo fleetcare attaches to every error (domain "fleetcare.v1"). */
export interface ErrorInfo {
  /** Stable, e.g. "NO_AGENT_AVAILABLE", "STALE_FENCING_TOKEN", "TRANSITION_REFUSED". */
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** The ErrorInfo of a failed call (from its grpc-status-details-bin), or undefined. */
export function errorInfo(error: unknown): ErrorInfo | undefined {
  if (!(error instanceof ConnectError)) return undefined;
  for (const detail of error.details) {
    if ("type" in detail && detail.type === "google.rpc.ErrorInfo" && "value" in detail) {
      return decodeErrorInfo(detail.value);
    }
  }
  return undefined;
}

/** The ErrorInfo's reason of a failed call, or undefined. */
export function errorReason(error: unknown): string | undefined {
  return errorInfo(error)?.reason;
}

// ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) info.reason = reader.string();
    else if (field === 2 && wireType === WireType.LengthDelimited) info.domain = reader.string();
    else if (field === 3 && wireType === WireType.LengthDelimited) {
      const entry = new BinaryReader(reader.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [f, t] = entry.tag();
        if (f === 1 && t === WireType.LengthDelimited) key = entry.string();
        else if (f === 2 && t === WireType.LengthDelimited) value = entry.string();
        else entry.skip(t);
      }
      info.metadata[key] = value;
    } else reader.skip(wireType);
  }
  return info;
}

/** Whether a RenewClaim/ReleaseClaim refusal says the claim is gone: STALE_FENCING_TOKEN or NOT_FOUND. */
export function isClaimEnded(error: ConnectError): boolean {
  if (error.code === Code.NotFound) return true;
  return error.code === Code.FailedPrecondition && errorReason(error) === "STALE_FENCING_TOKEN";
}

/** The claim ended while it was held: its work must stop, another holder may have the agent. */
export class ClaimLostError extends Error {
  /**
   * @param claimId the claim lost
   * @param reason STALE_FENCING_TOKEN or NOT_FOUND (the server's answer to a renewal),
   *   LEASE_EXPIRED (no renewal got through before the lease ran out), or the
   *   reason (else the code's name) of another refusal that ended the renewals
   * @param cause the ConnectError of the last failed renewal
   */
  constructor(
    readonly claimId: string,
    readonly reason: string,
    readonly cause?: ConnectError,
  ) {
    super(`claim ${claimId} lost (${reason})${cause ? `: ${cause.rawMessage}` : ""}`);
    this.name = "ClaimLostError";
  }
}

type LabelSelectorInit = MessageInitShape<typeof LabelSelectorSchema>;

/**
 * The fields of a ReportExhaustedRequest the claim does not fill in itself:
 * `quotaPool` (the pool whose limit was hit; its IDLE members are parked too)
 * and `window` (a QuotaWindow) among them.
 */
export type ReportExhaustedInit = Partial<
  Pick<
    ReportExhaustedRequest,
    "reason" | "message" | "timeZone" | "recoveryAt" | "headers" | "quotaPool" | "window"
  >
>;

export interface ClaimOptions {
  /**
   * Which agents the claim may take: a LabelSelector ({ matchLabels, matchExpressions }),
   * or a plain record of labels the agent must carry. Default: any agent.
   */
  selector?: LabelSelectorInit | Record<string, string>;
  /** WORK (the agent goes BUSY, the default) or ON_CALL. */
  slotType?: SlotType;
  /** The lease in ms (default 30 000; the server takes 1 s to 1 h). */
  leaseMs?: number;
  /** How long the server may wait for a matching agent to come free, in ms (default 0: answer at once). */
  waitMs?: number;
  /** The idempotency key of ClaimAgent (default: a fresh UUID), the same on every retry. */
  requestId?: string;
  /** Renew every this many ms (default: a third of the lease). */
  renewEveryMs?: number;
  /** How many ClaimAgent (and ReleaseClaim) calls to make in all on retryable failures (default 5). */
  attempts?: number;
  /** Deadline of each call in ms, beyond `waitMs` for ClaimAgent (default 10 000). */
  callTimeoutMs?: number;
  /** First retry delay in ms (default 100), doubling, capped at `maxBackoffMs` (default 2000). */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Called once if the claim is lost (also visible as `lost` and through `signal`). */
  onLost?: (error: ClaimLostError) => void;
  /** Aborts the ClaimAgent call (its retries and its wait). */
  signal?: AbortSignal;
}

export interface ClaimHandle extends AsyncDisposable {
  /** The claim, updated by each renewal (leaseExpiresAt). */
  readonly claim: Claim;
  /** The claimed agent as ClaimAgent (or the release, or finishWork) returned it. */
  readonly agent: Agent;
  /** The CLAIMED transition; undefined when the server recognised the requestId of an earlier call. */
  readonly transition: Transition | undefined;
  readonly agentId: string;
  readonly claimId: string;
  readonly fencingToken: bigint;
  readonly requestId: string;
  /** Renewals the server accepted. */
  readonly renewals: number;
  /** Set once the claim is lost (the renewals then stop). */
  readonly lost: ClaimLostError | undefined;
  /** Aborted, with the ClaimLostError as its reason, when the claim is lost: pass it to the work. */
  readonly signal: AbortSignal;
  /** Held: neither ended by this handle nor lost. */
  readonly active: boolean;
  /** Throws `lost` if the claim was lost. */
  check(): void;
  /**
   * Stops renewing and releases the claim (the agent back to IDLE). Resolves to
   * the response, or to undefined when there was nothing to release (the claim
   * had ended already: STALE_FENCING_TOKEN or NOT_FOUND). Other refusals reject.
   */
  release(): Promise<ReleaseClaimResponse | undefined>;
  /**
   * FinishWork with the claim's fencing token: the slot is freed and the claim
   * ends, so a later release does nothing. Renewals pause during the call and
   * resume if it is refused (the claim is then still held).
   */
  finishWork(): Promise<FinishWorkResponse>;
  /** ReportExhausted with the claim's fencing token (the other fields given), which ends the claim. */
  reportExhausted(
    request: ReportExhaustedInit,
  ): Promise<ReportExhaustedResponse>;
  /** release(), for `await using claim = await claimAgent(...)`. */
  [Symbol.asyncDispose](): Promise<void>;
}

function labelSelector(selector: ClaimOptions["selector"]): LabelSelectorInit {
  if (selector === undefined) return {};
  if ("matchLabels" in selector || "matchExpressions" in selector || "$typeName" in selector) {
    return selector as LabelSelectorInit;
  }
  return { matchLabels: selector as Record<string, string> };
}

function backoffMs(failures: number, initialMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(failures, 30));
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
}

/** Resolves after `ms`, or as soon as `signal` is aborted. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Claims one idle agent matching `options.selector` and keeps the claim: the
 * lease is renewed every `renewEveryMs` in the background until release()
 * (or `await using`'s dispose). ClaimAgent cut off by a retryable failure
 * (UNAVAILABLE, a dropped connection, DEADLINE_EXCEEDED) is retried with the
 * same requestId, so the server hands back the claim it may have made rather
 * than a second one. Refusals reject: RESOURCE_EXHAUSTED, reason
 * NO_AGENT_AVAILABLE, when no matching agent is idle (after `waitMs`).
 *
 * When the server answers a renewal that the claim is gone, refuses it
 * otherwise, or the lease runs out before a renewal gets through, the renewals
 * stop, `lost` is set and `signal` aborts: stop the work.
 */
export async function claimAgent(client: FleetcareClient, options: ClaimOptions = {}): Promise<ClaimHandle> {
  const leaseMs = options.leaseMs ?? 30_000;
  const waitMs = options.waitMs ?? 0;
  const renewEveryMs = options.renewEveryMs ?? leaseMs / 3;
  const attempts = options.attempts ?? 5;
  const callTimeoutMs = options.callTimeoutMs ?? 10_000;
  const initialBackoffMs = options.initialBackoffMs ?? 100;
  const maxBackoffMs = options.maxBackoffMs ?? 2000;
  if (!(leaseMs > 0)) throw new RangeError("leaseMs must be positive (the server takes 1 s to 1 h)");
  if (!(waitMs >= 0)) throw new RangeError("waitMs must not be negative");
  if (!(renewEveryMs > 0 && renewEveryMs < leaseMs)) throw new RangeError("need 0 < renewEveryMs < leaseMs");
  if (!(attempts >= 1)) throw new RangeError("attempts must be at least 1");
  const requestId = options.requestId ?? randomUUID();
  const request = {
    selector: labelSelector(options.selector),
    slotType: options.slotType ?? SlotType.WORK,
    leaseDuration: durationFromMs(leaseMs),
    waitTimeout: durationFromMs(waitMs),
    requestId,
  };

  let started = 0;
  let response;
  for (let failures = 0; ; ) {
    started = performance.now();
    try {
      response = await client.dispatch.claimAgent(request, {
        signal: options.signal,
        timeoutMs: waitMs + callTimeoutMs,
      });
      break;
    } catch (e) {
      const error = ConnectError.from(e);
      failures++;
      if (options.signal?.aborted || !isRetryableHeartbeatError(error) || failures >= attempts) throw error;
      await sleep(backoffMs(failures - 1, initialBackoffMs, maxBackoffMs), options.signal);
    }
  }
  return new Handle(client, response.claim!, response.agent!, response.transition, requestId, {
    leaseMs,
    renewEveryMs,
    attempts,
    callTimeoutMs,
    initialBackoffMs,
    maxBackoffMs,
    onLost: options.onLost,
    leaseDeadline: started + leaseMs,
  });
}

/**
 * Claims an agent (see claimAgent), runs `work` with the claim, and releases
 * it afterwards, whether `work` resolves or throws. A release failure is
 * thrown after a successful `work` only; `work`'s own error wins otherwise.
 */
export async function withClaim<T>(
  client: FleetcareClient,
  options: ClaimOptions,
  work: (claim: ClaimHandle) => Promise<T> | T,
): Promise<T> {
  const claim = await claimAgent(client, options);
  let result: T;
  try {
    result = await work(claim);
  } catch (e) {
    await claim.release().catch(() => {});
    throw e;
  }
  await claim.release();
  return result;
}

interface Settings {
  leaseMs: number;
  renewEveryMs: number;
  attempts: number;
  callTimeoutMs: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  onLost?: (error: ClaimLostError) => void;
  leaseDeadline: number;
}

class Handle implements ClaimHandle {
  #client: FleetcareClient;
  #settings: Settings;
  #claim: Claim;
  #agent: Agent;
  #renewals = 0;
  #lost: ClaimLostError | undefined;
  #ended = false;
  #lostController = new AbortController();
  #stop: AbortController | undefined;
  #loop: Promise<void> | undefined;

  constructor(
    client: FleetcareClient,
    claim: Claim,
    agent: Agent,
    readonly transition: Transition | undefined,
    readonly requestId: string,
    settings: Settings,
  ) {
    this.#client = client;
    this.#claim = claim;
    this.#agent = agent;
    this.#settings = settings;
    this.#startRenewing();
  }

  get claim(): Claim {
    return this.#claim;
  }
  get agent(): Agent {
    return this.#agent;
  }
  get agentId(): string {
    return this.#claim.agentId;
  }
  get claimId(): string {
    return this.#claim.claimId;
  }
  get fencingToken(): bigint {
    return this.#claim.fencingToken;
  }
  get renewals(): number {
    return this.#renewals;
  }
  get lost(): ClaimLostError | undefined {
    return this.#lost;
  }
  get signal(): AbortSignal {
    return this.#lostController.signal;
  }
  get active(): boolean {
    return !this.#ended && this.#lost === undefined;
  }

  check(): void {
    if (this.#lost) throw this.#lost;
  }

  #startRenewing(): void {
    const stop = new AbortController();
    this.#stop = stop;
    this.#loop = this.#renew(stop.signal);
  }

  async #stopRenewing(): Promise<void> {
    this.#stop?.abort();
    this.#stop = undefined;
    const loop = this.#loop;
    this.#loop = undefined;
    await loop;
  }

  async #renew(stop: AbortSignal): Promise<void> {
    const s = this.#settings;
    let failures = 0;
    let waitMs = s.renewEveryMs;
    for (;;) {
      await sleep(waitMs, stop);
      if (stop.aborted) return;
      const started = performance.now();
      const remaining = s.leaseDeadline - started;
      try {
        const response = await this.#client.dispatch.renewClaim(
          {
            claimId: this.#claim.claimId,
            fencingToken: this.#claim.fencingToken,
            leaseDuration: durationFromMs(s.leaseMs),
          },
          { signal: stop, timeoutMs: Math.max(50, Math.min(s.callTimeoutMs, remaining)) },
        );
        if (stop.aborted) return;
        failures = 0;
        waitMs = s.renewEveryMs;
        this.#claim = response.claim!;
        this.#renewals++;
        s.leaseDeadline = started + s.leaseMs;
      } catch (e) {
        if (stop.aborted) return;
        const error = ConnectError.from(e);
        const now = performance.now();
        if (isRetryableHeartbeatError(error) && now < s.leaseDeadline) {
          waitMs = Math.min(backoffMs(failures, s.initialBackoffMs, s.maxBackoffMs), s.leaseDeadline - now);
          failures++;
          continue;
        }
        const reason = isRetryableHeartbeatError(error)
          ? "LEASE_EXPIRED"
          : error.code === Code.NotFound
            ? "NOT_FOUND"
            : (errorReason(error) ?? Code[error.code]);
        this.#markLost(new ClaimLostError(this.#claim.claimId, reason, error));
        return;
      }
    }
  }

  #markLost(lost: ClaimLostError): void {
    if (this.#ended || this.#lost) return;
    this.#lost = lost;
    this.#lostController.abort(lost);
    this.#settings.onLost?.(lost);
  }

  async release(): Promise<ReleaseClaimResponse | undefined> {
    await this.#stopRenewing();
    if (this.#ended) return undefined;
    const s = this.#settings;
    const request = { claimId: this.#claim.claimId, fencingToken: this.#claim.fencingToken };
    for (let failures = 0; ; ) {
      try {
        const response = await this.#client.dispatch.releaseClaim(request, { timeoutMs: s.callTimeoutMs });
        this.#ended = true;
        if (response.agent) this.#agent = response.agent;
        return response;
      } catch (e) {
        const error = ConnectError.from(e);
        if (isClaimEnded(error)) {
          this.#ended = true;
          return undefined;
        }
        failures++;
        if (!isRetryableHeartbeatError(error) || failures >= s.attempts) throw error;
        await sleep(backoffMs(failures - 1, s.initialBackoffMs, s.maxBackoffMs));
      }
    }
  }

  finishWork(): Promise<FinishWorkResponse> {
    return this.#endWith(() =>
      this.#client.agentStatus.finishWork(
        { agentId: this.agentId, fencingToken: this.fencingToken },
        { timeoutMs: this.#settings.callTimeoutMs },
      ),
    );
  }

  reportExhausted(
    request: ReportExhaustedInit,
  ): Promise<ReportExhaustedResponse> {
    return this.#endWith(() =>
      this.#client.agentStatus.reportExhausted(
        { ...request, agentId: this.agentId, fencingToken: this.fencingToken },
        { timeoutMs: this.#settings.callTimeoutMs },
      ),
    );
  }

  async #endWith<R extends { agent?: Agent }>(call: () => Promise<R>): Promise<R> {
    if (this.#ended) throw new Error("the claim has ended already");
    this.check();
    // A renewal racing the call would be answered STALE_FENCING_TOKEN once the
    // call has ended the claim, and taken for a lost claim: pause them.
    await this.#stopRenewing();
    let response: R;
    try {
      response = await call();
    } catch (e) {
      if (!this.#lost) this.#startRenewing();
      throw e;
    }
    this.#ended = true;
    if (response.agent) this.#agent = response.agent;
    return response;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.release();
  }
}
