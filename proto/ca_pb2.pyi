import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from shoal.proto import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRootCACertificateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRootCACertificateResponse(_message.Message):
    __slots__ = ("certificate",)
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    def __init__(self, certificate: _Optional[bytes] = ...) -> None: ...

class IssueNodeCertificateRequest(_message.Message):
    __slots__ = ("csr", "token", "hostname", "advertise_addr", "node_id", "raft_addr", "renew")
    CSR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDR_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    token: str
    hostname: str
    advertise_addr: str
    node_id: str
    raft_addr: str
    renew: bool
    def __init__(self, csr: _Optional[bytes] = ..., token: _Optional[str] = ..., hostname: _Optional[str] = ..., advertise_addr: _Optional[str] = ..., node_id: _Optional[str] = ..., raft_addr: _Optional[str] = ..., renew: _Optional[bool] = ...) -> None: ...

class IssueNodeCertificateResponse(_message.Message):
    __slots__ = ("node_id", "certificate", "root_ca", "role", "raft_peers", "cluster_id", "data_key", "heartbeat_period")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    ROOT_CA_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RAFT_PEERS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PERIOD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    certificate: bytes
    root_ca: bytes
    role: _types_pb2.NodeRole
    raft_peers: _containers.RepeatedScalarFieldContainer[str]
    cluster_id: str
    data_key: bytes
    heartbeat_period: _duration_pb2.Duration
    def __init__(self, node_id: _Optional[str] = ..., certificate: _Optional[bytes] = ..., root_ca: _Optional[bytes] = ..., role: _Optional[_Union[_types_pb2.NodeRole, str]] = ..., raft_peers: _Optional[_Iterable[str]] = ..., cluster_id: _Optional[str] = ..., data_key: _Optional[bytes] = ..., heartbeat_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
