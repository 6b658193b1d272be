"""Python client for fleetcare.

The generated modules are the main API: ``fleetcare.v1.<name>_pb2`` (messages,
with ``.pyi`` type stubs) and ``fleetcare.v1.<name>_pb2_grpc`` (service stubs).
:class:`FleetcareClient` builds a channel (TLS, bearer token) and the six stubs;
:class:`TransitionWatch` is a WatchTransitions iterator that resumes after dropped
streams; :class:`Heartbeater` heartbeats an agent at the interval the server asks for;
:class:`ClaimHandle` (``with client.claim(...)``) holds an agent, renewing its lease
in the background. :mod:`fleetcare.aio` is the same on ``grpc.aio``, for asyncio.
"""

from fleetcare.claim import ClaimHandle, ClaimLost, label_selector
from fleetcare.client import (
    BearerTokenInterceptor,
    FleetcareClient,
    Heartbeater,
    TransitionWatch,
    error_info,
)

__all__ = [
    "BearerTokenInterceptor",
    "ClaimHandle",
    "ClaimLost",
    "FleetcareClient",
    "Heartbeater",
    "TransitionWatch",
    "error_info",
    "label_selector",
]
__version__ = "0.1.0"
