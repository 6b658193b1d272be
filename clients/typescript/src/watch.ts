// A resuming iterator over AgentStatusService.WatchTransitions.

import { Code, ConnectError, type Client } from "@connectrpc/connect";

import type { AgentStatus, AgentStatusService, Transition } from "./gen/fleetcare/v1/agent_status_pb.js";

export interface WatchTransitionsOptions {
  /**
   * Deliver every transition with a larger revision. 0 (the default) means
   * "from now on": the iterator first asks ListTransitions for the head
   * revision and starts after it, so a reconnect before the first event loses
   * nothing. (On a server without any transition yet, where the head is 0,
   * it lists the history from the start once the stream is open, for the same
   * reason.)
   */
  sinceRevision?: bigint;
  /** Keep transitions of these agents only (empty: all). */
  agentIds?: string[];
  /** Keep transitions whose from_status or to_status is one of these (empty: all). */
  statuses?: AgentStatus[];
  /** Ends the iteration (without an error) when aborted. */
  signal?: AbortSignal;
  /** First reconnect delay in milliseconds (default 100); it doubles per failed attempt. */
  initialBackoffMs?: number;
  /** Cap of the reconnect delay in milliseconds (default 5000). */
  maxBackoffMs?: number;
  /** Called before each reconnect (after the stream ended or failed with a retryable error). */
  onReconnect?: (event: ReconnectEvent) => void;
  /** Called when a stream is open (response headers received), with the revision it resumes after. */
  onOpen?: (sinceRevision: bigint) => void;
  /** Called whenever the last seen revision advances (transition or progress event). */
  onRevision?: (revision: bigint) => void;
}

export interface ReconnectEvent {
  /** 1 for the first reconnect after a healthy stream, 2 for the next failed one, ... */
  attempt: number;
  /** How long the iterator waits before reconnecting. */
  delayMs: number;
  /** The revision it resumes after. */
  sinceRevision: bigint;
  /** The error that ended the stream; undefined when the server ended it cleanly. */
  error?: ConnectError;
}

/**
 * Whether a watch failure is worth a reconnect: UNAVAILABLE, or the connection
 * itself dying under the stream (reset socket, closed HTTP/2 session), which
 * connect-node may surface as ABORTED or INTERNAL with a Node.js network error
 * as the cause. Errors the server returned (OUT_OF_RANGE, INVALID_ARGUMENT, ...)
 * are not retryable.
 */
export function isRetryableWatchError(err: ConnectError): boolean {
  if (err.code === Code.Unavailable) return true;
  if (err.code !== Code.Aborted && err.code !== Code.Internal) return false;
  for (let e: unknown = err.cause, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && TRANSPORT_ERROR_CODES.has(code)) return true;
  }
  return false;
}

const TRANSPORT_ERROR_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "ERR_STREAM_PREMATURE_CLOSE",
  "ERR_HTTP2_STREAM_ERROR",
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_INVALID_SESSION",
  "ERR_HTTP2_PING_CANCEL",
  "ERR_HTTP2_STREAM_CANCEL",
]);

/**
 * Streams transitions in revision order, exactly once each, across dropped
 * connections and server restarts.
 *
 * It remembers the last revision seen (from transitions and progress events).
 * When the stream ends, or fails with a retryable error (see
 * isRetryableWatchError), it reconnects with since_revision = that revision,
 * after a capped exponential backoff with jitter that resets once a message
 * arrives. Any other error (OUT_OF_RANGE when the revision is no longer
 * retained, INVALID_ARGUMENT, ...) is thrown. Aborting `signal`, or leaving
 * the for-await loop, ends the iteration and cancels the stream.
 */
export async function* watchTransitions(
  client: Client<typeof AgentStatusService>,
  options: WatchTransitionsOptions = {},
): AsyncGenerator<Transition, void, undefined> {
  const { signal, agentIds = [], statuses = [] } = options;
  const initialBackoffMs = options.initialBackoffMs ?? 100;
  const maxBackoffMs = options.maxBackoffMs ?? 5000;
  let last = options.sinceRevision ?? 0n;
  let pinned = last !== 0n;
  let failures = 0;

  const advance = (revision: bigint): boolean => {
    if (revision <= last) return false;
    last = revision;
    options.onRevision?.(revision);
    return true;
  };

  const matches = (t: Transition): boolean =>
    (agentIds.length === 0 || agentIds.includes(t.agentId)) &&
    (statuses.length === 0 || statuses.includes(t.fromStatus) || statuses.includes(t.toStatus));

  for (;;) {
    if (signal?.aborted) return;
    let error: ConnectError | undefined;
    // Aborted when this attempt ends, so that leaving the for-await loop early
    // (the generator's return()) also cancels the HTTP/2 stream.
    const call = new AbortController();
    const cancel = () => call.abort();
    signal?.addEventListener("abort", cancel, { once: true });
    try {
      if (!pinned) {
        const head = await client.listTransitions({ pageSize: 1 }, { signal: call.signal });
        last = head.headRevision;
        pinned = true;
      }
      let opened!: () => void;
      const headers = new Promise<boolean>((resolve) => (opened = () => resolve(true)));
      const since = last;
      const stream = client.watchTransitions(
        { sinceRevision: since, agentIds, statuses },
        {
          signal: call.signal,
          onHeader: () => {
            opened();
            options.onOpen?.(since);
          },
        },
      );
      const it = stream[Symbol.asyncIterator]();
      let next = it.next();
      next.catch(() => {}); // awaited below; never an unhandled rejection if we stop first
      if (last === 0n) {
        // Nothing seen yet on a server whose history was empty when we pinned
        // "now": since_revision 0 means "the head when the stream opened", which
        // may be past transitions committed since. Once the stream is open, list
        // the history from the start; the stream's copies are then skipped below.
        const streamOpen = await Promise.race([headers, next.then(() => true, () => false)]);
        if (streamOpen) {
          failures = 0;
          for (let after = 0n; ; ) {
            const page = await client.listTransitions(
              { afterRevision: after, pageSize: 1000 },
              { signal: call.signal },
            );
            for (const t of page.transitions) {
              if (advance(t.revision) && matches(t)) yield t;
              after = t.revision;
            }
            if (page.transitions.length === 0 || page.nextPageToken === "") break;
          }
        }
      }
      for (let r = await next; !r.done; r = await (next = it.next())) {
        failures = 0;
        const event = r.value.event;
        if (event.case === "transition") {
          // A revision at or below the last one would be a duplicate after a resume.
          if (advance(event.value.revision)) yield event.value;
        } else if (event.case === "progress") {
          advance(event.value.revision);
        }
      }
    } catch (e) {
      if (signal?.aborted) return;
      const err = ConnectError.from(e);
      if (!isRetryableWatchError(err)) throw err;
      error = err;
    } finally {
      signal?.removeEventListener("abort", cancel);
      call.abort();
    }
    const ceiling = Math.min(maxBackoffMs, initialBackoffMs * 2 ** Math.min(failures, 30));
    const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    failures++;
    options.onReconnect?.({ attempt: failures, delayMs, sinceRevision: last, error });
    if (!(await sleep(delayMs, signal))) return;
  }
}

/** Resolves true after `ms`, or false as soon as `signal` is aborted. */
function sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
  if (signal?.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
