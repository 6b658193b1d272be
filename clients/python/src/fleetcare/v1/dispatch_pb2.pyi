import datetime

from fleetcare.v1 import agent_status_pb2 as _agent_status_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SelectorOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTOR_OPERATOR_UNSPECIFIED: _ClassVar[SelectorOperator]
    SELECTOR_OPERATOR_IN: _ClassVar[SelectorOperator]
    SELECTOR_OPERATOR_NOT_IN: _ClassVar[SelectorOperator]
    SELECTOR_OPERATOR_EXISTS: _ClassVar[SelectorOperator]
    SELECTOR_OPERATOR_DOES_NOT_EXIST: _ClassVar[SelectorOperator]
SELECTOR_OPERATOR_UNSPECIFIED: SelectorOperator
SELECTOR_OPERATOR_IN: SelectorOperator
SELECTOR_OPERATOR_NOT_IN: SelectorOperator
SELECTOR_OPERATOR_EXISTS: SelectorOperator
SELECTOR_OPERATOR_DOES_NOT_EXIST: SelectorOperator

class LabelSelector(_message.Message):
    __slots__ = ("match_labels", "match_expressions")
    class MatchLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MATCH_LABELS_FIELD_NUMBER: _ClassVar[int]
    MATCH_EXPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    match_labels: _containers.ScalarMap[str, str]
    match_expressions: _containers.RepeatedCompositeFieldContainer[LabelSelectorRequirement]
    def __init__(self, match_labels: _Optional[_Mapping[str, str]] = ..., match_expressions: _Optional[_Iterable[_Union[LabelSelectorRequirement, _Mapping]]] = ...) -> None: ...

class LabelSelectorRequirement(_message.Message):
    __slots__ = ("key", "operator", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    operator: SelectorOperator
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., operator: _Optional[_Union[SelectorOperator, str]] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class ClaimAgentRequest(_message.Message):
    __slots__ = ("selector", "slot_type", "lease_duration", "wait_timeout", "request_id")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SLOT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    selector: LabelSelector
    slot_type: _agent_status_pb2.SlotType
    lease_duration: _duration_pb2.Duration
    wait_timeout: _duration_pb2.Duration
    request_id: str
    def __init__(self, selector: _Optional[_Union[LabelSelector, _Mapping]] = ..., slot_type: _Optional[_Union[_agent_status_pb2.SlotType, str]] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., wait_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClaimAgentResponse(_message.Message):
    __slots__ = ("claim", "agent", "transition")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    claim: _agent_status_pb2.Claim
    agent: _agent_status_pb2.Agent
    transition: _agent_status_pb2.Transition
    def __init__(self, claim: _Optional[_Union[_agent_status_pb2.Claim, _Mapping]] = ..., agent: _Optional[_Union[_agent_status_pb2.Agent, _Mapping]] = ..., transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...

class RenewClaimRequest(_message.Message):
    __slots__ = ("claim_id", "fencing_token", "lease_duration")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    fencing_token: int
    lease_duration: _duration_pb2.Duration
    def __init__(self, claim_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewClaimResponse(_message.Message):
    __slots__ = ("claim",)
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    claim: _agent_status_pb2.Claim
    def __init__(self, claim: _Optional[_Union[_agent_status_pb2.Claim, _Mapping]] = ...) -> None: ...

class ReleaseClaimRequest(_message.Message):
    __slots__ = ("claim_id", "fencing_token")
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    claim_id: str
    fencing_token: int
    def __init__(self, claim_id: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class ReleaseClaimResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_status_pb2.Agent
    transition: _agent_status_pb2.Transition
    def __init__(self, agent: _Optional[_Union[_agent_status_pb2.Agent, _Mapping]] = ..., transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...

class ListClaimsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "holder")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    holder: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class ListClaimsResponse(_message.Message):
    __slots__ = ("claims", "next_page_token")
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    claims: _containers.RepeatedCompositeFieldContainer[_agent_status_pb2.Claim]
    next_page_token: str
    def __init__(self, claims: _Optional[_Iterable[_Union[_agent_status_pb2.Claim, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class DeleteAgentResponse(_message.Message):
    __slots__ = ("transition",)
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    transition: _agent_status_pb2.Transition
    def __init__(self, transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...

class ResumeAgentRequest(_message.Message):
    __slots__ = ("agent_id", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeAgentResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_status_pb2.Agent
    transition: _agent_status_pb2.Transition
    def __init__(self, agent: _Optional[_Union[_agent_status_pb2.Agent, _Mapping]] = ..., transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...

class CordonAgentRequest(_message.Message):
    __slots__ = ("agent_id", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CordonAgentResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_status_pb2.Agent
    transition: _agent_status_pb2.Transition
    def __init__(self, agent: _Optional[_Union[_agent_status_pb2.Agent, _Mapping]] = ..., transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...

class UncordonAgentRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class UncordonAgentResponse(_message.Message):
    __slots__ = ("agent", "transition")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    agent: _agent_status_pb2.Agent
    transition: _agent_status_pb2.Transition
    def __init__(self, agent: _Optional[_Union[_agent_status_pb2.Agent, _Mapping]] = ..., transition: _Optional[_Union[_agent_status_pb2.Transition, _Mapping]] = ...) -> None: ...
