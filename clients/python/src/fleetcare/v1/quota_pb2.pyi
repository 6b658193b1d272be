import datetime

from fleetcare.v1 import agent_status_pb2 as _agent_status_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuotaPoolPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUOTA_POOL_PHASE_UNSPECIFIED: _ClassVar[QuotaPoolPhase]
    QUOTA_POOL_PHASE_OPEN: _ClassVar[QuotaPoolPhase]
    QUOTA_POOL_PHASE_PARKED: _ClassVar[QuotaPoolPhase]
    QUOTA_POOL_PHASE_RELEASING: _ClassVar[QuotaPoolPhase]
QUOTA_POOL_PHASE_UNSPECIFIED: QuotaPoolPhase
QUOTA_POOL_PHASE_OPEN: QuotaPoolPhase
QUOTA_POOL_PHASE_PARKED: QuotaPoolPhase
QUOTA_POOL_PHASE_RELEASING: QuotaPoolPhase

class QuotaPoolWindow(_message.Message):
    __slots__ = ("window", "until", "in_force", "source", "hint", "reported_by", "reported_at")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_BY_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    window: _agent_status_pb2.QuotaWindow
    until: _timestamp_pb2.Timestamp
    in_force: bool
    source: str
    hint: str
    reported_by: str
    reported_at: _timestamp_pb2.Timestamp
    def __init__(self, window: _Optional[_Union[_agent_status_pb2.QuotaWindow, str]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., in_force: bool = ..., source: _Optional[str] = ..., hint: _Optional[str] = ..., reported_by: _Optional[str] = ..., reported_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class QuotaPoolMembers(_message.Message):
    __slots__ = ("status", "count")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    status: _agent_status_pb2.AgentStatus
    count: int
    def __init__(self, status: _Optional[_Union[_agent_status_pb2.AgentStatus, str]] = ..., count: _Optional[int] = ...) -> None: ...

class QuotaPool(_message.Message):
    __slots__ = ("name", "phase", "parked_until", "windows", "members", "held", "canary_agent_id", "canary_released_at", "canary_completed_at", "next_release_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PARKED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    CANARY_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CANARY_RELEASED_AT_FIELD_NUMBER: _ClassVar[int]
    CANARY_COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_RELEASE_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: QuotaPoolPhase
    parked_until: _timestamp_pb2.Timestamp
    windows: _containers.RepeatedCompositeFieldContainer[QuotaPoolWindow]
    members: _containers.RepeatedCompositeFieldContainer[QuotaPoolMembers]
    held: int
    canary_agent_id: str
    canary_released_at: _timestamp_pb2.Timestamp
    canary_completed_at: _timestamp_pb2.Timestamp
    next_release_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[_Union[QuotaPoolPhase, str]] = ..., parked_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., windows: _Optional[_Iterable[_Union[QuotaPoolWindow, _Mapping]]] = ..., members: _Optional[_Iterable[_Union[QuotaPoolMembers, _Mapping]]] = ..., held: _Optional[int] = ..., canary_agent_id: _Optional[str] = ..., canary_released_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., canary_completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_release_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListQuotaPoolsRequest(_message.Message):
    __slots__ = ("parked_only",)
    PARKED_ONLY_FIELD_NUMBER: _ClassVar[int]
    parked_only: bool
    def __init__(self, parked_only: bool = ...) -> None: ...

class ListQuotaPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[QuotaPool]
    def __init__(self, pools: _Optional[_Iterable[_Union[QuotaPool, _Mapping]]] = ...) -> None: ...

class GetQuotaPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class QuotaPoolRelease(_message.Message):
    __slots__ = ("agent_id", "release_at", "released")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_AT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    release_at: _timestamp_pb2.Timestamp
    released: bool
    def __init__(self, agent_id: _Optional[str] = ..., release_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., released: bool = ...) -> None: ...

class GetQuotaPoolResponse(_message.Message):
    __slots__ = ("pool", "releases", "held_agent_ids")
    POOL_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    HELD_AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    pool: QuotaPool
    releases: _containers.RepeatedCompositeFieldContainer[QuotaPoolRelease]
    held_agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pool: _Optional[_Union[QuotaPool, _Mapping]] = ..., releases: _Optional[_Iterable[_Union[QuotaPoolRelease, _Mapping]]] = ..., held_agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ParkPoolRequest(_message.Message):
    __slots__ = ("pool", "until", "window", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    until: _timestamp_pb2.Timestamp
    window: _agent_status_pb2.QuotaWindow
    reason: str
    def __init__(self, pool: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[_Union[_agent_status_pb2.QuotaWindow, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ParkPoolResponse(_message.Message):
    __slots__ = ("pool", "members_parked")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_PARKED_FIELD_NUMBER: _ClassVar[int]
    pool: QuotaPool
    members_parked: int
    def __init__(self, pool: _Optional[_Union[QuotaPool, _Mapping]] = ..., members_parked: _Optional[int] = ...) -> None: ...

class ReleasePoolRequest(_message.Message):
    __slots__ = ("pool", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    reason: str
    def __init__(self, pool: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleasePoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: QuotaPool
    def __init__(self, pool: _Optional[_Union[QuotaPool, _Mapping]] = ...) -> None: ...
