from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIVE: _ClassVar[MemberState]
    SUSPECT: _ClassVar[MemberState]
    DEAD: _ClassVar[MemberState]
    LEFT: _ClassVar[MemberState]
ALIVE: MemberState
SUSPECT: MemberState
DEAD: MemberState
LEFT: MemberState

class EndpointRecord(_message.Message):
    __slots__ = ("task_id", "task_name", "service_name", "service_id", "ip", "mac", "vtep", "vip", "aliases", "stack", "endpoint_mode", "node_id", "container_id", "ingress_ports", "inactive")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    VTEP_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_MODE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    INGRESS_PORTS_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_name: str
    service_name: str
    service_id: str
    ip: str
    mac: str
    vtep: str
    vip: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    stack: str
    endpoint_mode: str
    node_id: str
    container_id: str
    ingress_ports: _containers.RepeatedCompositeFieldContainer[PublishedPort]
    inactive: bool
    def __init__(self, task_id: _Optional[str] = ..., task_name: _Optional[str] = ..., service_name: _Optional[str] = ..., service_id: _Optional[str] = ..., ip: _Optional[str] = ..., mac: _Optional[str] = ..., vtep: _Optional[str] = ..., vip: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., stack: _Optional[str] = ..., endpoint_mode: _Optional[str] = ..., node_id: _Optional[str] = ..., container_id: _Optional[str] = ..., ingress_ports: _Optional[_Iterable[_Union[PublishedPort, _Mapping]]] = ..., inactive: _Optional[bool] = ...) -> None: ...

class PublishedPort(_message.Message):
    __slots__ = ("protocol", "published_port", "target_port")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    published_port: int
    target_port: int
    def __init__(self, protocol: _Optional[str] = ..., published_port: _Optional[int] = ..., target_port: _Optional[int] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq", "target", "source", "source_addr", "source_port")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PORT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    source: str
    source_addr: str
    source_port: int
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., source: _Optional[str] = ..., source_addr: _Optional[str] = ..., source_port: _Optional[int] = ...) -> None: ...

class IndirectPing(_message.Message):
    __slots__ = ("seq", "target", "target_addr", "target_port", "source", "source_addr", "source_port")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDR_FIELD_NUMBER: _ClassVar[int]
    TARGET_PORT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PORT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    target_addr: str
    target_port: int
    source: str
    source_addr: str
    source_port: int
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., target_addr: _Optional[str] = ..., target_port: _Optional[int] = ..., source: _Optional[str] = ..., source_addr: _Optional[str] = ..., source_port: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "source")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    source: str
    def __init__(self, seq: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class MemberUpdate(_message.Message):
    __slots__ = ("node", "addr", "port", "incarnation", "state")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    node: str
    addr: str
    port: int
    incarnation: int
    state: MemberState
    def __init__(self, node: _Optional[str] = ..., addr: _Optional[str] = ..., port: _Optional[int] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., **kwargs) -> None: ...

class NetworkEvent(_message.Message):
    __slots__ = ("node", "network_id", "ltime", "leave")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ID_FIELD_NUMBER: _ClassVar[int]
    LTIME_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    node: str
    network_id: str
    ltime: int
    leave: bool
    def __init__(self, node: _Optional[str] = ..., network_id: _Optional[str] = ..., ltime: _Optional[int] = ..., leave: _Optional[bool] = ...) -> None: ...

class TableEntry(_message.Message):
    __slots__ = ("table", "network_id", "key", "value", "owner", "ltime", "deleted")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LTIME_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    table: str
    network_id: str
    key: str
    value: bytes
    owner: str
    ltime: int
    deleted: bool
    def __init__(self, table: _Optional[str] = ..., network_id: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., owner: _Optional[str] = ..., ltime: _Optional[int] = ..., deleted: _Optional[bool] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("ping", "indirect_ping", "ack", "member", "network", "entry")
    PING_FIELD_NUMBER: _ClassVar[int]
    INDIRECT_PING_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    ping: Ping
    indirect_ping: IndirectPing
    ack: Ack
    member: MemberUpdate
    network: NetworkEvent
    entry: TableEntry
    def __init__(self, ping: _Optional[_Union[Ping, _Mapping]] = ..., indirect_ping: _Optional[_Union[IndirectPing, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., member: _Optional[_Union[MemberUpdate, _Mapping]] = ..., network: _Optional[_Union[NetworkEvent, _Mapping]] = ..., entry: _Optional[_Union[TableEntry, _Mapping]] = ...) -> None: ...

class Packet(_message.Message):
    __slots__ = ("source", "messages")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    source: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, source: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class PushPull(_message.Message):
    __slots__ = ("source", "join", "members", "networks", "sync_networks", "entries", "network_ltime", "table_ltime")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NETWORKS_FIELD_NUMBER: _ClassVar[int]
    SYNC_NETWORKS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_LTIME_FIELD_NUMBER: _ClassVar[int]
    TABLE_LTIME_FIELD_NUMBER: _ClassVar[int]
    source: str
    join: bool
    members: _containers.RepeatedCompositeFieldContainer[MemberUpdate]
    networks: _containers.RepeatedCompositeFieldContainer[NetworkEvent]
    sync_networks: _containers.RepeatedScalarFieldContainer[str]
    entries: _containers.RepeatedCompositeFieldContainer[TableEntry]
    network_ltime: int
    table_ltime: int
    def __init__(self, source: _Optional[str] = ..., join: _Optional[bool] = ..., members: _Optional[_Iterable[_Union[MemberUpdate, _Mapping]]] = ..., networks: _Optional[_Iterable[_Union[NetworkEvent, _Mapping]]] = ..., sync_networks: _Optional[_Iterable[str]] = ..., entries: _Optional[_Iterable[_Union[TableEntry, _Mapping]]] = ..., network_ltime: _Optional[int] = ..., table_ltime: _Optional[int] = ...) -> None: ...

class Stream(_message.Message):
    __slots__ = ("push_pull", "ping", "ack")
    PUSH_PULL_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    push_pull: PushPull
    ping: Ping
    ack: Ack
    def __init__(self, push_pull: _Optional[_Union[PushPull, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...
