import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from shoal.proto import types_pb2 as _types_pb2
from shoal.proto import objects_pb2 as _objects_pb2
from shoal.proto import logs_pb2 as _logs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionRequest(_message.Message):
    __slots__ = ("description", "session_id")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    description: _types_pb2.NodeDescription
    session_id: str
    def __init__(self, description: _Optional[_Union[_types_pb2.NodeDescription, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class WeightedPeer(_message.Message):
    __slots__ = ("node_id", "addr", "weight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    addr: str
    weight: int
    def __init__(self, node_id: _Optional[str] = ..., addr: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class SessionMessage(_message.Message):
    __slots__ = ("session_id", "node", "managers", "network_bootstrap_keys", "heartbeat_period")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MANAGERS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_BOOTSTRAP_KEYS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PERIOD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    node: _objects_pb2.Node
    managers: _containers.RepeatedCompositeFieldContainer[WeightedPeer]
    network_bootstrap_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.EncryptionKey]
    heartbeat_period: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., node: _Optional[_Union[_objects_pb2.Node, _Mapping]] = ..., managers: _Optional[_Iterable[_Union[WeightedPeer, _Mapping]]] = ..., network_bootstrap_keys: _Optional[_Iterable[_Union[_types_pb2.EncryptionKey, _Mapping]]] = ..., heartbeat_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "restarting")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESTARTING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    restarting: bool
    def __init__(self, session_id: _Optional[str] = ..., restarting: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("period",)
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    period: _duration_pb2.Duration
    def __init__(self, period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class TaskStatusUpdate(_message.Message):
    __slots__ = ("task_id", "status")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: _types_pb2.TaskStatus
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.TaskStatus, _Mapping]] = ...) -> None: ...

class UpdateTaskStatusRequest(_message.Message):
    __slots__ = ("session_id", "updates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    updates: _containers.RepeatedCompositeFieldContainer[TaskStatusUpdate]
    def __init__(self, session_id: _Optional[str] = ..., updates: _Optional[_Iterable[_Union[TaskStatusUpdate, _Mapping]]] = ...) -> None: ...

class UpdateTaskStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task", "secret", "config", "network_keys")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NETWORK_KEYS_FIELD_NUMBER: _ClassVar[int]
    task: _objects_pb2.Task
    secret: _objects_pb2.Secret
    config: _objects_pb2.Config
    network_keys: NetworkKeys
    def __init__(self, task: _Optional[_Union[_objects_pb2.Task, _Mapping]] = ..., secret: _Optional[_Union[_objects_pb2.Secret, _Mapping]] = ..., config: _Optional[_Union[_objects_pb2.Config, _Mapping]] = ..., network_keys: _Optional[_Union[NetworkKeys, _Mapping]] = ...) -> None: ...

class NetworkKeys(_message.Message):
    __slots__ = ("network_id", "keys")
    NETWORK_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    network_id: str
    keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.EncryptionKey]
    def __init__(self, network_id: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[_types_pb2.EncryptionKey, _Mapping]]] = ...) -> None: ...

class AssignmentChange(_message.Message):
    __slots__ = ("assignment", "action")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UPDATE: _ClassVar[AssignmentChange.Action]
        REMOVE: _ClassVar[AssignmentChange.Action]
    UPDATE: AssignmentChange.Action
    REMOVE: AssignmentChange.Action
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    action: AssignmentChange.Action
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., action: _Optional[_Union[AssignmentChange.Action, str]] = ...) -> None: ...

class AssignmentsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class AssignmentsMessage(_message.Message):
    __slots__ = ("type", "applies_to", "results_in", "changes")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMPLETE: _ClassVar[AssignmentsMessage.Type]
        INCREMENTAL: _ClassVar[AssignmentsMessage.Type]
    COMPLETE: AssignmentsMessage.Type
    INCREMENTAL: AssignmentsMessage.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    APPLIES_TO_FIELD_NUMBER: _ClassVar[int]
    RESULTS_IN_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    type: AssignmentsMessage.Type
    applies_to: str
    results_in: str
    changes: _containers.RepeatedCompositeFieldContainer[AssignmentChange]
    def __init__(self, type: _Optional[_Union[AssignmentsMessage.Type, str]] = ..., applies_to: _Optional[str] = ..., results_in: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[AssignmentChange, _Mapping]]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("session", "heartbeat")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    session: SessionRequest
    heartbeat: HeartbeatRequest
    def __init__(self, session: _Optional[_Union[SessionRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ...) -> None: ...

class ManagerMessage(_message.Message):
    __slots__ = ("session", "heartbeat", "assignments", "subscription")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    session: SessionMessage
    heartbeat: HeartbeatResponse
    assignments: AssignmentsMessage
    subscription: _logs_pb2.SubscriptionMessage
    def __init__(self, session: _Optional[_Union[SessionMessage, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatResponse, _Mapping]] = ..., assignments: _Optional[_Union[AssignmentsMessage, _Mapping]] = ..., subscription: _Optional[_Union[_logs_pb2.SubscriptionMessage, _Mapping]] = ...) -> None: ...
