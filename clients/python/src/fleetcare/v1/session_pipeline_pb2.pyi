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

class SessionStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATUS_UNSPECIFIED: _ClassVar[SessionStatus]
    SESSION_STATUS_PROCESSED: _ClassVar[SessionStatus]
    SESSION_STATUS_FAILED: _ClassVar[SessionStatus]
    SESSION_STATUS_DEAD: _ClassVar[SessionStatus]

class UsageGrouping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_GROUPING_UNSPECIFIED: _ClassVar[UsageGrouping]
    USAGE_GROUPING_DAY: _ClassVar[UsageGrouping]
    USAGE_GROUPING_SESSION: _ClassVar[UsageGrouping]
    USAGE_GROUPING_MODEL: _ClassVar[UsageGrouping]
    USAGE_GROUPING_USER: _ClassVar[UsageGrouping]

class RunTrigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_TRIGGER_UNSPECIFIED: _ClassVar[RunTrigger]
    RUN_TRIGGER_SCHEDULER: _ClassVar[RunTrigger]
    RUN_TRIGGER_CALL: _ClassVar[RunTrigger]
SESSION_STATUS_UNSPECIFIED: SessionStatus
SESSION_STATUS_PROCESSED: SessionStatus
SESSION_STATUS_FAILED: SessionStatus
SESSION_STATUS_DEAD: SessionStatus
USAGE_GROUPING_UNSPECIFIED: UsageGrouping
USAGE_GROUPING_DAY: UsageGrouping
USAGE_GROUPING_SESSION: UsageGrouping
USAGE_GROUPING_MODEL: UsageGrouping
USAGE_GROUPING_USER: UsageGrouping
RUN_TRIGGER_UNSPECIFIED: RunTrigger
RUN_TRIGGER_SCHEDULER: RunTrigger
RUN_TRIGGER_CALL: RunTrigger

class RunStats(_message.Message):
    __slots__ = ("scanned", "processed", "skipped", "failed", "dead", "items_extracted", "files_hashed", "bytes_hashed", "errors", "started_at", "finished_at", "skipped_entries", "root_error", "lines_skipped")
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_EXTRACTED_FIELD_NUMBER: _ClassVar[int]
    FILES_HASHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_HASHED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ROOT_ERROR_FIELD_NUMBER: _ClassVar[int]
    LINES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    scanned: int
    processed: int
    skipped: int
    failed: int
    dead: int
    items_extracted: int
    files_hashed: int
    bytes_hashed: int
    errors: _containers.RepeatedCompositeFieldContainer[SessionError]
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    skipped_entries: _containers.RepeatedScalarFieldContainer[str]
    root_error: str
    lines_skipped: int
    def __init__(self, scanned: _Optional[int] = ..., processed: _Optional[int] = ..., skipped: _Optional[int] = ..., failed: _Optional[int] = ..., dead: _Optional[int] = ..., items_extracted: _Optional[int] = ..., files_hashed: _Optional[int] = ..., bytes_hashed: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[SessionError, _Mapping]]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., skipped_entries: _Optional[_Iterable[str]] = ..., root_error: _Optional[str] = ..., lines_skipped: _Optional[int] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("session", "error")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session: str
    error: str
    def __init__(self, session: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ProcessorInfo(_message.Message):
    __slots__ = ("name", "interval", "running", "last_run_at", "last_run", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    interval: _duration_pb2.Duration
    running: bool
    last_run_at: _timestamp_pb2.Timestamp
    last_run: RunStats
    version: int
    def __init__(self, name: _Optional[str] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., running: bool = ..., last_run_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_run: _Optional[_Union[RunStats, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ListProcessorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProcessorsResponse(_message.Message):
    __slots__ = ("processors",)
    PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    processors: _containers.RepeatedCompositeFieldContainer[ProcessorInfo]
    def __init__(self, processors: _Optional[_Iterable[_Union[ProcessorInfo, _Mapping]]] = ...) -> None: ...

class RunProcessorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RunProcessorResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: RunStats
    def __init__(self, stats: _Optional[_Union[RunStats, _Mapping]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("name", "files_total", "files_done", "bytes_hashed", "finished", "stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_HASHED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    files_total: int
    files_done: int
    bytes_hashed: int
    finished: bool
    stats: RunStats
    def __init__(self, name: _Optional[str] = ..., files_total: _Optional[int] = ..., files_done: _Optional[int] = ..., bytes_hashed: _Optional[int] = ..., finished: bool = ..., stats: _Optional[_Union[RunStats, _Mapping]] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("processor", "session", "user", "size", "mtime", "sha256", "processed_at", "items_count", "attempts", "last_error", "status", "next_attempt_at")
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_AT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_COUNT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    processor: str
    session: str
    user: str
    size: int
    mtime: _timestamp_pb2.Timestamp
    sha256: str
    processed_at: _timestamp_pb2.Timestamp
    items_count: int
    attempts: int
    last_error: str
    status: SessionStatus
    next_attempt_at: _timestamp_pb2.Timestamp
    def __init__(self, processor: _Optional[str] = ..., session: _Optional[str] = ..., user: _Optional[str] = ..., size: _Optional[int] = ..., mtime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sha256: _Optional[str] = ..., processed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., items_count: _Optional[int] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSessionStatesRequest(_message.Message):
    __slots__ = ("processor", "status", "user", "page_size", "page_token")
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    processor: str
    status: SessionStatus
    user: str
    page_size: int
    page_token: str
    def __init__(self, processor: _Optional[str] = ..., status: _Optional[_Union[SessionStatus, str]] = ..., user: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionStatesResponse(_message.Message):
    __slots__ = ("states", "next_page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[SessionState]
    next_page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[SessionState, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RetrySessionRequest(_message.Message):
    __slots__ = ("processor", "session")
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    processor: str
    session: str
    def __init__(self, processor: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class RetrySessionResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: SessionState
    def __init__(self, state: _Optional[_Union[SessionState, _Mapping]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("group_by", "since", "until", "user")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    group_by: UsageGrouping
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    user: str
    def __init__(self, group_by: _Optional[_Union[UsageGrouping, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key", "input_tokens", "output_tokens", "cache_creation_tokens", "cache_read_tokens", "total_tokens", "messages", "first_at", "last_at", "models")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CREATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_AT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    key: str
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    total_tokens: int
    messages: int
    first_at: _timestamp_pb2.Timestamp
    last_at: _timestamp_pb2.Timestamp
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_creation_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., messages: _Optional[int] = ..., first_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "totals")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    totals: UsageRow
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., totals: _Optional[_Union[UsageRow, _Mapping]] = ...) -> None: ...

class PipelineRun(_message.Message):
    __slots__ = ("id", "processor", "trigger", "actor", "started_at", "finished_at", "stats")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    id: int
    processor: str
    trigger: RunTrigger
    actor: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    stats: RunStats
    def __init__(self, id: _Optional[int] = ..., processor: _Optional[str] = ..., trigger: _Optional[_Union[RunTrigger, str]] = ..., actor: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stats: _Optional[_Union[RunStats, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("processor", "page_size", "page_token")
    PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    processor: str
    page_size: int
    page_token: str
    def __init__(self, processor: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[PipelineRun]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[PipelineRun, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
