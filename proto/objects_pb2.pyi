import datetime

from shoal.proto import types_pb2 as _types_pb2
from shoal.proto import specs_pb2 as _specs_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "meta", "spec", "description", "status", "manager_status", "role", "certificate", "tls_info", "attachments", "spec_changed_after")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MANAGER_STATUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    TLS_INFO_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_CHANGED_AFTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.NodeSpec
    description: _types_pb2.NodeDescription
    status: _types_pb2.NodeStatus
    manager_status: _types_pb2.ManagerStatus
    role: _types_pb2.NodeRole
    certificate: bytes
    tls_info: _types_pb2.NodeTLSInfo
    attachments: _containers.RepeatedCompositeFieldContainer[NetworkAttachment]
    spec_changed_after: int
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.NodeSpec, _Mapping]] = ..., description: _Optional[_Union[_types_pb2.NodeDescription, _Mapping]] = ..., status: _Optional[_Union[_types_pb2.NodeStatus, _Mapping]] = ..., manager_status: _Optional[_Union[_types_pb2.ManagerStatus, _Mapping]] = ..., role: _Optional[_Union[_types_pb2.NodeRole, str]] = ..., certificate: _Optional[bytes] = ..., tls_info: _Optional[_Union[_types_pb2.NodeTLSInfo, _Mapping]] = ..., attachments: _Optional[_Iterable[_Union[NetworkAttachment, _Mapping]]] = ..., spec_changed_after: _Optional[int] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("id", "meta", "spec", "spec_version", "previous_spec", "previous_spec_version", "endpoint", "update_status", "pending_delete")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SPEC_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATUS_FIELD_NUMBER: _ClassVar[int]
    PENDING_DELETE_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.ServiceSpec
    spec_version: int
    previous_spec: _specs_pb2.ServiceSpec
    previous_spec_version: int
    endpoint: _types_pb2.Endpoint
    update_status: _types_pb2.UpdateStatus
    pending_delete: bool
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.ServiceSpec, _Mapping]] = ..., spec_version: _Optional[int] = ..., previous_spec: _Optional[_Union[_specs_pb2.ServiceSpec, _Mapping]] = ..., previous_spec_version: _Optional[int] = ..., endpoint: _Optional[_Union[_types_pb2.Endpoint, _Mapping]] = ..., update_status: _Optional[_Union[_types_pb2.UpdateStatus, _Mapping]] = ..., pending_delete: _Optional[bool] = ...) -> None: ...

class NetworkAttachment(_message.Message):
    __slots__ = ("network", "addresses", "aliases", "mac")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    network: Network
    addresses: _containers.RepeatedScalarFieldContainer[str]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    mac: str
    def __init__(self, network: _Optional[_Union[Network, _Mapping]] = ..., addresses: _Optional[_Iterable[str]] = ..., aliases: _Optional[_Iterable[str]] = ..., mac: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "meta", "spec", "spec_version", "service_id", "slot", "node_id", "annotations", "service_annotations", "status", "desired_state", "networks", "endpoint", "assigned_generic_resources")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SPEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_GENERIC_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _types_pb2.TaskSpec
    spec_version: int
    service_id: str
    slot: int
    node_id: str
    annotations: _types_pb2.Annotations
    service_annotations: _types_pb2.Annotations
    status: _types_pb2.TaskStatus
    desired_state: _types_pb2.TaskState
    networks: _containers.RepeatedCompositeFieldContainer[NetworkAttachment]
    endpoint: _types_pb2.Endpoint
    assigned_generic_resources: _containers.RepeatedCompositeFieldContainer[_types_pb2.GenericResource]
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_types_pb2.TaskSpec, _Mapping]] = ..., spec_version: _Optional[int] = ..., service_id: _Optional[str] = ..., slot: _Optional[int] = ..., node_id: _Optional[str] = ..., annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., service_annotations: _Optional[_Union[_types_pb2.Annotations, _Mapping]] = ..., status: _Optional[_Union[_types_pb2.TaskStatus, _Mapping]] = ..., desired_state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., networks: _Optional[_Iterable[_Union[NetworkAttachment, _Mapping]]] = ..., endpoint: _Optional[_Union[_types_pb2.Endpoint, _Mapping]] = ..., assigned_generic_resources: _Optional[_Iterable[_Union[_types_pb2.GenericResource, _Mapping]]] = ...) -> None: ...

