// A heartbeat loop that keeps to the interval the server asks for.

import { Code, ConnectError, type Client } from "@connectrpc/connect";

import type { AgentStatusService, HeartbeatResponse } from "./gen/fleetcare/v1/agent_status_pb.js";
import type { FleetcareClient } from "./client.js";
import { isRetryableWatchError } from "./watch.js";

export interface HeartbeatOptions {
  /** Ends the loop (the promise resolves) when aborted, also mid-wait or mid-call. */
  signal?: AbortSignal;
  /** Called with every response, in order (e.g. `transition` set: the agent came back from OFFLINE). */
  onResponse?: (response: HeartbeatResponse) => void;
  /** Called after each retryable failure, before the backoff. */
  onRetry?: (event: HeartbeatRetryEvent) => void;
  /** Wait when a response has no (or a zero) next_heartbeat_interval, in ms (default 5000). */
  fallbackIntervalMs?: number;
  /** The shortest wait between heartbeats, whatever the server says, in ms (default 100). */
  minIntervalMs?: number;
  /** First retry delay in ms (default 100); it doubles per failed attempt. */
  initialBackoffMs?: number;
  /** Cap of the retry delay in ms (default 5000). */
  maxBackoffMs?: number;
  /** Deadline of each Heartbeat call in ms (default 10000); missing it is retried. */
  callTimeoutMs?: number;
}

export interface HeartbeatRetryEvent {
  /** 1 for the first failure after a success, 2 for the next, ... */
  attempt: number;
  delayMs: number;
  error: ConnectError;
}

export interface HeartbeatHandle {
  /** Settles when the loop ends: resolves after stop() or an abort, rejects with the ConnectError that ended it (NOT_FOUND, ...). */
  readonly done: Promise<void>;
  /** Ends the loop and waits for it; resolves even if it had already failed (see `done` for that). */
  stop(): Promise<void>;
  /** Heartbeats acknowledged so far. */
  readonly heartbeats: number;
  /** The newest response, undefined before the first. */
  readonly lastResponse: HeartbeatResponse | undefined;
}

/** The wait after `response`, in ms: its next_heartbeat_interval, else the fallback; never under the floor. */
export function nextHeartbeatIntervalMs(
  response: HeartbeatResponse,
  fallbackIntervalMs = 5000,
  minIntervalMs = 100,
): number {
  const d = response.nextHeartbeatInterval;
  const given = d === undefined ? 0 : Number(d.seconds) * 1000 + d.nanos / 1e6;
  return Math.max(minIntervalMs, given > 0 ? given : fallbackIntervalMs);
}

/** Whether a failed heartbeat is worth retrying: a dropped connection (as for the watch) or a missed deadline. */
export function isRetryableHeartbeatError(err: ConnectError): boolean {
  return err.code === Code.DeadlineExceeded || isRetryableWatchError(err);
}

/**
 * Heartbeats `agentId` until `options.signal` is aborted (resolves) or the
 * server refuses a heartbeat (rejects with that ConnectError: NOT_FOUND when
 * the agent was never registered, INVALID_ARGUMENT for a malformed id).
 *
 * After each response it waits the response's next_heartbeat_interval (the
 * server spreads the fleet's heartbeats under its --max-heartbeat-rate), or
 * `fallbackIntervalMs` when there is none, never less than `minIntervalMs`.
 * Retryable failures (UNAVAILABLE, a connection dying, DEADLINE_EXCEEDED) are
 * retried after a capped exponential backoff with jitter, reset by the next
 * response.
 */
export async function runHeartbeats(
  client: Client<typeof AgentStatusService> | FleetcareClient,
  agentId: string,
  options: HeartbeatOptions = {},
): Promise<void> {
  const agents = "agentStatus" in client ? client.agentStatus : client;
  const { signal } = options;
  const fallbackIntervalMs = options.fallbackIntervalMs ?? 5000;
  const minIntervalMs = options.minIntervalMs ?? 100;
  const initialBackoffMs = options.initialBackoffMs ?? 100;
  const maxBackoffMs = options.maxBackoffMs ?? 5000;
  const callTimeoutMs = options.callTimeoutMs ?? 10_000;
  let failures = 0;
  while (!signal?.aborted) {
    let response: HeartbeatResponse;
    try {
      response = await agents.heartbeat({ agentId }, { signal, timeoutMs: callTimeoutMs });
    } catch (e) {
      if (signal?.aborted) return;
      const error = ConnectError.from(e);
      if (!isRetryableHeartbeatError(error)) throw error;
      const ceiling = Math.min(maxBackoffMs, initialBackoffMs * 2 ** Math.min(failures, 30));
      const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
      failures++;
      options.onRetry?.({ attempt: failures, delayMs, error });
      await abortableSleep(delayMs, signal);
      continue;
    }
    // Outside the try: an exception of the callback ends the loop as it is.
    failures = 0;
    options.onResponse?.(response);
    await abortableSleep(nextHeartbeatIntervalMs(response, fallbackIntervalMs, minIntervalMs), signal);
  }
}

/**
 * Starts runHeartbeats in the background and returns a handle to stop it.
 * An `options.signal` given here ends it too.
 */
export function startHeartbeats(
  client: Client<typeof AgentStatusService> | FleetcareClient,
  agentId: string,
  options: HeartbeatOptions = {},
): HeartbeatHandle {
  const abort = new AbortController();
  const outer = options.signal;
  const forward = () => abort.abort(outer?.reason);
  if (outer?.aborted) forward();
  else outer?.addEventListener("abort", forward, { once: true });
  let heartbeats = 0;
  let lastResponse: HeartbeatResponse | undefined;
  const done = runHeartbeats(client, agentId, {
    ...options,
    signal: abort.signal,
    onResponse: (response) => {
      heartbeats++;
      lastResponse = response;
      options.onResponse?.(response);
    },
  }).finally(() => outer?.removeEventListener("abort", forward));
  done.catch(() => {}); // the caller's to observe; never an unhandled rejection
  return {
    done,
    stop: async () => {
      abort.abort();
      await done.catch(() => {});
    },
    get heartbeats() {
      return heartbeats;
    },
    get lastResponse() {
      return lastResponse;
    },
  };
}

/** Resolves after `ms`, or as soon as `signal` is aborted. */
function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
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
