import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATUS_UNSPECIFIED: _ClassVar[AgentStatus]
    AGENT_STATUS_IDLE: _ClassVar[AgentStatus]
    AGENT_STATUS_BUSY: _ClassVar[AgentStatus]
    AGENT_STATUS_ON_CALL: _ClassVar[AgentStatus]
    AGENT_STATUS_OFFLINE: _ClassVar[AgentStatus]
    AGENT_STATUS_EXHAUSTED: _ClassVar[AgentStatus]

class SlotType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_TYPE_UNSPECIFIED: _ClassVar[SlotType]
    SLOT_TYPE_WORK: _ClassVar[SlotType]
    SLOT_TYPE_ON_CALL: _ClassVar[SlotType]

class ExhaustionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXHAUSTION_REASON_UNSPECIFIED: _ClassVar[ExhaustionReason]
    EXHAUSTION_REASON_RATE_LIMIT: _ClassVar[ExhaustionReason]
    EXHAUSTION_REASON_BILLING: _ClassVar[ExhaustionReason]

class RecoverySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVERY_SOURCE_UNSPECIFIED: _ClassVar[RecoverySource]
    RECOVERY_SOURCE_EXPLICIT: _ClassVar[RecoverySource]
    RECOVERY_SOURCE_RETRY_AFTER_HEADER: _ClassVar[RecoverySource]
    RECOVERY_SOURCE_PROVIDER_RESET_HEADER: _ClassVar[RecoverySource]
    RECOVERY_SOURCE_MESSAGE: _ClassVar[RecoverySource]
    RECOVERY_SOURCE_DEFAULT: _ClassVar[RecoverySource]

class TransitionCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSITION_CAUSE_UNSPECIFIED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_REGISTERED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_WORK_STARTED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_WORK_FINISHED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_HEARTBEAT_RESUMED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_HEARTBEAT_TIMEOUT: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_EXHAUSTED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_RECOVERED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_MARKED_OFFLINE: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_RESUMED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_CORDONED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_UNCORDONED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_CLAIMED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_CLAIM_RELEASED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_CLAIM_EXPIRED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_DELETED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_EXPIRED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_POOL_EXHAUSTED: _ClassVar[TransitionCause]
    TRANSITION_CAUSE_POOL_RELEASED: _ClassVar[TransitionCause]

class QuotaWindow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUOTA_WINDOW_UNSPECIFIED: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_FIVE_HOUR: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_WEEKLY: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_REQUESTS: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_TOKENS: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_BILLING: _ClassVar[QuotaWindow]
    QUOTA_WINDOW_OTHER: _ClassVar[QuotaWindow]
AGENT_STATUS_UNSPECIFIED: AgentStatus
AGENT_STATUS_IDLE: AgentStatus
AGENT_STATUS_BUSY: AgentStatus
AGENT_STATUS_ON_CALL: AgentStatus
AGENT_STATUS_OFFLINE: AgentStatus
AGENT_STATUS_EXHAUSTED: AgentStatus
SLOT_TYPE_UNSPECIFIED: SlotType
SLOT_TYPE_WORK: SlotType
SLOT_TYPE_ON_CALL: SlotType
EXHAUSTION_REASON_UNSPECIFIED: ExhaustionReason
EXHAUSTION_REASON_RATE_LIMIT: ExhaustionReason
EXHAUSTION_REASON_BILLING: ExhaustionReason
RECOVERY_SOURCE_UNSPECIFIED: RecoverySource
RECOVERY_SOURCE_EXPLICIT: RecoverySource
RECOVERY_SOURCE_RETRY_AFTER_HEADER: RecoverySource
RECOVERY_SOURCE_PROVIDER_RESET_HEADER: RecoverySource
RECOVERY_SOURCE_MESSAGE: RecoverySource
RECOVERY_SOURCE_DEFAULT: RecoverySource
TRANSITION_CAUSE_UNSPECIFIED: TransitionCause
TRANSITION_CAUSE_REGISTERED: TransitionCause
TRANSITION_CAUSE_WORK_STARTED: TransitionCause
TRANSITION_CAUSE_WORK_FINISHED: TransitionCause
TRANSITION_CAUSE_HEARTBEAT_RESUMED: TransitionCause
TRANSITION_CAUSE_HEARTBEAT_TIMEOUT: TransitionCause
TRANSITION_CAUSE_EXHAUSTED: TransitionCause
TRANSITION_CAUSE_RECOVERED: TransitionCause
TRANSITION_CAUSE_MARKED_OFFLINE: TransitionCause
TRANSITION_CAUSE_RESUMED: TransitionCause
TRANSITION_CAUSE_CORDONED: TransitionCause
TRANSITION_CAUSE_UNCORDONED: TransitionCause
TRANSITION_CAUSE_CLAIMED: TransitionCause
TRANSITION_CAUSE_CLAIM_RELEASED: TransitionCause
TRANSITION_CAUSE_CLAIM_EXPIRED: TransitionCause
TRANSITION_CAUSE_DELETED: TransitionCause
TRANSITION_CAUSE_EXPIRED: TransitionCause
TRANSITION_CAUSE_POOL_EXHAUSTED: TransitionCause
TRANSITION_CAUSE_POOL_RELEASED: TransitionCause
QUOTA_WINDOW_UNSPECIFIED: QuotaWindow
QUOTA_WINDOW_FIVE_HOUR: QuotaWindow
QUOTA_WINDOW_WEEKLY: QuotaWindow
QUOTA_WINDOW_REQUESTS: QuotaWindow
QUOTA_WINDOW_TOKENS: QuotaWindow
QUOTA_WINDOW_BILLING: QuotaWindow
QUOTA_WINDOW_OTHER: QuotaWindow

