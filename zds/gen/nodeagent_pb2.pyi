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

class PodState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POD_STATE_UNSPECIFIED: _ClassVar[PodState]
    POD_STATE_PENDING: _ClassVar[PodState]
    POD_STATE_ACKED: _ClassVar[PodState]
    POD_STATE_FAILED: _ClassVar[PodState]

class ConnectionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONNECTION_STATE_UNSPECIFIED: _ClassVar[ConnectionState]
    CONNECTION_STATE_AWAITING_HELLO: _ClassVar[ConnectionState]
    CONNECTION_STATE_SNAPSHOT: _ClassVar[ConnectionState]
    CONNECTION_STATE_READY: _ClassVar[ConnectionState]
    CONNECTION_STATE_CLOSED: _ClassVar[ConnectionState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_POD_ENROLLED: _ClassVar[EventKind]
    EVENT_KIND_POD_REMOVED: _ClassVar[EventKind]
    EVENT_KIND_ZTUNNEL_CONNECTED: _ClassVar[EventKind]
    EVENT_KIND_ZTUNNEL_DISCONNECTED: _ClassVar[EventKind]
    EVENT_KIND_MESSAGE_SENT: _ClassVar[EventKind]
    EVENT_KIND_MESSAGE_ACKED: _ClassVar[EventKind]
    EVENT_KIND_MESSAGE_NACKED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT_COMPLETE: _ClassVar[EventKind]
    EVENT_KIND_CURRENT_STATE_END: _ClassVar[EventKind]
    EVENT_KIND_POD_SOURCE_UP: _ClassVar[EventKind]
    EVENT_KIND_POD_SOURCE_DOWN: _ClassVar[EventKind]
    EVENT_KIND_FAULT_INJECTED: _ClassVar[EventKind]
    EVENT_KIND_FAULT_APPLIED: _ClassVar[EventKind]

class FaultKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_KIND_UNSPECIFIED: _ClassVar[FaultKind]
    FAULT_KIND_DELAY: _ClassVar[FaultKind]
    FAULT_KIND_DROP_BEFORE: _ClassVar[FaultKind]
    FAULT_KIND_DROP_AFTER: _ClassVar[FaultKind]
    FAULT_KIND_PIPELINE: _ClassVar[FaultKind]
    FAULT_KIND_NON_CANONICAL: _ClassVar[FaultKind]
    FAULT_KIND_OVERSIZE_RECORD: _ClassVar[FaultKind]
    FAULT_KIND_UNKNOWN_FIELD: _ClassVar[FaultKind]
    FAULT_KIND_NO_PAYLOAD: _ClassVar[FaultKind]
    FAULT_KIND_EMPTY_RECORD: _ClassVar[FaultKind]
    FAULT_KIND_ADD_WITHOUT_FD: _ClassVar[FaultKind]
    FAULT_KIND_ADD_WITH_TWO_FDS: _ClassVar[FaultKind]
    FAULT_KIND_ADD_WITHOUT_WORKLOAD_INFO: _ClassVar[FaultKind]
    FAULT_KIND_NOT_A_NETNS_FD: _ClassVar[FaultKind]
    FAULT_KIND_FD_ON_DEL: _ClassVar[FaultKind]
    FAULT_KIND_KEEP_UNKNOWN_UID: _ClassVar[FaultKind]
    FAULT_KIND_DUPLICATE_ADD: _ClassVar[FaultKind]
    FAULT_KIND_SECOND_SNAPSHOT_SENT: _ClassVar[FaultKind]
    FAULT_KIND_RECORD_BEFORE_HELLO: _ClassVar[FaultKind]
    FAULT_KIND_WITHHOLD_SNAPSHOT_SENT: _ClassVar[FaultKind]
    FAULT_KIND_OMIT_FROM_SNAPSHOT: _ClassVar[FaultKind]
    FAULT_KIND_ADD_TO_OLDEST: _ClassVar[FaultKind]
    FAULT_KIND_DEL_TO_NEWEST_ONLY: _ClassVar[FaultKind]
    FAULT_KIND_LEAK_NETNS_FDS: _ClassVar[FaultKind]
    FAULT_KIND_WRONG_NETNS: _ClassVar[FaultKind]
POD_STATE_UNSPECIFIED: PodState
POD_STATE_PENDING: PodState
POD_STATE_ACKED: PodState
POD_STATE_FAILED: PodState
CONNECTION_STATE_UNSPECIFIED: ConnectionState
CONNECTION_STATE_AWAITING_HELLO: ConnectionState
CONNECTION_STATE_SNAPSHOT: ConnectionState
CONNECTION_STATE_READY: ConnectionState
CONNECTION_STATE_CLOSED: ConnectionState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_POD_ENROLLED: EventKind
EVENT_KIND_POD_REMOVED: EventKind
EVENT_KIND_ZTUNNEL_CONNECTED: EventKind
EVENT_KIND_ZTUNNEL_DISCONNECTED: EventKind
EVENT_KIND_MESSAGE_SENT: EventKind
EVENT_KIND_MESSAGE_ACKED: EventKind
EVENT_KIND_MESSAGE_NACKED: EventKind
EVENT_KIND_SNAPSHOT_COMPLETE: EventKind
EVENT_KIND_CURRENT_STATE_END: EventKind
EVENT_KIND_POD_SOURCE_UP: EventKind
EVENT_KIND_POD_SOURCE_DOWN: EventKind
EVENT_KIND_FAULT_INJECTED: EventKind
EVENT_KIND_FAULT_APPLIED: EventKind
FAULT_KIND_UNSPECIFIED: FaultKind
FAULT_KIND_DELAY: FaultKind
FAULT_KIND_DROP_BEFORE: FaultKind
FAULT_KIND_DROP_AFTER: FaultKind
FAULT_KIND_PIPELINE: FaultKind
FAULT_KIND_NON_CANONICAL: FaultKind
FAULT_KIND_OVERSIZE_RECORD: FaultKind
FAULT_KIND_UNKNOWN_FIELD: FaultKind
FAULT_KIND_NO_PAYLOAD: FaultKind
FAULT_KIND_EMPTY_RECORD: FaultKind
FAULT_KIND_ADD_WITHOUT_FD: FaultKind
FAULT_KIND_ADD_WITH_TWO_FDS: FaultKind
FAULT_KIND_ADD_WITHOUT_WORKLOAD_INFO: FaultKind
FAULT_KIND_NOT_A_NETNS_FD: FaultKind
FAULT_KIND_FD_ON_DEL: FaultKind
FAULT_KIND_KEEP_UNKNOWN_UID: FaultKind
FAULT_KIND_DUPLICATE_ADD: FaultKind
FAULT_KIND_SECOND_SNAPSHOT_SENT: FaultKind
FAULT_KIND_RECORD_BEFORE_HELLO: FaultKind
FAULT_KIND_WITHHOLD_SNAPSHOT_SENT: FaultKind
FAULT_KIND_OMIT_FROM_SNAPSHOT: FaultKind
FAULT_KIND_ADD_TO_OLDEST: FaultKind
FAULT_KIND_DEL_TO_NEWEST_ONLY: FaultKind
FAULT_KIND_LEAK_NETNS_FDS: FaultKind
FAULT_KIND_WRONG_NETNS: FaultKind

class NetnsIdentity(_message.Message):
    __slots__ = ("dev", "ino")
    DEV_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    dev: int
    ino: int
    def __init__(self, dev: _Optional[int] = ..., ino: _Optional[int] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("uid", "name", "namespace", "service_account", "netns_path", "netns", "state", "last_error", "enrolled_at", "rules_installed", "ips", "recovery", "source")
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NETNS_PATH_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    RULES_INSTALLED_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    namespace: str
    service_account: str
    netns_path: str
    netns: NetnsIdentity
    state: PodState
    last_error: str
    enrolled_at: _timestamp_pb2.Timestamp
    rules_installed: bool
    ips: _containers.RepeatedScalarFieldContainer[str]
    recovery: str
    source: str
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., netns_path: _Optional[str] = ..., netns: _Optional[_Union[NetnsIdentity, _Mapping]] = ..., state: _Optional[_Union[PodState, str]] = ..., last_error: _Optional[str] = ..., enrolled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rules_installed: _Optional[bool] = ..., ips: _Optional[_Iterable[str]] = ..., recovery: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AddPodRequest(_message.Message):
    __slots__ = ("uid", "name", "namespace", "service_account", "netns_path", "netns_pid", "ips")
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NETNS_PATH_FIELD_NUMBER: _ClassVar[int]
    NETNS_PID_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    namespace: str
    service_account: str
    netns_path: str
    netns_pid: int
    ips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., netns_path: _Optional[str] = ..., netns_pid: _Optional[int] = ..., ips: _Optional[_Iterable[str]] = ...) -> None: ...

class AddPodResponse(_message.Message):
    __slots__ = ("pod", "connection_id")
    POD_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    pod: Pod
    connection_id: str
    def __init__(self, pod: _Optional[_Union[Pod, _Mapping]] = ..., connection_id: _Optional[str] = ...) -> None: ...

class AddPodsRequest(_message.Message):
    __slots__ = ("pods",)
    PODS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[AddPodRequest]
    def __init__(self, pods: _Optional[_Iterable[_Union[AddPodRequest, _Mapping]]] = ...) -> None: ...

class AddPodsReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AddPodsResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AddPodsResult, _Mapping]]] = ...) -> None: ...

