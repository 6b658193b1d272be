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

class ErrorType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_TYPE_UNSPECIFIED: _ClassVar[ErrorType]
    ERROR_TYPE_EXECUTION_FAILURE: _ClassVar[ErrorType]
    ERROR_TYPE_RESOURCE_EXHAUSTION: _ClassVar[ErrorType]
    ERROR_TYPE_GOAL_CONFLICT: _ClassVar[ErrorType]
    ERROR_TYPE_COMMUNICATION_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_PERFORMANCE_DEGRADATION: _ClassVar[ErrorType]
    ERROR_TYPE_SAFETY_VIOLATION: _ClassVar[ErrorType]
    ERROR_TYPE_DEPENDENCY_FAILURE: _ClassVar[ErrorType]
    ERROR_TYPE_CONFIGURATION_ERROR: _ClassVar[ErrorType]
    ERROR_TYPE_LEARNING_FAILURE: _ClassVar[ErrorType]
    ERROR_TYPE_UNKNOWN: _ClassVar[ErrorType]

class RecoveryStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVERY_STRATEGY_UNSPECIFIED: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_RETRY: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_ROLLBACK: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_RECONFIGURE: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_RESTART: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_ISOLATE: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_ESCALATE: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_COMPENSATE: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_DEGRADE_GRACEFULLY: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_WAIT_AND_RETRY: _ClassVar[RecoveryStrategy]
    RECOVERY_STRATEGY_ALTERNATIVE_PATH: _ClassVar[RecoveryStrategy]

class RecoveryStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVERY_STATUS_UNSPECIFIED: _ClassVar[RecoveryStatus]
    RECOVERY_STATUS_ACTIVE: _ClassVar[RecoveryStatus]
    RECOVERY_STATUS_SUCCEEDED: _ClassVar[RecoveryStatus]
    RECOVERY_STATUS_FAILED: _ClassVar[RecoveryStatus]
    RECOVERY_STATUS_EXPIRED: _ClassVar[RecoveryStatus]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]

class HealingVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALING_VERDICT_UNSPECIFIED: _ClassVar[HealingVerdict]
    HEALING_VERDICT_PLANNED: _ClassVar[HealingVerdict]
    HEALING_VERDICT_DRY_RUN: _ClassVar[HealingVerdict]
    HEALING_VERDICT_BRAKED: _ClassVar[HealingVerdict]

class PostActionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POST_ACTION_TYPE_UNSPECIFIED: _ClassVar[PostActionType]
    POST_ACTION_TYPE_COMMENT: _ClassVar[PostActionType]
    POST_ACTION_TYPE_EDIT: _ClassVar[PostActionType]
    POST_ACTION_TYPE_THREAD: _ClassVar[PostActionType]

class PostActionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POST_ACTION_STATUS_UNSPECIFIED: _ClassVar[PostActionStatus]
    POST_ACTION_STATUS_RUNNING: _ClassVar[PostActionStatus]
    POST_ACTION_STATUS_SUCCEEDED: _ClassVar[PostActionStatus]
    POST_ACTION_STATUS_FAILED: _ClassVar[PostActionStatus]

class IneligibleReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INELIGIBLE_REASON_UNSPECIFIED: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_INSUFFICIENT_SAMPLES: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_DUPLICATE_ACTION: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_WINDOW_FREQUENCY_EXCEEDED: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_ACTION_COOLDOWN_ACTIVE: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_LOW_EXPOSURE: _ClassVar[IneligibleReason]
    INELIGIBLE_REASON_HEALTHY: _ClassVar[IneligibleReason]
