"""A thin, typed convenience layer over the generated stubs.

* :class:`FleetcareClient`: one channel (plaintext or TLS, optional bearer
  token on every call) and the six service stubs; ``client.claim(...)`` holds
  an agent with its lease renewed in the background (:mod:`fleetcare.claim`).
* :class:`TransitionWatch`: a WatchTransitions iterator that resumes from the
  last revision seen when the stream ends or the connection drops, so the caller
  sees every transition exactly once, in revision order.
* :class:`Heartbeater`: heartbeats one agent in a daemon thread at the
  interval the server asks for (``next_heartbeat_interval``), retrying a
  dropped connection, until stopped or refused (``NOT_FOUND``).
* :func:`error_info`: the ``google.rpc.ErrorInfo`` every fleetcare error carries
  (its ``reason`` is stable, e.g. ``TRANSITION_REFUSED``).
"""

from __future__ import annotations

import collections
import random
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterable, Iterator, List, Optional, Sequence, Tuple, Type

import grpc
from google.rpc import error_details_pb2, status_pb2

from fleetcare.v1 import (
    agent_status_pb2,
    agent_status_pb2_grpc,
    dispatch_pb2_grpc,
    healing_pb2_grpc,
    quota_pb2_grpc,
    session_pipeline_pb2_grpc,
)

if TYPE_CHECKING:
    from fleetcare.claim import ClaimHandle, ClaimLost, Selector

__all__ = [
    "BearerTokenInterceptor",
    "DEFAULT_CHANNEL_OPTIONS",
    "FleetcareClient",
    "Heartbeater",
    "TransitionWatch",
    "error_info",
]

Metadata = Sequence[Tuple[str, Any]]

# gRPC's own reconnect backoff grows to 120 s by default; a control-plane client
# (and a watch resuming after a server restart) should come back within seconds.
DEFAULT_CHANNEL_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata.

    A call that already carries ``authorization`` metadata keeps its own. Unlike
    call credentials this also works on a plaintext channel, where the token
    travels unencrypted: use TLS anywhere but a trusted network.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata: List[Tuple[str, Any]] = list(details.metadata or ())
        if not any(key.lower() == "authorization" for key, _ in metadata):
            metadata.append(self._header)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)


