"""Claims: hold one agent for a piece of work, with the lease renewed in the
background and the claim released on the way out.

* :class:`ClaimHandle`: ``with client.claim(selector) as claim:`` makes a
  ``ClaimAgent`` call (retried with the same ``request_id`` after a cut
  connection), renews the lease in a daemon thread, and releases the claim
  when the block ends, also on an exception.
* :class:`ClaimLost`: what :attr:`ClaimHandle.lost` holds once the claim is
  gone behind the holder's back (a renewal refused with ``STALE_FENCING_TOKEN``
  or ``NOT_FOUND``, or the lease run out while the server was unreachable):
  the work must stop, as another holder may have the agent now.

The pieces shared with the asyncio flavour (:mod:`fleetcare.aio`) are here too:
the request builders and the reading of refusals.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from types import TracebackType
from typing import Any, Callable, Mapping, Optional, Type, Union

import grpc
from google.protobuf import duration_pb2

from fleetcare.client import Metadata, error_info
from fleetcare.v1 import agent_status_pb2, agent_status_pb2_grpc, dispatch_pb2, dispatch_pb2_grpc

__all__ = ["ClaimHandle", "ClaimLost", "Selector", "label_selector"]

#: A selector: a ``LabelSelector``, or a mapping of labels the agent must carry
#: (its ``match_labels``), or ``None`` for any agent.
Selector = Union[None, Mapping[str, str], dispatch_pb2.LabelSelector]

#: Refusals that say the claim has ended (released, expired, finished, taken over).
ENDED_REASONS = ("STALE_FENCING_TOKEN",)

#: Codes a call is retried on: the request may not have reached the server, or
#: its answer was lost on the way back.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def label_selector(selector: Selector) -> dispatch_pb2.LabelSelector:
    """``selector`` as a ``LabelSelector``: a mapping becomes its ``match_labels``."""
    if selector is None:
        return dispatch_pb2.LabelSelector()
    if isinstance(selector, dispatch_pb2.LabelSelector):
        return selector
    return dispatch_pb2.LabelSelector(match_labels=dict(selector))


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def claim_ended(error: grpc.RpcError) -> bool:
    """Whether a Renew/ReleaseClaim refusal says the claim is gone: ``STALE_FENCING_TOKEN``
    (released, expired, ended by FinishWork or ReportExhausted) or ``NOT_FOUND``."""
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return True
    if code != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    info = error_info(error)
    return info is not None and info.reason in ENDED_REASONS


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """A capped exponential delay with jitter on its upper half."""
    ceiling = min(maximum, initial * (2 ** min(failures, 30)))
    return random.uniform(ceiling / 2, ceiling)


class ClaimLost(Exception):
    """The claim ended while it was held: its work must stop.

    Attributes:
        claim_id: the claim that was lost.
        reason: ``STALE_FENCING_TOKEN`` or ``NOT_FOUND`` (the server's answer to a
            renewal), ``LEASE_EXPIRED`` (no renewal got through before the lease
            ran out), or the ``ErrorInfo`` reason (else the code's name) of another
            refusal that ended the renewals (``PERMISSION_DENIED``, ...).
        error: the ``grpc.RpcError`` behind it (the last failed renewal).
    """

    def __init__(self, claim_id: str, reason: str, error: Optional[grpc.RpcError]) -> None:
        detail = f": {error.details()}" if error is not None and hasattr(error, "details") else ""
        super().__init__(f"claim {claim_id} lost ({reason}){detail}")
        self.claim_id = claim_id
        self.reason = reason
        self.error = error


def lost_from(claim_id: str, error: grpc.RpcError) -> ClaimLost:
    """The :class:`ClaimLost` for a renewal refused with ``error``."""
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return ClaimLost(claim_id, "NOT_FOUND", error)
    info = error_info(error)
    reason = info.reason if info is not None and info.reason else error.code().name
    return ClaimLost(claim_id, reason, error)


def check_options(lease: float, wait: float, renew_every: Optional[float], attempts: int) -> float:
    """Validates the options; returns the renewal period."""
    if lease <= 0:
        raise ValueError("lease must be positive (the server takes 1 s to 1 h)")
    if wait < 0:
        raise ValueError("wait must not be negative")
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    every = lease / 3 if renew_every is None else renew_every
    if every <= 0 or every >= lease:
        raise ValueError("need 0 < renew_every < lease")
    return every


class ClaimHandle:
    """One claim on one agent: made on entering, renewed in the background,
    released on leaving.

    >>> with client.claim({"team": "infra"}, lease=30.0) as claim:
    ...     run_on(claim.agent_id)        # the agent is BUSY, held by this caller
    ...     claim.finish_work()           # optional: FinishWork with the token ends the claim

    Entering (or :meth:`acquire`) calls ``ClaimAgent`` with ``selector``,
    ``slot_type``, ``lease`` and ``wait`` (seconds), and ``request_id`` (a fresh
    uuid4 by default). A call cut off by ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED``
    is retried, up to ``attempts`` calls in all, with the same ``request_id``,
    so the server hands back the claim it may have made rather than a second
    one. Its refusals are raised: ``RESOURCE_EXHAUSTED`` with reason
    ``NO_AGENT_AVAILABLE`` when no matching agent is idle (after ``wait``).

    A daemon thread then renews the lease every ``renew_every`` seconds
    (default a third of ``lease``), retrying transient failures. When the
    server answers that the claim is gone (``STALE_FENCING_TOKEN``,
    ``NOT_FOUND``), refuses otherwise, or the lease runs out before a renewal
    gets through, renewing stops and :attr:`lost` holds a :class:`ClaimLost`:
    stop the work (:meth:`check` raises it; ``on_lost`` is called with it, from
    the renewal thread).

    Leaving the block (normally or by an exception) stops the renewals and
    releases the claim (the agent goes back to IDLE). A release answered with
    ``STALE_FENCING_TOKEN`` or ``NOT_FOUND`` (the claim had ended already) is not
    an error; after :meth:`finish_work` or :meth:`release` there is nothing left
    to release. Another failure of that release is raised when the block ended
    normally with the claim held, and kept in :attr:`release_error` when an
    exception is already on its way or the claim was lost (its lease runs out
    on the server anyway).

    Attributes:
        claim: the ``Claim``, updated by each renewal (``lease_expires_at``).
        agent: the claimed ``Agent`` as ``ClaimAgent`` returned it.
        transition: the ``CLAIMED`` transition (unset when the server recognised
            the ``request_id`` of an earlier call).
        request_id: the idempotency key sent with ``ClaimAgent``.
        renewals: how many renewals the server accepted.
        lost: ``None``, or the :class:`ClaimLost` that ended the renewals.
        release_error: a failed release at exit, when it could not be raised.
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
        on_lost: Optional[Callable[[ClaimLost], None]] = None,
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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._call: Any = None
        self._ended = False  # released or finished by this handle
        self.claim: Optional[agent_status_pb2.Claim] = None
        self.agent: Optional[agent_status_pb2.Agent] = None
        self.transition: Optional[agent_status_pb2.Transition] = None
        self.renewals = 0
        self.lost: Optional[ClaimLost] = None
        self.release_error: Optional[BaseException] = None
        # Monotonic time by which the server has certainly let the lease run
        # out without a renewal: the start of the last call that set it, plus the lease.
        self._lease_deadline = 0.0

    # -- what the claim holds ---------------------------------------------------------------

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
        """Raises :attr:`lost` if the claim was lost; call it where the work can stop."""
        lost = self.lost
        if lost is not None:
            raise lost

    def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the claim is lost (True) or ``timeout`` seconds pass (False)."""
        return self._lost_event.wait(timeout)

    def _held(self) -> agent_status_pb2.Claim:
        if self.claim is None:
            raise RuntimeError("the claim was not acquired yet (use `with client.claim(...)` or acquire())")
        return self.claim

    # -- acquiring ----------------------------------------------------------------------------

    def request(self) -> dispatch_pb2.ClaimAgentRequest:
        """The ``ClaimAgentRequest`` this handle sends (the same on every attempt)."""
        return dispatch_pb2.ClaimAgentRequest(
            selector=self.selector,
            slot_type=self.slot_type,
            lease_duration=duration(self.lease),
            wait_timeout=duration(self.wait),
            request_id=self.request_id,
        )

    def acquire(self) -> "ClaimHandle":
        """Claims an agent and starts renewing; returns self. Raises the server's refusal."""
        with self._lock:
            if self.claim is not None:
                raise RuntimeError("the claim was already acquired")
        request = self.request()
        failures = 0
        while True:
            started = time.monotonic()
            try:
                response: dispatch_pb2.ClaimAgentResponse = self._dispatch.ClaimAgent(
                    request, timeout=self.wait + self._call_timeout, metadata=self._metadata
                )
                break
            except grpc.RpcError as error:
                failures += 1
                if error.code() not in RETRYABLE or failures >= self._attempts:
                    raise
                time.sleep(backoff_delay(failures - 1, self._initial_backoff, self._max_backoff))
        self.claim = response.claim
        self.agent = response.agent
        self.transition = response.transition if response.HasField("transition") else None
        self._lease_deadline = started + self.lease
        self._start_renewing()
        return self

    # -- renewing -----------------------------------------------------------------------------

    def _start_renewing(self) -> None:
        with self._lock:
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._renew_loop,
                args=(self._stop,),
                name=f"fleetcare-claim-{self.claim_id}",
                daemon=True,
            )
            self._thread.start()

    def _stop_renewing(self) -> None:
        """Stops the renewal thread (cancelling a renewal in flight) and waits for it."""
        with self._lock:
            self._stop.set()
            call, self._call = self._call, None
            thread = self._thread
        if call is not None:
            call.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _renew_loop(self, stop: threading.Event) -> None:
        failures = 0
        wait = self._renew_every
        while not stop.wait(wait):
            claim = self._held()
            request = dispatch_pb2.RenewClaimRequest(
                claim_id=claim.claim_id, fencing_token=claim.fencing_token, lease_duration=duration(self.lease)
            )
            started = time.monotonic()
            remaining = self._lease_deadline - started
            with self._lock:
                if stop.is_set():
                    return
                call = self._dispatch.RenewClaim.future(
                    request, timeout=max(0.05, min(self._call_timeout, remaining)), metadata=self._metadata
                )
                self._call = call
            try:
                response: dispatch_pb2.RenewClaimResponse = call.result()
            except grpc.FutureCancelledError:
                return  # stopped
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
                    self._mark_lost(ClaimLost(claim.claim_id, "LEASE_EXPIRED", error))
                else:
                    self._mark_lost(lost_from(claim.claim_id, error))
                return
            finally:
                with self._lock:
                    if self._call is call:
                        self._call = None
            failures = 0
            wait = self._renew_every
            with self._lock:
                if stop.is_set():
                    return
                self.claim = response.claim
                self.renewals += 1
                self._lease_deadline = started + self.lease

    def _mark_lost(self, lost: ClaimLost) -> None:
        with self._lock:
            if self._ended or self.lost is not None:
                return
            self.lost = lost
        self._lost_event.set()
        if self._on_lost is not None:
            self._on_lost(lost)

    # -- ending -------------------------------------------------------------------------------

    def release(self) -> Optional[dispatch_pb2.ReleaseClaimResponse]:
        """Stops renewing and releases the claim (the agent back to IDLE).

        Returns the response, or ``None`` when there was nothing to release: the
        claim had ended already (released, finished, lost: the server answered
        ``STALE_FENCING_TOKEN`` or ``NOT_FOUND``) or was never acquired. Transient
        failures are retried up to ``attempts`` calls; other refusals are raised.
        """
        self._stop_renewing()
        with self._lock:
            if self.claim is None or self._ended:
                return None
            claim = self.claim
        request = dispatch_pb2.ReleaseClaimRequest(claim_id=claim.claim_id, fencing_token=claim.fencing_token)
        failures = 0
        while True:
            try:
                response: dispatch_pb2.ReleaseClaimResponse = self._dispatch.ReleaseClaim(
                    request, timeout=self._call_timeout, metadata=self._metadata
                )
            except grpc.RpcError as error:
                if claim_ended(error):
                    self._ended = True
                    return None
                failures += 1
                if error.code() not in RETRYABLE or failures >= self._attempts:
                    raise
                time.sleep(backoff_delay(failures - 1, self._initial_backoff, self._max_backoff))
                continue
            self._ended = True
            self.agent = response.agent
            return response

    def finish_work(self) -> agent_status_pb2.FinishWorkResponse:
        """``FinishWork`` on the claimed agent with the claim's fencing token: the
        slot is freed and the claim ends (the agent back to IDLE), so leaving the
        block then releases nothing. Renewals pause during the call and resume if
        it is refused (the refusal is raised; the claim is still held)."""
        claim = self._held()
        return self._end_with(
            lambda: self._agents.FinishWork(
                agent_status_pb2.FinishWorkRequest(agent_id=claim.agent_id, fencing_token=claim.fencing_token),
                timeout=self._call_timeout,
                metadata=self._metadata,
            )
        )

    def report_exhausted(self, **fields: Any) -> agent_status_pb2.ReportExhaustedResponse:
        """``ReportExhausted`` on the claimed agent with the claim's fencing token
        (``fields`` are the other ``ReportExhaustedRequest`` fields: ``reason``,
        ``message``, ``quota_pool`` (the pool whose limit was hit, parking its
        IDLE members too), ``window`` (a ``QuotaWindow``), ...). The report ends
        the claim, as :meth:`finish_work` does."""
        claim = self._held()
        request = agent_status_pb2.ReportExhaustedRequest(
            agent_id=claim.agent_id, fencing_token=claim.fencing_token, **fields
        )
        return self._end_with(
            lambda: self._agents.ReportExhausted(request, timeout=self._call_timeout, metadata=self._metadata)
        )

    def _end_with(self, call: Callable[[], Any]) -> Any:
        if self._ended:
            raise RuntimeError("the claim has ended already")
        self.check()
        # A renewal racing the call would be answered STALE_FENCING_TOKEN once the
        # call has ended the claim, and taken for a lost claim: pause them.
        self._stop_renewing()
        try:
            response = call()
        except BaseException:
            if self.lost is None:
                self._start_renewing()
            raise
        self._ended = True
        if hasattr(response, "agent"):
            self.agent = response.agent
        return response

    def close(self) -> None:
        """Stops renewing and releases, as leaving the ``with`` block does."""
        self.release()

    def __enter__(self) -> "ClaimHandle":
        return self.acquire()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.release()
        except Exception as error:  # noqa: BLE001 - raised below unless another one is on its way
            if exc is None and self.lost is None:
                raise
            self.release_error = error