class Agent(_message.Message):
    __slots__ = ("agent_id", "status", "labels", "registered_at", "last_heartbeat_at", "last_transition_at", "revision", "exhaustion_reason", "recovery_at", "recovery_source", "recovery_hint", "schedulable", "cordon_reason", "claim", "quota_pools", "held_by_pools")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTION_REASON_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_AT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_HINT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULABLE_FIELD_NUMBER: _ClassVar[int]
    CORDON_REASON_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    QUOTA_POOLS_FIELD_NUMBER: _ClassVar[int]
    HELD_BY_POOLS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    status: AgentStatus
    labels: _containers.ScalarMap[str, str]
    registered_at: _timestamp_pb2.Timestamp
    last_heartbeat_at: _timestamp_pb2.Timestamp
    last_transition_at: _timestamp_pb2.Timestamp
    revision: int
    exhaustion_reason: ExhaustionReason
    recovery_at: _timestamp_pb2.Timestamp
    recovery_source: RecoverySource
    recovery_hint: str
    schedulable: bool
    cordon_reason: str
    claim: Claim
    quota_pools: _containers.RepeatedScalarFieldContainer[str]
    held_by_pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., status: _Optional[_Union[AgentStatus, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_transition_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revision: _Optional[int] = ..., exhaustion_reason: _Optional[_Union[ExhaustionReason, str]] = ..., recovery_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recovery_source: _Optional[_Union[RecoverySource, str]] = ..., recovery_hint: _Optional[str] = ..., schedulable: bool = ..., cordon_reason: _Optional[str] = ..., claim: _Optional[_Union[Claim, _Mapping]] = ..., quota_pools: _Optional[_Iterable[str]] = ..., held_by_pools: _Optional[_Iterable[str]] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("claim_id", "agent_id", "fencing_token", "slot_type", "holder", "claimed_at", "lease_expires_at", "request_id")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SLOT_TYPE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    agent_id: str
    fencing_token: int
    slot_type: SlotType
    holder: str
    claimed_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, claim_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., slot_type: _Optional[_Union[SlotType, str]] = ..., holder: _Optional[str] = ..., claimed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("revision", "agent_id", "from_status", "to_status", "cause", "occurred_at", "exhaustion_reason", "recovery_at", "actor", "quota_pool")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATUS_FIELD_NUMBER: _ClassVar[int]
    TO_STATUS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTION_REASON_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    QUOTA_POOL_FIELD_NUMBER: _ClassVar[int]
    revision: int
    agent_id: str
    from_status: AgentStatus
    to_status: AgentStatus
    cause: TransitionCause
    occurred_at: _timestamp_pb2.Timestamp
    exhaustion_reason: ExhaustionReason
    recovery_at: _timestamp_pb2.Timestamp
    actor: str
    quota_pool: str
    def __init__(self, revision: _Optional[int] = ..., agent_id: _Optional[str] = ..., from_status: _Optional[_Union[AgentStatus, str]] = ..., to_status: _Optional[_Union[AgentStatus, str]] = ..., cause: _Optional[_Union[TransitionCause, str]] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exhaustion_reason: _Optional[_Union[ExhaustionReason, str]] = ..., recovery_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., quota_pool: _Optional[str] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("agent_id", "labels", "quota_pools")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_POOLS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    labels: _containers.ScalarMap[str, str]
    quota_pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., quota_pools: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("agent", "created")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    created: bool
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., created: bool = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class GetAgentResponse(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "statuses", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    statuses: _containers.RepeatedScalarFieldContainer[AgentStatus]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[AgentStatus, str]]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("agent", "transition", "next_heartbeat_interval")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    NEXT_HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    transition: Transition
    next_heartbeat_interval: _duration_pb2.Duration
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ..., next_heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StartWorkRequest(_message.Message):
    __slots__ = ("agent_id", "slot_type")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_TYPE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    slot_type: SlotType
    def __init__(self, agent_id: _Optional[str] = ..., slot_type: _Optional[_Union[SlotType, str]] = ...) -> None: ...

class StartWorkResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    transition: Transition
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ...) -> None: ...

class FinishWorkRequest(_message.Message):
    __slots__ = ("agent_id", "fencing_token")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    fencing_token: int
    def __init__(self, agent_id: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class FinishWorkResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    transition: Transition
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ReportExhaustedRequest(_message.Message):
    __slots__ = ("agent_id", "reason", "recovery_at", "headers", "message", "time_zone", "fencing_token", "quota_pool", "window")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_AT_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUOTA_POOL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: ExhaustionReason
    recovery_at: _timestamp_pb2.Timestamp
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    message: str
    time_zone: str
    fencing_token: int
    quota_pool: str
    window: QuotaWindow
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[_Union[ExhaustionReason, str]] = ..., recovery_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., message: _Optional[str] = ..., time_zone: _Optional[str] = ..., fencing_token: _Optional[int] = ..., quota_pool: _Optional[str] = ..., window: _Optional[_Union[QuotaWindow, str]] = ...) -> None: ...

class ReportExhaustedResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    transition: Transition
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ...) -> None: ...

class MarkOfflineRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class MarkOfflineResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: Agent
    transition: Transition
    def __init__(self, agent: _Optional[_Union[Agent, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ...) -> None: ...

class WatchTransitionsRequest(_message.Message):
    __slots__ = ("since_revision", "agent_ids", "statuses", "include_snapshot")
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    statuses: _containers.RepeatedScalarFieldContainer[AgentStatus]
    include_snapshot: bool
    def __init__(self, since_revision: _Optional[int] = ..., agent_ids: _Optional[_Iterable[str]] = ..., statuses: _Optional[_Iterable[_Union[AgentStatus, str]]] = ..., include_snapshot: bool = ...) -> None: ...

class WatchTransitionsResponse(_message.Message):
    __slots__ = ("snapshot_agent", "snapshot_complete", "transition", "progress")
    SNAPSHOT_AGENT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    snapshot_agent: Agent
    snapshot_complete: SnapshotComplete
    transition: Transition
    progress: Progress
    def __init__(self, snapshot_agent: _Optional[_Union[Agent, _Mapping]] = ..., snapshot_complete: _Optional[_Union[SnapshotComplete, _Mapping]] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class SnapshotComplete(_message.Message):
    __slots__ = ("revision", "agent_count")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    agent_count: int
    def __init__(self, revision: _Optional[int] = ..., agent_count: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class ListTransitionsRequest(_message.Message):
    __slots__ = ("agent_id", "after_revision", "page_size", "page_token")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    after_revision: int
    page_size: int
    page_token: str
    def __init__(self, agent_id: _Optional[str] = ..., after_revision: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTransitionsResponse(_message.Message):
    __slots__ = ("transitions", "next_page_token", "oldest_revision", "head_revision")
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OLDEST_REVISION_FIELD_NUMBER: _ClassVar[int]
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    next_page_token: str
    oldest_revision: int
    head_revision: int
    def __init__(self, transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., oldest_revision: _Optional[int] = ..., head_revision: _Optional[int] = ...) -> None: ...

class ExplainRecoveryRequest(_message.Message):
    __slots__ = ("reason", "headers", "message", "time_zone", "agent_id", "recovery_at", "window")
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_AT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    reason: ExhaustionReason
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    message: str
    time_zone: str
    agent_id: str
    recovery_at: _timestamp_pb2.Timestamp
    window: QuotaWindow
    def __init__(self, reason: _Optional[_Union[ExhaustionReason, str]] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., message: _Optional[str] = ..., time_zone: _Optional[str] = ..., agent_id: _Optional[str] = ..., recovery_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[_Union[QuotaWindow, str]] = ...) -> None: ...

class ExplainRecoveryResponse(_message.Message):
    __slots__ = ("recovery_at", "recovery_source", "recovery_hint", "reason", "now", "window", "window_evidence")
    RECOVERY_AT_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_HINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    recovery_at: _timestamp_pb2.Timestamp
    recovery_source: RecoverySource
    recovery_hint: str
    reason: ExhaustionReason
    now: _timestamp_pb2.Timestamp
    window: QuotaWindow
    window_evidence: str
    def __init__(self, recovery_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., recovery_source: _Optional[_Union[RecoverySource, str]] = ..., recovery_hint: _Optional[str] = ..., reason: _Optional[_Union[ExhaustionReason, str]] = ..., now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[_Union[QuotaWindow, str]] = ..., window_evidence: _Optional[str] = ...) -> None: ...