class FleetcareClient:
    """A channel to a fleetcare server and its six service stubs.

    >>> with FleetcareClient("127.0.0.1:50051", insecure=True) as client:
    ...     client.agent_status.GetAgent(agent_status_pb2.GetAgentRequest(agent_id="a1"))

    Args:
        address: ``host:port`` (any gRPC target).
        token: when set, every call carries ``authorization: Bearer <token>``.
        insecure: plaintext instead of TLS (a server started without
            ``--tls-cert``; TLS for one with it, or behind a TLS proxy).
        root_certificates: PEM roots to verify the server with (TLS only;
            ``None``: the system's roots).
        private_key, certificate_chain: PEM client key and certificate for mutual TLS.
        options: extra channel options; they override :data:`DEFAULT_CHANNEL_OPTIONS`.
    """

    def __init__(
        self,
        address: str,
        *,
        token: Optional[str] = None,
        insecure: bool = False,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        options: Iterable[Tuple[str, Any]] = (),
    ) -> None:
        merged = dict(DEFAULT_CHANNEL_OPTIONS)
        merged.update(dict(options))
        channel_options = list(merged.items())
        if insecure:
            if root_certificates or private_key or certificate_chain:
                raise ValueError("certificates were given for an insecure channel")
            base = grpc.insecure_channel(address, options=channel_options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            base = grpc.secure_channel(address, credentials, options=channel_options)
        self._base_channel = base
        self.address = address
        #: The channel every stub uses (with the token interceptor, if any).
        self.channel: grpc.Channel = (
            grpc.intercept_channel(base, BearerTokenInterceptor(token)) if token is not None else base
        )
        self.agent_status = agent_status_pb2_grpc.AgentStatusServiceStub(self.channel)
        self.healing = healing_pb2_grpc.HealingServiceStub(self.channel)
        self.post_healing = healing_pb2_grpc.PostHealingServiceStub(self.channel)
        self.session_pipeline = session_pipeline_pb2_grpc.SessionPipelineServiceStub(self.channel)
        self.dispatch = dispatch_pb2_grpc.DispatchServiceStub(self.channel)
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)

    def watch_transitions(
        self,
        since_revision: int = 0,
        *,
        agent_ids: Iterable[str] = (),
        statuses: Iterable[agent_status_pb2.AgentStatus] = (),
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        metadata: Optional[Metadata] = None,
    ) -> "TransitionWatch":
        """A resuming watch; see :class:`TransitionWatch`."""
        return TransitionWatch(
            self.agent_status,
            since_revision,
            agent_ids=agent_ids,
            statuses=statuses,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            metadata=metadata,
        )

    def heartbeats(
        self,
        agent_id: str,
        *,
        on_response: Optional[Callable[[agent_status_pb2.HeartbeatResponse], None]] = None,
        on_retry: Optional[Callable[[grpc.RpcError, float], None]] = None,
        fallback_interval: float = 5.0,
        min_interval: float = 0.1,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        call_timeout: float = 10.0,
        metadata: Optional[Metadata] = None,
    ) -> "Heartbeater":
        """A heartbeat loop for ``agent_id`` (not started); see :class:`Heartbeater`."""
        return Heartbeater(
            self.agent_status,
            agent_id,
            on_response=on_response,
            on_retry=on_retry,
            fallback_interval=fallback_interval,
            min_interval=min_interval,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            call_timeout=call_timeout,
            metadata=metadata,
        )

    def claim(
        self,
        selector: "Selector" = None,
        *,
        slot_type: "agent_status_pb2.SlotType.ValueType" = agent_status_pb2.SLOT_TYPE_WORK,
        lease: float = 30.0,
        wait: float = 0.0,
        request_id: Optional[str] = None,
        renew_every: Optional[float] = None,
        attempts: int = 5,
        call_timeout: float = 10.0,
        on_lost: Optional[Callable[["ClaimLost"], None]] = None,
        metadata: Optional[Metadata] = None,
    ) -> "ClaimHandle":
        """A claim on one idle agent matching ``selector`` (a dict of labels or a
        ``LabelSelector``), not made yet: ``with client.claim(...) as claim:``
        makes it, renews its lease every ``renew_every`` seconds (default
        ``lease / 3``) and releases it at the end; see :class:`fleetcare.claim.ClaimHandle`."""
        from fleetcare.claim import ClaimHandle

        return ClaimHandle(
            self.dispatch,
            self.agent_status,
            selector,
            slot_type=slot_type,
            lease=lease,
            wait=wait,
            request_id=request_id,
            renew_every=renew_every,
            attempts=attempts,
            call_timeout=call_timeout,
            on_lost=on_lost,
            metadata=metadata,
        )

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._base_channel.close()

    def __enter__(self) -> "FleetcareClient":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class TransitionWatch(Iterator[agent_status_pb2.Transition]):
    """Iterates over WatchTransitions, resuming after dropped streams.

    It remembers the last revision seen, from transitions and from progress
    events. When the stream ends (a server shutting down ends it cleanly) or fails
    with ``UNAVAILABLE`` (dropped connection, server restart), it reopens it with
    ``since_revision`` = that revision, after a capped, jittered exponential
    backoff (reset once an event arrives), until :meth:`close`. Any other error
    (``OUT_OF_RANGE`` when the revision is no longer retained,
    ``INVALID_ARGUMENT``, ...) is raised from ``next()``. Transitions at or below
    the last revision seen are never yielded twice.

    ``since_revision`` 0 means "from now on": the head revision is read (one
    ListTransitions call, whose errors are raised here) when the watch is
    created, so every transition committed after that is delivered, across
    reconnects too. On a server with no transition at all yet (head 0, which the
    server would read as "the head when the stream opens"), each stream opened
    while nothing has been seen is followed, once its headers arrive, by a read
    of the history from the start, so nothing committed in between is missed.

    :meth:`close` (from any thread, or by leaving a ``with`` block) cancels the
    stream; a ``next()`` blocked in another thread then ends the iteration.

    Attributes:
        last_revision: the last revision seen; resume a later watch from it.
        streams_opened: how many times WatchTransitions was called.
    """

    def __init__(
        self,
        stub: agent_status_pb2_grpc.AgentStatusServiceStub,
        since_revision: int = 0,
        *,
        agent_ids: Iterable[str] = (),
        statuses: Iterable[agent_status_pb2.AgentStatus] = (),
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        metadata: Optional[Metadata] = None,
    ) -> None:
        if since_revision < 0:
            raise ValueError("since_revision must not be negative")
        if initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        self._stub = stub
        self._agent_ids = list(agent_ids)
        self._statuses = list(statuses)
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._metadata = metadata
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: Any = None
        self._pending: Deque[agent_status_pb2.Transition] = collections.deque()
        self._failures = 0
        self.streams_opened = 0
        if since_revision == 0:
            head = stub.ListTransitions(
                agent_status_pb2.ListTransitionsRequest(page_size=1), metadata=metadata, timeout=30.0
            ).head_revision
            since_revision = head
        self.last_revision: int = since_revision

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stops the watch; safe to call from any thread, more than once."""
        with self._lock:
            self._closed.set()
            call, self._call = self._call, None
        if call is not None:
            call.cancel()

    cancel = close

    def __enter__(self) -> "TransitionWatch":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __iter__(self) -> "TransitionWatch":
        return self

    def __next__(self) -> agent_status_pb2.Transition:
        while True:
            if self._pending:
                return self._pending.popleft()
            call, fresh = self._current_call()
            if call is None:
                raise StopIteration
            try:
                if fresh and self.last_revision == 0:
                    call.initial_metadata()  # returns once the stream is open (or has failed)
                    self._read_history()
                    continue
                response: agent_status_pb2.WatchTransitionsResponse = next(call)
            except StopIteration:
                # Ended cleanly: the server is shutting down. Resume elsewhere or later.
                self._drop(call)
                self._backoff()
                continue
            except grpc.RpcError as error:
                self._drop(call)
                if self._closed.is_set():
                    raise StopIteration from None
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._backoff()
                continue
            self._failures = 0
            kind = response.WhichOneof("event")
            if kind == "transition":
                transition = response.transition
                if transition.revision <= self.last_revision:
                    continue
                self.last_revision = transition.revision
                return transition
            if kind == "progress" and response.progress.revision > self.last_revision:
                self.last_revision = response.progress.revision

    def _read_history(self) -> None:
        """Queues the retained transitions after ``last_revision`` that the filters keep."""
        page_size = 1000
        while True:
            page = self._stub.ListTransitions(
                agent_status_pb2.ListTransitionsRequest(after_revision=self.last_revision, page_size=page_size),
                metadata=self._metadata,
                timeout=30.0,
            )
            for transition in page.transitions:
                self.last_revision = transition.revision
                if self._watched(transition):
                    self._pending.append(transition)
            if len(page.transitions) < page_size:
                return

    def _watched(self, transition: agent_status_pb2.Transition) -> bool:
        """The watch's filters, as the server applies them to the stream."""
        agent = not self._agent_ids or transition.agent_id in self._agent_ids
        status = (
            not self._statuses or transition.from_status in self._statuses or transition.to_status in self._statuses
        )
        return agent and status

    def _current_call(self) -> Tuple[Any, bool]:
        """The open stream (None once closed), and whether it was opened just now."""
        with self._lock:
            if self._closed.is_set():
                return None, False
            fresh = self._call is None
            if fresh:
                request = agent_status_pb2.WatchTransitionsRequest(
                    since_revision=self.last_revision,
                    agent_ids=self._agent_ids,
                    statuses=self._statuses,
                )
                self._call = self._stub.WatchTransitions(request, metadata=self._metadata)
                self.streams_opened += 1
            return self._call, fresh

    def _drop(self, call: Any) -> None:
        with self._lock:
            if self._call is call:
                self._call = None
        call.cancel()

    def _backoff(self) -> None:
        delay = min(self._max_backoff, self._initial_backoff * (2 ** min(self._failures, 30)))
        self._failures += 1
        # Full jitter on the upper half, so many watchers do not reconnect in lockstep.
        self._closed.wait(random.uniform(delay / 2, delay))


