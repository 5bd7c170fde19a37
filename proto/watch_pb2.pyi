from shoal.proto import objects_pb2 as _objects_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchEvent(_message.Message):
    __slots__ = ("action", "object", "old_object")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CREATE: _ClassVar[WatchEvent.Action]
        UPDATE: _ClassVar[WatchEvent.Action]
        DELETE: _ClassVar[WatchEvent.Action]
    CREATE: WatchEvent.Action
    UPDATE: WatchEvent.Action
    DELETE: WatchEvent.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    OLD_OBJECT_FIELD_NUMBER: _ClassVar[int]
    action: WatchEvent.Action
    object: _objects_pb2.StoreObject
    old_object: _objects_pb2.StoreObject
    def __init__(self, action: _Optional[_Union[WatchEvent.Action, str]] = ..., object: _Optional[_Union[_objects_pb2.StoreObject, _Mapping]] = ..., old_object: _Optional[_Union[_objects_pb2.StoreObject, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("kinds", "include_old_object")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OLD_OBJECT_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    include_old_object: bool
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., include_old_object: _Optional[bool] = ...) -> None: ...

class WatchMessage(_message.Message):
    __slots__ = ("events", "version")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[WatchEvent]
    version: int
    def __init__(self, events: _Optional[_Iterable[_Union[WatchEvent, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...