class AddPodsResult(_message.Message):
    __slots__ = ("index", "uid", "code", "message", "response")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    index: int
    uid: str
    code: int
    message: str
    response: AddPodResponse
    def __init__(self, index: _Optional[int] = ..., uid: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[AddPodResponse, _Mapping]] = ...) -> None: ...

class RemovePodRequest(_message.Message):
    __slots__ = ("uid",)
    UID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    def __init__(self, uid: _Optional[str] = ...) -> None: ...

class RemovePodResponse(_message.Message):
    __slots__ = ("pod", "deliveries")
    POD_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    pod: Pod
    deliveries: _containers.RepeatedCompositeFieldContainer[DeleteDelivery]
    def __init__(self, pod: _Optional[_Union[Pod, _Mapping]] = ..., deliveries: _Optional[_Iterable[_Union[DeleteDelivery, _Mapping]]] = ...) -> None: ...

class DeleteDelivery(_message.Message):
    __slots__ = ("connection_id", "error")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    error: str
    def __init__(self, connection_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ListPodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPodsResponse(_message.Message):
    __slots__ = ("pods",)
    PODS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    def __init__(self, pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ...) -> None: ...

class PeerCredentials(_message.Message):
    __slots__ = ("pid", "uid", "gid")
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uid: int
    gid: int
    def __init__(self, pid: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ...) -> None: ...

class MessageCounts(_message.Message):
    __slots__ = ("sent", "acked", "nacked", "sent_add", "sent_keep", "sent_del", "sent_snapshot_sent")
    SENT_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    NACKED_FIELD_NUMBER: _ClassVar[int]
    SENT_ADD_FIELD_NUMBER: _ClassVar[int]
    SENT_KEEP_FIELD_NUMBER: _ClassVar[int]
    SENT_DEL_FIELD_NUMBER: _ClassVar[int]
    SENT_SNAPSHOT_SENT_FIELD_NUMBER: _ClassVar[int]
    sent: int
    acked: int
    nacked: int
    sent_add: int
    sent_keep: int
    sent_del: int
    sent_snapshot_sent: int
    def __init__(self, sent: _Optional[int] = ..., acked: _Optional[int] = ..., nacked: _Optional[int] = ..., sent_add: _Optional[int] = ..., sent_keep: _Optional[int] = ..., sent_del: _Optional[int] = ..., sent_snapshot_sent: _Optional[int] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("id", "peer", "hello_version", "connected_at", "state", "snapshot_complete", "messages", "newest")
    ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    HELLO_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    peer: PeerCredentials
    hello_version: int
    connected_at: _timestamp_pb2.Timestamp
    state: ConnectionState
    snapshot_complete: bool
    messages: MessageCounts
    newest: bool
    def __init__(self, id: _Optional[str] = ..., peer: _Optional[_Union[PeerCredentials, _Mapping]] = ..., hello_version: _Optional[int] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[ConnectionState, str]] = ..., snapshot_complete: _Optional[bool] = ..., messages: _Optional[_Union[MessageCounts, _Mapping]] = ..., newest: _Optional[bool] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    def __init__(self, connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("kinds", "uid")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    uid: str
    def __init__(self, kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ..., uid: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "time", "sequence", "current_state", "uid", "pod_name", "pod_namespace", "connection_id", "message_type", "error", "ack_latency", "pod", "connection", "snapshot_pods", "pod_source", "fault")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STATE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACK_LATENCY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PODS_FIELD_NUMBER: _ClassVar[int]
    POD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    time: _timestamp_pb2.Timestamp
    sequence: int
    current_state: bool
    uid: str
    pod_name: str
    pod_namespace: str
    connection_id: str
    message_type: str
    error: str
    ack_latency: _duration_pb2.Duration
    pod: Pod
    connection: Connection
    snapshot_pods: int
    pod_source: str
    fault: Fault
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ..., current_state: _Optional[bool] = ..., uid: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., connection_id: _Optional[str] = ..., message_type: _Optional[str] = ..., error: _Optional[str] = ..., ack_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pod: _Optional[_Union[Pod, _Mapping]] = ..., connection: _Optional[_Union[Connection, _Mapping]] = ..., snapshot_pods: _Optional[int] = ..., pod_source: _Optional[str] = ..., fault: _Optional[_Union[Fault, _Mapping]] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("kind", "connection_id", "next_connection", "count", "delay", "uid", "after_snapshot", "wait", "skip_connections")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    SKIP_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: FaultKind
    connection_id: str
    next_connection: bool
    count: int
    delay: _duration_pb2.Duration
    uid: str
    after_snapshot: bool
    wait: bool
    skip_connections: int
    def __init__(self, kind: _Optional[_Union[FaultKind, str]] = ..., connection_id: _Optional[str] = ..., next_connection: _Optional[bool] = ..., count: _Optional[int] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., uid: _Optional[str] = ..., after_snapshot: _Optional[bool] = ..., wait: _Optional[bool] = ..., skip_connections: _Optional[int] = ...) -> None: ...

class Fault(_message.Message):
    __slots__ = ("id", "kind", "target", "count", "delay", "uid", "after_snapshot", "state", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: FaultKind
    target: str
    count: int
    delay: _duration_pb2.Duration
    uid: str
    after_snapshot: bool
    state: str
    detail: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[FaultKind, str]] = ..., target: _Optional[str] = ..., count: _Optional[int] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., uid: _Optional[str] = ..., after_snapshot: _Optional[bool] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ("fault",)
    FAULT_FIELD_NUMBER: _ClassVar[int]
    fault: Fault
    def __init__(self, fault: _Optional[_Union[Fault, _Mapping]] = ...) -> None: ...

class ListFaultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFaultsResponse(_message.Message):
    __slots__ = ("faults",)
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    faults: _containers.RepeatedCompositeFieldContainer[Fault]
    def __init__(self, faults: _Optional[_Iterable[_Union[Fault, _Mapping]]] = ...) -> None: ...

class ClearFaultsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ClearFaultsResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: _containers.RepeatedCompositeFieldContainer[Fault]
    def __init__(self, cleared: _Optional[_Iterable[_Union[Fault, _Mapping]]] = ...) -> None: ...
