from fleetcare.v1 import agent_status_pb2 as _agent_status_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