ERROR_TYPE_UNSPECIFIED: ErrorType
ERROR_TYPE_EXECUTION_FAILURE: ErrorType
ERROR_TYPE_RESOURCE_EXHAUSTION: ErrorType
ERROR_TYPE_GOAL_CONFLICT: ErrorType
ERROR_TYPE_COMMUNICATION_ERROR: ErrorType
ERROR_TYPE_PERFORMANCE_DEGRADATION: ErrorType
ERROR_TYPE_SAFETY_VIOLATION: ErrorType
ERROR_TYPE_DEPENDENCY_FAILURE: ErrorType
ERROR_TYPE_CONFIGURATION_ERROR: ErrorType
ERROR_TYPE_LEARNING_FAILURE: ErrorType
ERROR_TYPE_UNKNOWN: ErrorType
RECOVERY_STRATEGY_UNSPECIFIED: RecoveryStrategy
RECOVERY_STRATEGY_RETRY: RecoveryStrategy
RECOVERY_STRATEGY_ROLLBACK: RecoveryStrategy
RECOVERY_STRATEGY_RECONFIGURE: RecoveryStrategy
RECOVERY_STRATEGY_RESTART: RecoveryStrategy
RECOVERY_STRATEGY_ISOLATE: RecoveryStrategy
RECOVERY_STRATEGY_ESCALATE: RecoveryStrategy
RECOVERY_STRATEGY_COMPENSATE: RecoveryStrategy
RECOVERY_STRATEGY_DEGRADE_GRACEFULLY: RecoveryStrategy
RECOVERY_STRATEGY_WAIT_AND_RETRY: RecoveryStrategy
RECOVERY_STRATEGY_ALTERNATIVE_PATH: RecoveryStrategy
RECOVERY_STATUS_UNSPECIFIED: RecoveryStatus
RECOVERY_STATUS_ACTIVE: RecoveryStatus
RECOVERY_STATUS_SUCCEEDED: RecoveryStatus
RECOVERY_STATUS_FAILED: RecoveryStatus
RECOVERY_STATUS_EXPIRED: RecoveryStatus
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
HEALING_VERDICT_UNSPECIFIED: HealingVerdict
HEALING_VERDICT_PLANNED: HealingVerdict
HEALING_VERDICT_DRY_RUN: HealingVerdict
HEALING_VERDICT_BRAKED: HealingVerdict
POST_ACTION_TYPE_UNSPECIFIED: PostActionType
POST_ACTION_TYPE_COMMENT: PostActionType
POST_ACTION_TYPE_EDIT: PostActionType
POST_ACTION_TYPE_THREAD: PostActionType
POST_ACTION_STATUS_UNSPECIFIED: PostActionStatus
POST_ACTION_STATUS_RUNNING: PostActionStatus
POST_ACTION_STATUS_SUCCEEDED: PostActionStatus
POST_ACTION_STATUS_FAILED: PostActionStatus
INELIGIBLE_REASON_UNSPECIFIED: IneligibleReason
INELIGIBLE_REASON_INSUFFICIENT_SAMPLES: IneligibleReason
INELIGIBLE_REASON_DUPLICATE_ACTION: IneligibleReason
INELIGIBLE_REASON_WINDOW_FREQUENCY_EXCEEDED: IneligibleReason
INELIGIBLE_REASON_ACTION_COOLDOWN_ACTIVE: IneligibleReason
INELIGIBLE_REASON_LOW_EXPOSURE: IneligibleReason
INELIGIBLE_REASON_HEALTHY: IneligibleReason

class ErrorEvent(_message.Message):
    __slots__ = ("id", "agent_id", "message", "context", "error_type", "severity", "critical", "recurring", "occurred_at", "actor", "recovery_action_id", "recovery_status")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    RECURRING_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_STATUS_FIELD_NUMBER: _ClassVar[int]
    id: int
    agent_id: str
    message: str
    context: _containers.ScalarMap[str, str]
    error_type: ErrorType
    severity: float
    critical: bool
    recurring: bool
    occurred_at: _timestamp_pb2.Timestamp
    actor: str
    recovery_action_id: int
    recovery_status: RecoveryStatus
    def __init__(self, id: _Optional[int] = ..., agent_id: _Optional[str] = ..., message: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., error_type: _Optional[_Union[ErrorType, str]] = ..., severity: _Optional[float] = ..., critical: bool = ..., recurring: bool = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., recovery_action_id: _Optional[int] = ..., recovery_status: _Optional[_Union[RecoveryStatus, str]] = ...) -> None: ...