class Heartbeater:
    """Heartbeats one agent at the interval the server asks for.

    After each response it waits that response's ``next_heartbeat_interval``
    (the server spreads the fleet's heartbeats under its ``--max-heartbeat-rate``),
    or ``fallback_interval`` when the response has none (or zero), never less
    than ``min_interval``, so a misbehaving server cannot make it spin.
    ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` (a dropped connection, a restarting
    server, a call slower than ``call_timeout``) are retried after a capped,
    jittered exponential backoff (reset by the next response). Any other error
    ends the loop: ``NOT_FOUND`` when the agent was never registered,
    ``INVALID_ARGUMENT`` for a malformed id.

    :meth:`start` runs the loop in a daemon thread; :meth:`stop` (from any
    thread, or by leaving a ``with`` block) ends it promptly, also mid-wait or
    mid-call. :meth:`run` runs it in the calling thread instead and raises the
    error that ended it.

    >>> with client.heartbeats("a1", on_response=print) as beats:
    ...     do_work()  # heartbeats keep coming meanwhile

    Attributes:
        last_response: the newest ``HeartbeatResponse`` (``None`` before the first).
        heartbeats: how many heartbeats the server acknowledged.
        error: the exception that ended the loop (``None`` while it runs, or
            after :meth:`stop`).
    """

    def __init__(
        self,
        stub: agent_status_pb2_grpc.AgentStatusServiceStub,
        agent_id: str,
        *,
        on_response: Optional[Callable[[agent_status_pb2.HeartbeatResponse], None]] = None,
        on_retry: Optional[Callable[[grpc.RpcError, float], None]] = None,
        fallback_interval: float = 5.0,
        min_interval: float = 0.1,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        call_timeout: float = 10.0,
        metadata: Optional[Metadata] = None,
    ) -> None:
        if min_interval <= 0 or fallback_interval < min_interval:
            raise ValueError("need 0 < min_interval <= fallback_interval")
        if initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if call_timeout <= 0:
            raise ValueError("call_timeout must be positive")
        self._stub = stub
        self.agent_id = agent_id
        self._on_response = on_response
        self._on_retry = on_retry
        self._fallback = fallback_interval
        self._min = min_interval
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._call_timeout = call_timeout
        self._metadata = metadata
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._thread: Optional[threading.Thread] = None
        self.last_response: Optional[agent_status_pb2.HeartbeatResponse] = None
        self.heartbeats = 0
        self.error: Optional[BaseException] = None

    def next_interval(self, response: agent_status_pb2.HeartbeatResponse) -> float:
        """Seconds to wait after ``response``: the server's interval, the fallback, the floor."""
        given = 0.0
        if response.HasField("next_heartbeat_interval"):
            d = response.next_heartbeat_interval
            given = d.seconds + d.nanos / 1e9
        return max(self._min, given if given > 0 else self._fallback)

    def start(self) -> "Heartbeater":
        """Starts the loop in a daemon thread; returns self."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the heartbeater was already started")
            self._thread = threading.Thread(
                target=self._run_in_thread, name=f"fleetcare-heartbeat-{self.agent_id}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        """Ends the loop (cancelling a call in flight) and waits up to ``timeout`` s for its thread."""
        with self._lock:
            self._stopped.set()
            call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self.join(timeout)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for the loop to end; whether it has (False on timeout or when never started)."""
        thread = self._thread
        if thread is None:
            return False
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __enter__(self) -> "Heartbeater":
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as error:  # noqa: BLE001 - kept for the caller in .error
            self.error = error

    def run(self) -> None:
        """Heartbeats in this thread until :meth:`stop`; raises the error that ends it otherwise."""
        failures = 0
        while not self._stopped.is_set():
            request = agent_status_pb2.HeartbeatRequest(agent_id=self.agent_id)
            with self._lock:
                if self._stopped.is_set():
                    return
                call = self._stub.Heartbeat.future(request, timeout=self._call_timeout, metadata=self._metadata)
                self._call = call
            try:
                response: agent_status_pb2.HeartbeatResponse = call.result()
            except grpc.FutureCancelledError:
                return  # stop() cancelled it
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                ceiling = min(self._max_backoff, self._initial_backoff * (2 ** min(failures, 30)))
                failures += 1
                delay = random.uniform(ceiling / 2, ceiling)
                if self._on_retry is not None:
                    self._on_retry(error, delay)
                self._stopped.wait(delay)
                continue
            finally:
                with self._lock:
                    if self._call is call:
                        self._call = None
            failures = 0
            self.last_response = response
            self.heartbeats += 1
            if self._on_response is not None:
                self._on_response(response)
            self._stopped.wait(self.next_interval(response))


def error_info(error: grpc.RpcError) -> Optional[error_details_pb2.ErrorInfo]:
    """The ``google.rpc.ErrorInfo`` of a failed call, or ``None``.

    fleetcare attaches one to every error (domain ``fleetcare.v1``) with a stable
    ``reason`` to branch on: ``INVALID_ARGUMENT``, ``NOT_FOUND``,
    ``TRANSITION_REFUSED``, ``RECOVERY_ALREADY_ACTIVE``, ``OUTCOME_ALREADY_RECORDED``,
    ``REVISION_OUT_OF_RANGE``, ``CONFLICT``, ``ABORTED``, ``UNAVAILABLE``, ...
    (the README's Errors section lists them all).
    """
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info
    return None
