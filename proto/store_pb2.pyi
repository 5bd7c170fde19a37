from shoal.proto import objects_pb2 as _objects_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoreAction(_message.Message):
    __slots__ = ("kind", "object")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CREATE: _ClassVar[StoreAction.Kind]
        UPDATE: _ClassVar[StoreAction.Kind]
        DELETE: _ClassVar[StoreAction.Kind]
    CREATE: StoreAction.Kind
    UPDATE: StoreAction.Kind
    DELETE: StoreAction.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    kind: StoreAction.Kind
    object: _objects_pb2.StoreObject
    def __init__(self, kind: _Optional[_Union[StoreAction.Kind, str]] = ..., object: _Optional[_Union[_objects_pb2.StoreObject, _Mapping]] = ...) -> None: ...

class StoreTransaction(_message.Message):
    __slots__ = ("actions", "timestamp_unix_nano")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[StoreAction]
    timestamp_unix_nano: int
    def __init__(self, actions: _Optional[_Iterable[_Union[StoreAction, _Mapping]]] = ..., timestamp_unix_nano: _Optional[int] = ...) -> None: ...

class StoreSnapshot(_message.Message):
    __slots__ = ("version", "objects")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    objects: _containers.RepeatedCompositeFieldContainer[_objects_pb2.StoreObject]
    def __init__(self, version: _Optional[int] = ..., objects: _Optional[_Iterable[_Union[_objects_pb2.StoreObject, _Mapping]]] = ...) -> None: ...

class ClusterBackup(_message.Message):
    __slots__ = ("format", "cluster_id", "version", "created_unix_nano", "key_kind", "nonce", "ciphertext")
    class KeyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BACKUP_KEY: _ClassVar[ClusterBackup.KeyKind]
        UNLOCK_KEY: _ClassVar[ClusterBackup.KeyKind]
    BACKUP_KEY: ClusterBackup.KeyKind
    UNLOCK_KEY: ClusterBackup.KeyKind
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    KEY_KIND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    format: int
    cluster_id: str
    version: int
    created_unix_nano: int
    key_kind: ClusterBackup.KeyKind
    nonce: bytes
    ciphertext: bytes
    def __init__(self, format: _Optional[int] = ..., cluster_id: _Optional[str] = ..., version: _Optional[int] = ..., created_unix_nano: _Optional[int] = ..., key_kind: _Optional[_Union[ClusterBackup.KeyKind, str]] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...