class RecoveryAction(_message.Message):
    __slots__ = ("id", "error_event_id", "agent_id", "error_type", "strategy", "chosen_strategy", "parameters", "estimated_duration", "success_probability", "risk_score", "escalated", "reason", "status", "created_at", "lease_expires_at", "completed_at", "duration", "details", "context_signature", "actor", "outcome_actor")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_DURATION_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    RISK_SCORE_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    error_event_id: int
    agent_id: str
    error_type: ErrorType
    strategy: RecoveryStrategy
    chosen_strategy: RecoveryStrategy
    parameters: _containers.ScalarMap[str, str]
    estimated_duration: _duration_pb2.Duration
    success_probability: float
    risk_score: float
    escalated: bool
    reason: str
    status: RecoveryStatus
    created_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    duration: _duration_pb2.Duration
    details: str
    context_signature: str
    actor: str
    outcome_actor: str
    def __init__(self, id: _Optional[int] = ..., error_event_id: _Optional[int] = ..., agent_id: _Optional[str] = ..., error_type: _Optional[_Union[ErrorType, str]] = ..., strategy: _Optional[_Union[RecoveryStrategy, str]] = ..., chosen_strategy: _Optional[_Union[RecoveryStrategy, str]] = ..., parameters: _Optional[_Mapping[str, str]] = ..., estimated_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., success_probability: _Optional[float] = ..., risk_score: _Optional[float] = ..., escalated: bool = ..., reason: _Optional[str] = ..., status: _Optional[_Union[RecoveryStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., details: _Optional[str] = ..., context_signature: _Optional[str] = ..., actor: _Optional[str] = ..., outcome_actor: _Optional[str] = ...) -> None: ...

class ReportErrorRequest(_message.Message):
    __slots__ = ("agent_id", "message", "context", "error_type_hint")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_HINT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    message: str
    context: _containers.ScalarMap[str, str]
    error_type_hint: ErrorType
    def __init__(self, agent_id: _Optional[str] = ..., message: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., error_type_hint: _Optional[_Union[ErrorType, str]] = ...) -> None: ...

class ReportErrorResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: ErrorEvent
    def __init__(self, event: _Optional[_Union[ErrorEvent, _Mapping]] = ...) -> None: ...

class PlanRecoveryRequest(_message.Message):
    __slots__ = ("error_event_id",)
    ERROR_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    error_event_id: int
    def __init__(self, error_event_id: _Optional[int] = ...) -> None: ...

class PlanRecoveryResponse(_message.Message):
    __slots__ = ("action",)
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: RecoveryAction
    def __init__(self, action: _Optional[_Union[RecoveryAction, _Mapping]] = ...) -> None: ...

class ReportRecoveryOutcomeRequest(_message.Message):
    __slots__ = ("action_id", "success", "duration", "details")
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    action_id: int
    success: bool
    duration: _duration_pb2.Duration
    details: str
    def __init__(self, action_id: _Optional[int] = ..., success: bool = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., details: _Optional[str] = ...) -> None: ...

class ReportRecoveryOutcomeResponse(_message.Message):
    __slots__ = ("action",)
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: RecoveryAction
    def __init__(self, action: _Optional[_Union[RecoveryAction, _Mapping]] = ...) -> None: ...

class GetHealingStatisticsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ErrorTypeCount(_message.Message):
    __slots__ = ("error_type", "count")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    error_type: ErrorType
    count: int
    def __init__(self, error_type: _Optional[_Union[ErrorType, str]] = ..., count: _Optional[int] = ...) -> None: ...

class PatternStatistics(_message.Message):
    __slots__ = ("error_type", "context_signature", "strategy", "successes", "failures", "success_rate", "mean_recovery_time", "use_count")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_RECOVERY_TIME_FIELD_NUMBER: _ClassVar[int]
    USE_COUNT_FIELD_NUMBER: _ClassVar[int]
    error_type: ErrorType
    context_signature: str
    strategy: RecoveryStrategy
    successes: int
    failures: int
    success_rate: float
    mean_recovery_time: _duration_pb2.Duration
    use_count: int
    def __init__(self, error_type: _Optional[_Union[ErrorType, str]] = ..., context_signature: _Optional[str] = ..., strategy: _Optional[_Union[RecoveryStrategy, str]] = ..., successes: _Optional[int] = ..., failures: _Optional[int] = ..., success_rate: _Optional[float] = ..., mean_recovery_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., use_count: _Optional[int] = ...) -> None: ...

class GetHealingStatisticsResponse(_message.Message):
    __slots__ = ("total_errors", "errors_last_hour", "errors_by_type", "active_recoveries", "patterns", "overall_success_rate")
    TOTAL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_LAST_HOUR_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    OVERALL_SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    total_errors: int
    errors_last_hour: int
    errors_by_type: _containers.RepeatedCompositeFieldContainer[ErrorTypeCount]
    active_recoveries: int
    patterns: _containers.RepeatedCompositeFieldContainer[PatternStatistics]
    overall_success_rate: float
    def __init__(self, total_errors: _Optional[int] = ..., errors_last_hour: _Optional[int] = ..., errors_by_type: _Optional[_Iterable[_Union[ErrorTypeCount, _Mapping]]] = ..., active_recoveries: _Optional[int] = ..., patterns: _Optional[_Iterable[_Union[PatternStatistics, _Mapping]]] = ..., overall_success_rate: _Optional[float] = ...) -> None: ...

class ListErrorEventsRequest(_message.Message):
    __slots__ = ("agent_id", "error_type", "page_size", "page_token")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    error_type: ErrorType
    page_size: int
    page_token: str
    def __init__(self, agent_id: _Optional[str] = ..., error_type: _Optional[_Union[ErrorType, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListErrorEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[ErrorEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[ErrorEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListRecoveryActionsRequest(_message.Message):
    __slots__ = ("agent_id", "error_type", "status", "page_size", "page_token", "error_event_id")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    error_type: ErrorType
    status: RecoveryStatus
    page_size: int
    page_token: str
    error_event_id: int
    def __init__(self, agent_id: _Optional[str] = ..., error_type: _Optional[_Union[ErrorType, str]] = ..., status: _Optional[_Union[RecoveryStatus, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., error_event_id: _Optional[int] = ...) -> None: ...

class ListRecoveryActionsResponse(_message.Message):
    __slots__ = ("actions", "next_page_token")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[RecoveryAction]
    next_page_token: str
    def __init__(self, actions: _Optional[_Iterable[_Union[RecoveryAction, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class HealingPolicy(_message.Message):
    __slots__ = ("max_unhealthy_percent", "min_unhealthy", "group_by", "max_plans_per_minute", "max_group_plans_per_minute", "retry_budget", "retry_window", "min_healthy_period", "breaker_failures", "breaker_cooldown", "dry_run", "brakes")
    MAX_UNHEALTHY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MIN_UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    MAX_PLANS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUP_PLANS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    RETRY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_HEALTHY_PERIOD_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BRAKES_FIELD_NUMBER: _ClassVar[int]
    max_unhealthy_percent: int
    min_unhealthy: int
    group_by: str
    max_plans_per_minute: int
    max_group_plans_per_minute: int
    retry_budget: int
    retry_window: _duration_pb2.Duration
    min_healthy_period: _duration_pb2.Duration
    breaker_failures: int
    breaker_cooldown: _duration_pb2.Duration
    dry_run: bool
    brakes: bool
    def __init__(self, max_unhealthy_percent: _Optional[int] = ..., min_unhealthy: _Optional[int] = ..., group_by: _Optional[str] = ..., max_plans_per_minute: _Optional[int] = ..., max_group_plans_per_minute: _Optional[int] = ..., retry_budget: _Optional[int] = ..., retry_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., min_healthy_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., breaker_failures: _Optional[int] = ..., breaker_cooldown: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dry_run: bool = ..., brakes: bool = ...) -> None: ...

class HealingPause(_message.Message):
    __slots__ = ("group", "reason", "paused_by", "paused_at")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_BY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_AT_FIELD_NUMBER: _ClassVar[int]
    group: str
    reason: str
    paused_by: str
    paused_at: _timestamp_pb2.Timestamp
    def __init__(self, group: _Optional[str] = ..., reason: _Optional[str] = ..., paused_by: _Optional[str] = ..., paused_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HealingBreaker(_message.Message):
    __slots__ = ("error_type", "strategy", "state", "since", "retry_at")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AT_FIELD_NUMBER: _ClassVar[int]
    error_type: ErrorType
    strategy: RecoveryStrategy
    state: BreakerState
    since: _timestamp_pb2.Timestamp
    retry_at: _timestamp_pb2.Timestamp
    def __init__(self, error_type: _Optional[_Union[ErrorType, str]] = ..., strategy: _Optional[_Union[RecoveryStrategy, str]] = ..., state: _Optional[_Union[BreakerState, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retry_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HealingShare(_message.Message):
    __slots__ = ("group", "counted", "unhealthy", "allowed")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    group: str
    counted: int
    unhealthy: int
    allowed: int
    def __init__(self, group: _Optional[str] = ..., counted: _Optional[int] = ..., unhealthy: _Optional[int] = ..., allowed: _Optional[int] = ...) -> None: ...

class SpentBudget(_message.Message):
    __slots__ = ("agent_id", "plans")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    plans: int
    def __init__(self, agent_id: _Optional[str] = ..., plans: _Optional[int] = ...) -> None: ...

class GetHealingPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetHealingPolicyResponse(_message.Message):
    __slots__ = ("policy", "pauses", "open_breakers", "shares", "spent_budgets", "as_of")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    OPEN_BREAKERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SPENT_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    policy: HealingPolicy
    pauses: _containers.RepeatedCompositeFieldContainer[HealingPause]
    open_breakers: _containers.RepeatedCompositeFieldContainer[HealingBreaker]
    shares: _containers.RepeatedCompositeFieldContainer[HealingShare]
    spent_budgets: _containers.RepeatedCompositeFieldContainer[SpentBudget]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, policy: _Optional[_Union[HealingPolicy, _Mapping]] = ..., pauses: _Optional[_Iterable[_Union[HealingPause, _Mapping]]] = ..., open_breakers: _Optional[_Iterable[_Union[HealingBreaker, _Mapping]]] = ..., shares: _Optional[_Iterable[_Union[HealingShare, _Mapping]]] = ..., spent_budgets: _Optional[_Iterable[_Union[SpentBudget, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PauseHealingRequest(_message.Message):
    __slots__ = ("group", "reason")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group: str
    reason: str
    def __init__(self, group: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseHealingResponse(_message.Message):
    __slots__ = ("pause",)
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    pause: HealingPause
    def __init__(self, pause: _Optional[_Union[HealingPause, _Mapping]] = ...) -> None: ...

class ResumeHealingRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class ResumeHealingResponse(_message.Message):
    __slots__ = ("resumed",)
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    resumed: bool
    def __init__(self, resumed: bool = ...) -> None: ...

class HealingDecision(_message.Message):
    __slots__ = ("id", "error_event_id", "agent_id", "decided_at", "verdict", "reason", "message", "strategy", "recovery_action_id", "fleet", "group", "fleet_plans_last_minute", "group_plans_last_minute", "agent_plans_in_window", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FLEET_PLANS_LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    GROUP_PLANS_LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    AGENT_PLANS_IN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    error_event_id: int
    agent_id: str
    decided_at: _timestamp_pb2.Timestamp
    verdict: HealingVerdict
    reason: str
    message: str
    strategy: RecoveryStrategy
    recovery_action_id: int
    fleet: HealingShare
    group: HealingShare
    fleet_plans_last_minute: int
    group_plans_last_minute: int
    agent_plans_in_window: int
    actor: str
    def __init__(self, id: _Optional[int] = ..., error_event_id: _Optional[int] = ..., agent_id: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., verdict: _Optional[_Union[HealingVerdict, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., strategy: _Optional[_Union[RecoveryStrategy, str]] = ..., recovery_action_id: _Optional[int] = ..., fleet: _Optional[_Union[HealingShare, _Mapping]] = ..., group: _Optional[_Union[HealingShare, _Mapping]] = ..., fleet_plans_last_minute: _Optional[int] = ..., group_plans_last_minute: _Optional[int] = ..., agent_plans_in_window: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class ListHealingDecisionsRequest(_message.Message):
    __slots__ = ("agent_id", "error_event_id", "verdict", "page_size", "page_token")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    error_event_id: int
    verdict: HealingVerdict
    page_size: int
    page_token: str
    def __init__(self, agent_id: _Optional[str] = ..., error_event_id: _Optional[int] = ..., verdict: _Optional[_Union[HealingVerdict, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListHealingDecisionsResponse(_message.Message):
    __slots__ = ("decisions", "next_page_token")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[HealingDecision]
    next_page_token: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[HealingDecision, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("observed_at", "impressions", "engagements")
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ENGAGEMENTS_FIELD_NUMBER: _ClassVar[int]
    observed_at: _timestamp_pb2.Timestamp
    impressions: int
    engagements: int
    def __init__(self, observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., impressions: _Optional[int] = ..., engagements: _Optional[int] = ...) -> None: ...

class PostAction(_message.Message):
    __slots__ = ("idempotency_key", "post_id", "action_type", "tier", "status", "outcome_json", "error_code", "attempts", "created_at", "updated_at", "lease_expires_at", "actor", "outcome_actor")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_ACTOR_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    post_id: str
    action_type: PostActionType
    tier: int
    status: PostActionStatus
    outcome_json: str
    error_code: str
    attempts: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    actor: str
    outcome_actor: str
    def __init__(self, idempotency_key: _Optional[str] = ..., post_id: _Optional[str] = ..., action_type: _Optional[_Union[PostActionType, str]] = ..., tier: _Optional[int] = ..., status: _Optional[_Union[PostActionStatus, str]] = ..., outcome_json: _Optional[str] = ..., error_code: _Optional[str] = ..., attempts: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., outcome_actor: _Optional[str] = ...) -> None: ...

class EvaluatePostRequest(_message.Message):
    __slots__ = ("post_id", "points", "now", "claim")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    post_id: str
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    now: _timestamp_pb2.Timestamp
    claim: bool
    def __init__(self, post_id: _Optional[str] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., claim: bool = ...) -> None: ...

class EvaluatePostResponse(_message.Message):
    __slots__ = ("eligible", "ineligible_reason", "reason", "stagnation_score", "engagement_rate", "tier", "action_type", "idempotency_key", "claimed", "action", "sample_count", "impressions_gained")
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    INELIGIBLE_REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STAGNATION_SCORE_FIELD_NUMBER: _ClassVar[int]
    ENGAGEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_GAINED_FIELD_NUMBER: _ClassVar[int]
    eligible: bool
    ineligible_reason: IneligibleReason
    reason: str
    stagnation_score: float
    engagement_rate: float
    tier: int
    action_type: PostActionType
    idempotency_key: str
    claimed: bool
    action: PostAction
    sample_count: int
    impressions_gained: int
    def __init__(self, eligible: bool = ..., ineligible_reason: _Optional[_Union[IneligibleReason, str]] = ..., reason: _Optional[str] = ..., stagnation_score: _Optional[float] = ..., engagement_rate: _Optional[float] = ..., tier: _Optional[int] = ..., action_type: _Optional[_Union[PostActionType, str]] = ..., idempotency_key: _Optional[str] = ..., claimed: bool = ..., action: _Optional[_Union[PostAction, _Mapping]] = ..., sample_count: _Optional[int] = ..., impressions_gained: _Optional[int] = ...) -> None: ...

class RecordActionOutcomeRequest(_message.Message):
    __slots__ = ("idempotency_key", "status", "outcome_json", "error_code", "post_id", "action_type", "tier")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    status: PostActionStatus
    outcome_json: str
    error_code: str
    post_id: str
    action_type: PostActionType
    tier: int
    def __init__(self, idempotency_key: _Optional[str] = ..., status: _Optional[_Union[PostActionStatus, str]] = ..., outcome_json: _Optional[str] = ..., error_code: _Optional[str] = ..., post_id: _Optional[str] = ..., action_type: _Optional[_Union[PostActionType, str]] = ..., tier: _Optional[int] = ...) -> None: ...

class RecordActionOutcomeResponse(_message.Message):
    __slots__ = ("action", "created")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    action: PostAction
    created: bool
    def __init__(self, action: _Optional[_Union[PostAction, _Mapping]] = ..., created: bool = ...) -> None: ...

class ShouldRetryRequest(_message.Message):
    __slots__ = ("idempotency_key",)
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    def __init__(self, idempotency_key: _Optional[str] = ...) -> None: ...

class ShouldRetryResponse(_message.Message):
    __slots__ = ("retry", "reason", "not_before", "attempts")
    RETRY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    retry: bool
    reason: str
    not_before: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, retry: bool = ..., reason: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class ListActionsRequest(_message.Message):
    __slots__ = ("post_id", "page_size", "page_token")
    POST_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    post_id: str
    page_size: int
    page_token: str
    def __init__(self, post_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListActionsResponse(_message.Message):
    __slots__ = ("actions", "next_page_token")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[PostAction]
    next_page_token: str
    def __init__(self, actions: _Optional[_Iterable[_Union[PostAction, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