class NetworkDriverState(_message.Message):
    __slots__ = ("vni", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VNI_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    vni: int
    options: _containers.ScalarMap[str, str]
    def __init__(self, vni: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("id", "meta", "spec", "driver_state", "ipam", "pending_delete", "encryption_keys", "keys_rotated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DRIVER_STATE_FIELD_NUMBER: _ClassVar[int]
    IPAM_FIELD_NUMBER: _ClassVar[int]
    PENDING_DELETE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEYS_FIELD_NUMBER: _ClassVar[int]
    KEYS_ROTATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.NetworkSpec
    driver_state: NetworkDriverState
    ipam: _types_pb2.IPAMOptions
    pending_delete: bool
    encryption_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.EncryptionKey]
    keys_rotated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.NetworkSpec, _Mapping]] = ..., driver_state: _Optional[_Union[NetworkDriverState, _Mapping]] = ..., ipam: _Optional[_Union[_types_pb2.IPAMOptions, _Mapping]] = ..., pending_delete: _Optional[bool] = ..., encryption_keys: _Optional[_Iterable[_Union[_types_pb2.EncryptionKey, _Mapping]]] = ..., keys_rotated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Secret(_message.Message):
    __slots__ = ("id", "meta", "spec")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.SecretSpec
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.SecretSpec, _Mapping]] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("id", "meta", "spec")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.ConfigSpec
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.ConfigSpec, _Mapping]] = ...) -> None: ...

class RootCA(_message.Message):
    __slots__ = ("ca_key", "ca_cert", "ca_cert_hash", "join_tokens", "revoked_nodes", "root_rotation", "cross_signed_ca_cert")
    CA_KEY_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_HASH_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_NODES_FIELD_NUMBER: _ClassVar[int]
    ROOT_ROTATION_FIELD_NUMBER: _ClassVar[int]
    CROSS_SIGNED_CA_CERT_FIELD_NUMBER: _ClassVar[int]
    ca_key: bytes
    ca_cert: bytes
    ca_cert_hash: str
    join_tokens: _types_pb2.JoinTokens
    revoked_nodes: _containers.RepeatedCompositeFieldContainer[RevokedNode]
    root_rotation: RootRotation
    cross_signed_ca_cert: bytes
    def __init__(self, ca_key: _Optional[bytes] = ..., ca_cert: _Optional[bytes] = ..., ca_cert_hash: _Optional[str] = ..., join_tokens: _Optional[_Union[_types_pb2.JoinTokens, _Mapping]] = ..., revoked_nodes: _Optional[_Iterable[_Union[RevokedNode, _Mapping]]] = ..., root_rotation: _Optional[_Union[RootRotation, _Mapping]] = ..., cross_signed_ca_cert: _Optional[bytes] = ...) -> None: ...

class RootRotation(_message.Message):
    __slots__ = ("ca_cert", "ca_key", "cross_signed_ca_cert", "ca_cert_hash")
    CA_CERT_FIELD_NUMBER: _ClassVar[int]
    CA_KEY_FIELD_NUMBER: _ClassVar[int]
    CROSS_SIGNED_CA_CERT_FIELD_NUMBER: _ClassVar[int]
    CA_CERT_HASH_FIELD_NUMBER: _ClassVar[int]
    ca_cert: bytes
    ca_key: bytes
    cross_signed_ca_cert: bytes
    ca_cert_hash: str
    def __init__(self, ca_cert: _Optional[bytes] = ..., ca_key: _Optional[bytes] = ..., cross_signed_ca_cert: _Optional[bytes] = ..., ca_cert_hash: _Optional[str] = ...) -> None: ...

class RevokedNode(_message.Message):
    __slots__ = ("node_id", "not_after")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    not_after: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("id", "meta", "spec", "root_ca", "network_bootstrap_keys", "unlock_key", "gossip_keys_rotated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROOT_CA_FIELD_NUMBER: _ClassVar[int]
    NETWORK_BOOTSTRAP_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNLOCK_KEY_FIELD_NUMBER: _ClassVar[int]
    GOSSIP_KEYS_ROTATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    meta: _types_pb2.Meta
    spec: _specs_pb2.ClusterSpec
    root_ca: RootCA
    network_bootstrap_keys: _containers.RepeatedCompositeFieldContainer[_types_pb2.EncryptionKey]
    unlock_key: bytes
    gossip_keys_rotated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., spec: _Optional[_Union[_specs_pb2.ClusterSpec, _Mapping]] = ..., root_ca: _Optional[_Union[RootCA, _Mapping]] = ..., network_bootstrap_keys: _Optional[_Iterable[_Union[_types_pb2.EncryptionKey, _Mapping]]] = ..., unlock_key: _Optional[bytes] = ..., gossip_keys_rotated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StoreObject(_message.Message):
    __slots__ = ("node", "service", "task", "network", "secret", "config", "cluster")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    node: Node
    service: Service
    task: Task
    network: Network
    secret: Secret
    config: Config
    cluster: Cluster
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., network: _Optional[_Union[Network, _Mapping]] = ..., secret: _Optional[_Union[Secret, _Mapping]] = ..., config: _Optional[_Union[Config, _Mapping]] = ..., cluster: _Optional[_Union[Cluster, _Mapping]] = ...) -> None: ...
