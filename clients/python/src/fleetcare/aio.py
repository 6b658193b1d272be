"""The asyncio flavour of the client, on ``grpc.aio``: the same helpers as the
synchronous :mod:`fleetcare.client`, for agent runners that are asyncio programs.

* :class:`AsyncFleetcareClient`: one ``grpc.aio`` channel (plaintext or TLS,
  optional bearer token on every call) and the six service stubs (their calls
  are awaited).
* :class:`AsyncClaimHandle`: ``async with client.claim(selector) as claim:``
  holds an agent, renewing the lease in an asyncio task and releasing the claim
  at the end, also on an exception or a cancellation.
* :class:`AsyncHeartbeater`: heartbeats one agent in an asyncio task at the
  interval the server asks for (``client.heartbeats(agent_id)``).
* :class:`AsyncTransitionWatch`: ``async for`` over WatchTransitions, resuming
  after dropped streams without gaps or duplicates
  (``client.watch_transitions(...)``).

Each mirrors its synchronous twin (same options, same semantics); the
differences are what asyncio asks for: ``stop()``, ``release()`` and the like
are coroutines, and the helpers must be used from the event loop's thread.

>>> async with AsyncFleetcareClient("127.0.0.1:50051", insecure=True) as client:
...     async with client.claim({"team": "infra"}) as claim:
...         await run_on(claim.agent_id)
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import time
import uuid
from types import TracebackType
from typing import Any, Awaitable, Callable, Deque, Generator, Iterable, List, Optional, Tuple, Type

import grpc
import grpc.aio

from fleetcare.claim import (
    RETRYABLE,
    ClaimLost,
    Selector,
    backoff_delay,
    check_options,
    claim_ended,
    duration,
    label_selector,
    lost_from,
)
from fleetcare.client import DEFAULT_CHANNEL_OPTIONS, Metadata, error_info
from fleetcare.v1 import (
    agent_status_pb2,
    agent_status_pb2_grpc,
    dispatch_pb2,
    dispatch_pb2_grpc,
    healing_pb2_grpc,
    quota_pb2_grpc,
    session_pipeline_pb2_grpc,
)

__all__ = [
    "AsyncClaimHandle",
    "AsyncFleetcareClient",
    "AsyncHeartbeater",
    "AsyncTransitionWatch",
    "ClaimLost",
    "bearer_token_interceptors",
    "error_info",
]


# -- the token ------------------------------------------------------------------------------


class _BearerToken:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:
            metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_token_interceptors(token: str) -> List[grpc.aio.ClientInterceptor]:
    """``grpc.aio`` interceptors adding ``authorization: Bearer <token>`` to every
    call (one per kind of call, as ``grpc.aio`` files each under one kind). A call
    that already carries ``authorization`` metadata keeps its own."""
    return [_UnaryUnaryToken(token), _UnaryStreamToken(token), _StreamUnaryToken(token), _StreamStreamToken(token)]


# -- the client -----------------------------------------------------------------------------


class AsyncFleetcareClient:
    """A ``grpc.aio`` channel to a fleetcare server and its six service stubs.

    The options are :class:`fleetcare.FleetcareClient`'s: ``token`` (sent as
    ``authorization: Bearer <token>`` on every call), ``insecure`` (plaintext
    instead of TLS), ``root_certificates`` (``None``: the system's roots),
    ``private_key`` and ``certificate_chain`` (mutual TLS), and ``options``
    (channel options over :data:`fleetcare.client.DEFAULT_CHANNEL_OPTIONS`).

    >>> async with AsyncFleetcareClient("127.0.0.1:50051", insecure=True) as client:
    ...     await client.agent_status.GetAgent(agent_status_pb2.GetAgentRequest(agent_id="a1"))

    Create it in the event loop that uses it (``grpc.aio`` binds a channel to
    the running loop); :meth:`close` (or leaving ``async with``) closes it.
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
        interceptors = bearer_token_interceptors(token) if token is not None else None
        if insecure:
            if root_certificates or private_key or certificate_chain:
                raise ValueError("certificates were given for an insecure channel")
            channel = grpc.aio.insecure_channel(address, options=channel_options, interceptors=interceptors)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            channel = grpc.aio.secure_channel(address, credentials, options=channel_options, interceptors=interceptors)
        self.address = address
        #: The channel every stub uses (the token's interceptors are part of it).
        self.channel: grpc.aio.Channel = channel
        self.agent_status = agent_status_pb2_grpc.AgentStatusServiceStub(channel)
        self.healing = healing_pb2_grpc.HealingServiceStub(channel)
        self.post_healing = healing_pb2_grpc.PostHealingServiceStub(channel)
        self.session_pipeline = session_pipeline_pb2_grpc.SessionPipelineServiceStub(channel)
        self.dispatch = dispatch_pb2_grpc.DispatchServiceStub(channel)
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)

    def watch_transitions(
        self,
        since_revision: int = 0,
        *,
        agent_ids: Iterable[str] = (),
        statuses: Iterable[agent_status_pb2.AgentStatus] = (),
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        metadata: Optional[Metadata] = None,
    ) -> "AsyncTransitionWatch":
        """A resuming watch; see :class:`AsyncTransitionWatch`."""
        return AsyncTransitionWatch(
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
        on_response: Optional[Callable[[agent_status_pb2.HeartbeatResponse], Any]] = None,
        on_retry: Optional[Callable[[grpc.RpcError, float], Any]] = None,
        fallback_interval: float = 5.0,
        min_interval: float = 0.1,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        call_timeout: float = 10.0,
        metadata: Optional[Metadata] = None,
    ) -> "AsyncHeartbeater":
        """A heartbeat loop for ``agent_id`` (not started); see :class:`AsyncHeartbeater`."""
        return AsyncHeartbeater(
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
        selector: Selector = None,
        *,
        slot_type: "agent_status_pb2.SlotType.ValueType" = agent_status_pb2.SLOT_TYPE_WORK,
        lease: float = 30.0,
        wait: float = 0.0,
        request_id: Optional[str] = None,
        renew_every: Optional[float] = None,
        attempts: int = 5,
        call_timeout: float = 10.0,
        on_lost: Optional[Callable[[ClaimLost], Any]] = None,
        metadata: Optional[Metadata] = None,
    ) -> "AsyncClaimHandle":
        """A claim on one idle agent matching ``selector``, not made yet:
        ``async with client.claim(...) as claim:`` makes it, renews it in a task
        and releases it at the end; see :class:`AsyncClaimHandle`."""
        return AsyncClaimHandle(
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

    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the channel; calls in flight are cancelled (after ``grace`` seconds)."""
        await self.channel.close(grace)

    async def __aenter__(self) -> "AsyncFleetcareClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()


async def _call_hook(hook: Optional[Callable[..., Any]], *args: Any) -> None:
    """Calls a callback that may be a plain function or a coroutine function."""
    if hook is None:
        return
    result = hook(*args)
    if inspect.isawaitable(result):
        await result


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits up to ``timeout`` seconds for ``event``; whether it is set."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    return event.is_set()


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation request of its own (Python 3.11+;
    before, a cancellation while stopping is taken for the stop)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


# -- the watch ------------------------------------------------------------------------------


class AsyncTransitionWatch:
    """``async for`` over WatchTransitions, resuming after dropped streams.

    The asyncio twin of :class:`fleetcare.TransitionWatch`, with the same
    semantics: it remembers the last revision seen, from transitions and from
    progress events; when the stream ends (a server shutting down ends it
    cleanly) or fails with ``UNAVAILABLE`` (dropped connection, server restart),
    it reopens it with ``since_revision`` = that revision after a capped,
    jittered exponential backoff (reset once an event arrives), until
    :meth:`close`. Any other error (``OUT_OF_RANGE`` when the revision is no
    longer retained, ``INVALID_ARGUMENT``, ...) is raised from the loop.
    Transitions at or below the last revision seen are never yielded twice.
    Snapshots are not part of the helper (use the stub's ``WatchTransitions``
    with ``include_snapshot=True`` for them).

    ``since_revision`` 0 means "from now on": the head revision is read (one
    ListTransitions call, whose errors are raised there) when the watch starts:
    on ``await client.watch_transitions()``, on entering ``async with``, or at
    the first ``async for`` step, whichever comes first; every transition
    committed after that is delivered, across reconnects too. On a server with
    no transition at all yet (head 0), each stream opened while nothing has been
    seen is followed, once its headers arrive, by a read of the history from the
    start, so nothing committed in between is missed.

    :meth:`close` (from any task, or by leaving ``async with``) cancels the
    stream; a step waiting in another task then ends the iteration.

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
        self._closed_flag = False
        self._closed_event: Optional[asyncio.Event] = None
        self._call: Any = None
        self._pending: Deque[agent_status_pb2.Transition] = collections.deque()
        self._failures = 0
        self._pinned = since_revision != 0
        self.streams_opened = 0
        self.last_revision: int = since_revision

    @property
    def closed(self) -> bool:
        return self._closed_flag

    def _closed(self) -> asyncio.Event:
        # Made on first use, in the running loop (an Event made outside one is
        # bound to the wrong loop on Python 3.9).
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
            if self._closed_flag:
                self._closed_event.set()
        return self._closed_event

    async def start(self) -> "AsyncTransitionWatch":
        """Pins "from now on" (since_revision 0) to the head revision; returns self."""
        if not self._pinned:
            response = await self._stub.ListTransitions(
                agent_status_pb2.ListTransitionsRequest(page_size=1), metadata=self._metadata, timeout=30.0
            )
            if not self._pinned:
                self._pinned = True
                self.last_revision = response.head_revision
        return self

    def __await__(self) -> Generator[Any, None, "AsyncTransitionWatch"]:
        return self.start().__await__()

    def close(self) -> None:
        """Stops the watch; safe to call from any task of the loop, more than once."""
        self._closed_flag = True
        if self._closed_event is not None:
            self._closed_event.set()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    cancel = close

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncTransitionWatch":
        return await self.start()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __aiter__(self) -> "AsyncTransitionWatch":
        return self

    async def __anext__(self) -> agent_status_pb2.Transition:
        if self._closed_flag:
            raise StopAsyncIteration
        await self.start()
        while True:
            if self._pending:
                return self._pending.popleft()
            call, fresh = self._current_call()
            if call is None:
                raise StopAsyncIteration
            try:
                if fresh and self.last_revision == 0:
                    await call.initial_metadata()  # returns once the stream is open (or has failed)
                    await self._read_history()
                    continue
                response = await call.read()
            except asyncio.CancelledError:
                # close() cancelled the stream under us; anything else is the task's own.
                self._drop(call)
                if self._closed_flag and not _being_cancelled():
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as error:
                self._drop(call)
                if self._closed_flag:
                    raise StopAsyncIteration from None
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await self._backoff()
                continue
            if response is grpc.aio.EOF:
                # Ended cleanly: the server is shutting down. Resume elsewhere or later.
                self._drop(call)
                await self._backoff()
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

    async def _read_history(self) -> None:
        """Queues the retained transitions after ``last_revision`` that the filters keep."""
        page_size = 1000
        while True:
            page = await self._stub.ListTransitions(
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
        if self._closed_flag:
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
        if self._call is call:
            self._call = None
        call.cancel()

    async def _backoff(self) -> None:
        delay = min(self._max_backoff, self._initial_backoff * (2 ** min(self._failures, 30)))
        self._failures += 1
        # Full jitter on the upper half, so many watchers do not reconnect in lockstep.
        await _wait_event(self._closed(), backoff_delay(0, delay, delay))


# -- heartbeats -----------------------------------------------------------------------------


class AsyncHeartbeater:
    """Heartbeats one agent in an asyncio task at the interval the server asks for.

    The asyncio twin of :class:`fleetcare.Heartbeater`, with the same options
    and semantics: after each response it waits that response's
    ``next_heartbeat_interval``, or ``fallback_interval`` when it has none (or
    zero), never less than ``min_interval``; ``UNAVAILABLE`` and
    ``DEADLINE_EXCEEDED`` are retried after a capped, jittered backoff; any other
    error ends the loop (``NOT_FOUND`` when the agent was never registered).
    ``on_response`` and ``on_retry`` may be plain functions or coroutine functions.

    :meth:`start` runs the loop as a task; ``await`` :meth:`stop` (or leaving
    ``async with``) ends it promptly, also mid-wait or mid-call. :meth:`run`
    runs it in the calling task instead and raises the error that ends it.

    >>> async with client.heartbeats("a1") as beats:
    ...     await run_the_agent()

    Attributes:
        last_response: the newest ``HeartbeatResponse`` (``None`` before the first).
        heartbeats: how many heartbeats the server acknowledged.
        error: the exception that ended the loop (``None`` while it runs, or
            after :meth:`stop`).
        task: the task :meth:`start` made.
    """

    def __init__(
        self,
        stub: agent_status_pb2_grpc.AgentStatusServiceStub,
        agent_id: str,
        *,
        on_response: Optional[Callable[[agent_status_pb2.HeartbeatResponse], Any]] = None,
        on_retry: Optional[Callable[[grpc.RpcError, float], Any]] = None,
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
        self._stopped_flag = False
        self._stopped_event: Optional[asyncio.Event] = None
        self._call: Any = None
        self.task: Optional["asyncio.Task[None]"] = None
        self.last_response: Optional[agent_status_pb2.HeartbeatResponse] = None
        self.heartbeats = 0
        self.error: Optional[BaseException] = None

    def _stopped(self) -> asyncio.Event:
        if self._stopped_event is None:
            self._stopped_event = asyncio.Event()
            if self._stopped_flag:
                self._stopped_event.set()
        return self._stopped_event

    def next_interval(self, response: agent_status_pb2.HeartbeatResponse) -> float:
        """Seconds to wait after ``response``: the server's interval, the fallback, the floor."""
        given = 0.0
        if response.HasField("next_heartbeat_interval"):
            d = response.next_heartbeat_interval
            given = d.seconds + d.nanos / 1e9
        return max(self._min, given if given > 0 else self._fallback)

    def start(self) -> "AsyncHeartbeater":
        """Starts the loop as a task of the running loop; returns self."""
        if self.task is not None:
            raise RuntimeError("the heartbeater was already started")
        self.task = asyncio.get_running_loop().create_task(
            self._run_in_task(), name=f"fleetcare-heartbeat-{self.agent_id}"
        )
        return self

    async def stop(self, timeout: Optional[float] = 5.0) -> None:
        """Ends the loop (cancelling a call in flight) and waits up to ``timeout`` s for its task."""
        self._stopped_flag = True
        self._stopped().set()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        await self.join(timeout)

    async def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for the loop to end; whether it has (False on timeout or when never started)."""
        task = self.task
        if task is None:
            return False
        if not task.done():
            await asyncio.wait({task}, timeout=timeout)
        return task.done()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def __aenter__(self) -> "AsyncHeartbeater":
        return self.start()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.stop()

    async def _run_in_task(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - kept for the caller in .error
            self.error = error

    async def run(self) -> None:
        """Heartbeats in this task until :meth:`stop`; raises the error that ends it otherwise."""
        stopped = self._stopped()
        failures = 0
        while not stopped.is_set():
            request = agent_status_pb2.HeartbeatRequest(agent_id=self.agent_id)
            call = self._stub.Heartbeat(request, timeout=self._call_timeout, metadata=self._metadata)
            self._call = call
            try:
                response: agent_status_pb2.HeartbeatResponse = await call
            except asyncio.CancelledError:
                if stopped.is_set() and not _being_cancelled():
                    return  # stop() cancelled the call
                raise
            except grpc.RpcError as error:
                if stopped.is_set():
                    return
                if error.code() not in RETRYABLE:
                    raise
                ceiling = min(self._max_backoff, self._initial_backoff * (2 ** min(failures, 30)))
                failures += 1
                delay = backoff_delay(0, ceiling, ceiling)
                await _call_hook(self._on_retry, error, delay)
                await _wait_event(stopped, delay)
                continue
            finally:
                if self._call is call:
                    self._call = None
            failures = 0
            self.last_response = response
            self.heartbeats += 1
            await _call_hook(self._on_response, response)
            await _wait_event(stopped, self.next_interval(response))


# -- claims ---------------------------------------------------------------------------------


class AsyncClaimHandle:
    """One claim on one agent: made on entering ``async with``, renewed in an
    asyncio task, released on leaving.

    The asyncio twin of :class:`fleetcare.ClaimHandle`, with the same options
    and semantics: ``ClaimAgent`` retried with the same ``request_id`` after a
    cut connection (up to ``attempts`` calls), the lease renewed every
    ``renew_every`` seconds (default ``lease / 3``), :attr:`lost` set to a
    :class:`ClaimLost` once the claim is gone behind the holder's back, and the
    claim released at the end, whether the block ends normally, by an exception
    or by the task's cancellation (the release is shielded from a further
    cancellation). ``on_lost`` may be a plain function or a coroutine function.

    >>> async with client.claim({"team": "infra"}, lease=30.0) as claim:
    ...     await run_on(claim.agent_id)
    ...     await claim.finish_work()

    :meth:`wait_lost` is an awaitable for the loss, e.g. to race the work with it.
    """

    def __init__(
        self,
        dispatch: dispatch_pb2_grpc.DispatchServiceStub,
        agent_status: agent_status_pb2_grpc.AgentStatusServiceStub,
        selector: Selector = None,
        *,
        slot_type: "agent_status_pb2.SlotType.ValueType" = agent_status_pb2.SLOT_TYPE_WORK,
        lease: float = 30.0,
        wait: float = 0.0,
        request_id: Optional[str] = None,
        renew_every: Optional[float] = None,
        attempts: int = 5,
        call_timeout: float = 10.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        on_lost: Optional[Callable[[ClaimLost], Any]] = None,
        metadata: Optional[Metadata] = None,
    ) -> None:
        self._renew_every = check_options(lease, wait, renew_every, attempts)
        if call_timeout <= 0:
            raise ValueError("call_timeout must be positive")
        if initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        self._dispatch = dispatch
        self._agents = agent_status
        self.selector = label_selector(selector)
        self.slot_type = slot_type
        self.lease = lease
        self.wait = wait
        self.request_id = request_id if request_id is not None else str(uuid.uuid4())
        self._attempts = attempts
        self._call_timeout = call_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._on_lost = on_lost
        self._metadata = metadata
        self._stop: Optional[asyncio.Event] = None
        self._lost_event: Optional[asyncio.Event] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._call: Any = None
        self._ended = False
        self.claim: Optional[agent_status_pb2.Claim] = None
        self.agent: Optional[agent_status_pb2.Agent] = None
        self.transition: Optional[agent_status_pb2.Transition] = None
        self.renewals = 0
        self.lost: Optional[ClaimLost] = None
        self.release_error: Optional[BaseException] = None
        self._lease_deadline = 0.0

    @property
    def agent_id(self) -> str:
        return self._held().agent_id

    @property
    def claim_id(self) -> str:
        return self._held().claim_id

    @property
    def fencing_token(self) -> int:
        return self._held().fencing_token

    @property
    def active(self) -> bool:
        """Whether the claim is held: acquired, neither ended by this handle nor lost."""
        return self.claim is not None and not self._ended and self.lost is None

    def check(self) -> None:
        """Raises :attr:`lost` if the claim was lost."""
        if self.lost is not None:
            raise self.lost

    def _lost(self) -> asyncio.Event:
        if self._lost_event is None:
            self._lost_event = asyncio.Event()
            if self.lost is not None:
                self._lost_event.set()
        return self._lost_event

    async def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Waits until the claim is lost (True) or ``timeout`` seconds pass (False)."""
        event = self._lost()
        if timeout is None:
            await event.wait()
            return True
        return await _wait_event(event, timeout)

    def _held(self) -> agent_status_pb2.Claim:
        if self.claim is None:
            raise RuntimeError("the claim was not acquired yet (use `async with client.claim(...)` or acquire())")
        return self.claim

    def request(self) -> dispatch_pb2.ClaimAgentRequest:
        """The ``ClaimAgentRequest`` this handle sends (the same on every attempt)."""
        return dispatch_pb2.ClaimAgentRequest(
            selector=self.selector,
            slot_type=self.slot_type,
            lease_duration=duration(self.lease),
            wait_timeout=duration(self.wait),
            request_id=self.request_id,
        )

    async def acquire(self) -> "AsyncClaimHandle":
        """Claims an agent and starts renewing; returns self. Raises the server's refusal."""
        if self.claim is not None:
            raise RuntimeError("the claim was already acquired")
        request = self.request()
        failures = 0
        while True:
            started = time.monotonic()
            try:
                response: dispatch_pb2.ClaimAgentResponse = await self._dispatch.ClaimAgent(
                    request, timeout=self.wait + self._call_timeout, metadata=self._metadata
                )
                break
            except grpc.RpcError as error:
                failures += 1
                if error.code() not in RETRYABLE or failures >= self._attempts:
                    raise
                await asyncio.sleep(backoff_delay(failures - 1, self._initial_backoff, self._max_backoff))
        self.claim = response.claim
        self.agent = response.agent
        self.transition = response.transition if response.HasField("transition") else None
        self._lease_deadline = started + self.lease
        self._start_renewing()
        return self

    def _start_renewing(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._renew_loop(self._stop), name=f"fleetcare-claim-{self.claim_id}"
        )

    async def _stop_renewing(self) -> None:
        """Stops the renewal task (cancelling a renewal in flight) and waits for it."""
        if self._stop is not None:
            self._stop.set()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            await asyncio.wait({task})

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        wait = self._renew_every
        while not await _wait_event(stop, wait):
            claim = self._held()
            request = dispatch_pb2.RenewClaimRequest(
                claim_id=claim.claim_id, fencing_token=claim.fencing_token, lease_duration=duration(self.lease)
            )
            started = time.monotonic()
            remaining = self._lease_deadline - started
            call = self._dispatch.RenewClaim(
                request, timeout=max(0.05, min(self._call_timeout, remaining)), metadata=self._metadata
            )
            self._call = call
            try:
                response: dispatch_pb2.RenewClaimResponse = await call
            except asyncio.CancelledError:
                if stop.is_set() and not _being_cancelled():
                    return  # stopped
                raise
            except grpc.RpcError as error:
                if stop.is_set():
                    return
                if error.code() in RETRYABLE and time.monotonic() < self._lease_deadline:
                    wait = min(
                        backoff_delay(failures, self._initial_backoff, self._max_backoff),
                        max(0.0, self._lease_deadline - time.monotonic()),
                    )
                    failures += 1
                    continue
                if error.code() in RETRYABLE:
                    await self._mark_lost(ClaimLost(claim.claim_id, "LEASE_EXPIRED", error))
                else:
                    await self._mark_lost(lost_from(claim.claim_id, error))
                return
            finally:
                if self._call is call:
                    self._call = None
            if stop.is_set():
                return
            failures = 0
            wait = self._renew_every
            self.claim = response.claim
            self.renewals += 1
            self._lease_deadline = started + self.lease

    async def _mark_lost(self, lost: ClaimLost) -> None:
        if self._ended or self.lost is not None:
            return
        self.lost = lost
        self._lost().set()
        await _call_hook(self._on_lost, lost)

    async def release(self) -> Optional[dispatch_pb2.ReleaseClaimResponse]:
        """Stops renewing and releases the claim (the agent back to IDLE); ``None``
        when there was nothing to release (see :meth:`fleetcare.ClaimHandle.release`)."""
        await self._stop_renewing()
        if self.claim is None or self._ended:
            return None
        claim = self.claim
        request = dispatch_pb2.ReleaseClaimRequest(claim_id=claim.claim_id, fencing_token=claim.fencing_token)
        failures = 0
        while True:
            try:
                response: dispatch_pb2.ReleaseClaimResponse = await self._dispatch.ReleaseClaim(
                    request, timeout=self._call_timeout, metadata=self._metadata
                )
            except grpc.RpcError as error:
                if claim_ended(error):
                    self._ended = True
                    return None
                failures += 1
                if error.code() not in RETRYABLE or failures >= self._attempts:
                    raise
                await asyncio.sleep(backoff_delay(failures - 1, self._initial_backoff, self._max_backoff))
                continue
            self._ended = True
            self.agent = response.agent
            return response

    async def finish_work(self) -> agent_status_pb2.FinishWorkResponse:
        """``FinishWork`` with the claim's fencing token, which ends the claim; see
        :meth:`fleetcare.ClaimHandle.finish_work`."""
        claim = self._held()
        request = agent_status_pb2.FinishWorkRequest(agent_id=claim.agent_id, fencing_token=claim.fencing_token)
        return await self._end_with(
            lambda: self._agents.FinishWork(request, timeout=self._call_timeout, metadata=self._metadata)
        )

    async def report_exhausted(self, **fields: Any) -> agent_status_pb2.ReportExhaustedResponse:
        """``ReportExhausted`` with the claim's fencing token (``fields``: ``reason``,
        ``message``, ``quota_pool``, ``window``, ...), which ends the claim; see
        :meth:`fleetcare.ClaimHandle.report_exhausted`."""
        claim = self._held()
        request = agent_status_pb2.ReportExhaustedRequest(
            agent_id=claim.agent_id, fencing_token=claim.fencing_token, **fields
        )
        return await self._end_with(
            lambda: self._agents.ReportExhausted(request, timeout=self._call_timeout, metadata=self._metadata)
        )

    async def _end_with(self, call: Callable[[], Awaitable[Any]]) -> Any:
        if self._ended:
            raise RuntimeError("the claim has ended already")
        self.check()
        await self._stop_renewing()  # a racing renewal would take the ended claim for a lost one
        try:
            response = await call()
        except BaseException:
            if self.lost is None:
                self._start_renewing()
            raise
        self._ended = True
        if hasattr(response, "agent"):
            self.agent = response.agent
        return response

    async def close(self) -> None:
        """Stops renewing and releases, as leaving ``async with`` does."""
        await self.release()

    async def __aenter__(self) -> "AsyncClaimHandle":
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # Shielded: a cancellation arriving during the release does not cut it short.
        release = asyncio.ensure_future(self.release())
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - raised below unless another one is on its way
            if exc is None and self.lost is None:
                raise
            self.release_error = error

