import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from shoal.proto import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeSpec(_message.Message):
    __slots__ = ("annotations", "desired_role", "membership", "availability")
    class Membership(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PENDING: _ClassVar[NodeSpec.Membership]
        ACCEPTED: _ClassVar[NodeSpec.Membership]
    PENDING: NodeSpec.Membership
    ACCEPTED: NodeSpec.Membership
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_ROLE_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    desired_role: _types_pb2.NodeRole
    membership: NodeSpec.Membership
    availability: _types_pb2.NodeAvailability
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., desired_role: _Optional[_Union[_types_pb2.NodeRole, str]] = ..., membership: _Optional[_Union[NodeSpec.Membership, str]] = ..., availability: _Optional[_Union[_types_pb2.NodeAvailability, str]] = ...) -> None: ...

class ReplicatedService(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    def __init__(self, replicas: _Optional[int] = ...) -> None: ...

class GlobalService(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceSpec(_message.Message):
    __slots__ = ("annotations", "task", "replicated", "update", "rollback", "endpoint")
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    REPLICATED_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    task: _types_pb2.TaskSpec
    replicated: ReplicatedService
    update: _types_pb2.UpdateConfig
    rollback: _types_pb2.UpdateConfig
    endpoint: _types_pb2.EndpointSpec
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., task: _Optional[_Union[_types_pb2.TaskSpec, _Mapping]] = ..., replicated: _Optional[_Union[ReplicatedService, _Mapping]] = ..., update: _Optional[_Union[_types_pb2.UpdateConfig, _Mapping]] = ..., rollback: _Optional[_Union[_types_pb2.UpdateConfig, _Mapping]] = ..., endpoint: _Optional[_Union[_types_pb2.EndpointSpec, _Mapping]] = ..., **kwargs) -> None: ...

class NetworkSpec(_message.Message):
    __slots__ = ("annotations", "driver_config", "internal", "attachable", "ingress", "ipam")
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_FIELD_NUMBER: _ClassVar[int]
    ATTACHABLE_FIELD_NUMBER: _ClassVar[int]
    INGRESS_FIELD_NUMBER: _ClassVar[int]
    IPAM_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    driver_config: _types_pb2.Driver
    internal: bool
    attachable: bool
    ingress: bool
    ipam: _types_pb2.IPAMOptions
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., driver_config: _Optional[_Union[_types_pb2.Driver, _Mapping]] = ..., internal: _Optional[bool] = ..., attachable: _Optional[bool] = ..., ingress: _Optional[bool] = ..., ipam: _Optional[_Union[_types_pb2.IPAMOptions, _Mapping]] = ...) -> None: ...

class SecretSpec(_message.Message):
    __slots__ = ("annotations", "data")
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    data: bytes
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ConfigSpec(_message.Message):
    __slots__ = ("annotations", "data")
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    data: bytes
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClusterSpec(_message.Message):
    __slots__ = ("annotations", "orchestration", "dispatcher", "ca_config", "default_address_pool", "subnet_size", "network_encryption", "encryption_config")
    class Orchestration(_message.Message):
        __slots__ = ("task_history_retention_limit",)
        TASK_HISTORY_RETENTION_LIMIT_FIELD_NUMBER: _ClassVar[int]
        task_history_retention_limit: int
        def __init__(self, task_history_retention_limit: _Optional[int] = ...) -> None: ...
    class Dispatcher(_message.Message):
        __slots__ = ("heartbeat_period", "restart_window")
        HEARTBEAT_PERIOD_FIELD_NUMBER: _ClassVar[int]
        RESTART_WINDOW_FIELD_NUMBER: _ClassVar[int]
        heartbeat_period: _duration_pb2.Duration
        restart_window: _duration_pb2.Duration
        def __init__(self, heartbeat_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., restart_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    class CAConfig(_message.Message):
        __slots__ = ("node_cert_expiry",)
        NODE_CERT_EXPIRY_FIELD_NUMBER: _ClassVar[int]
        node_cert_expiry: _duration_pb2.Duration
        def __init__(self, node_cert_expiry: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    class NetworkEncryption(_message.Message):
        __slots__ = ("key_rotation_interval",)
        KEY_ROTATION_INTERVAL_FIELD_NUMBER: _ClassVar[int]
        key_rotation_interval: _duration_pb2.Duration
        def __init__(self, key_rotation_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    class EncryptionConfig(_message.Message):
        __slots__ = ("autolock_managers",)
        AUTOLOCK_MANAGERS_FIELD_NUMBER: _ClassVar[int]
        autolock_managers: bool
        def __init__(self, autolock_managers: _Optional[bool] = ...) -> None: ...
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    ORCHESTRATION_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_FIELD_NUMBER: _ClassVar[int]
    CA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ADDRESS_POOL_FIELD_NUMBER: _ClassVar[int]
    SUBNET_SIZE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_CONFIG_FIELD_NUMBER: _ClassVar[int]
    annotations: _types_pb2.Annotations
    orchestration: ClusterSpec.Orchestration
    dispatcher: ClusterSpec.Dispatcher
    ca_config: ClusterSpec.CAConfig
    default_address_pool: _containers.RepeatedScalarFieldContainer[str]
    subnet_size: int
    network_encryption: ClusterSpec.NetworkEncryption
    encryption_config: ClusterSpec.EncryptionConfig
    def __init__(self, annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., orchestration: _Optional[_Union[ClusterSpec.Orchestration, _Mapping]] = ..., dispatcher: _Optional[_Union[ClusterSpec.Dispatcher, _Mapping]] = ..., ca_config: _Optional[_Union[ClusterSpec.CAConfig, _Mapping]] = ..., default_address_pool: _Optional[_Iterable[str]] = ..., subnet_size: _Optional[int] = ..., network_encryption: _Optional[_Union[ClusterSpec.NetworkEncryption, _Mapping]] = ..., encryption_config: _Optional[_Union[ClusterSpec.EncryptionConfig, _Mapping]] = ...) -> None: ...
