import datetime

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
POD_STATE_UNSPECIFIED: PodState
POD_STATE_PENDING: PodState
POD_STATE_ACKED: PodState
POD_STATE_FAILED: PodState

class NetnsIdentity(_message.Message):
    __slots__ = ("dev", "ino")
    DEV_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    dev: int
    ino: int
    def __init__(self, dev: _Optional[int] = ..., ino: _Optional[int] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("uid", "name", "namespace", "service_account", "netns_path", "netns", "state", "last_error", "enrolled_at", "rules_installed")
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
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., netns_path: _Optional[str] = ..., netns: _Optional[_Union[NetnsIdentity, _Mapping]] = ..., state: _Optional[_Union[PodState, str]] = ..., last_error: _Optional[str] = ..., enrolled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rules_installed: _Optional[bool] = ...) -> None: ...

class AddPodRequest(_message.Message):
    __slots__ = ("uid", "name", "namespace", "service_account", "netns_path", "netns_pid")
    UID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    NETNS_PATH_FIELD_NUMBER: _ClassVar[int]
    NETNS_PID_FIELD_NUMBER: _ClassVar[int]
    uid: str
    name: str
    namespace: str
    service_account: str
    netns_path: str
    netns_pid: int
    def __init__(self, uid: _Optional[str] = ..., name: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ..., netns_path: _Optional[str] = ..., netns_pid: _Optional[int] = ...) -> None: ...

class AddPodResponse(_message.Message):
    __slots__ = ("pod", "connection_id")
    POD_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    pod: Pod
    connection_id: str
    def __init__(self, pod: _Optional[_Union[Pod, _Mapping]] = ..., connection_id: _Optional[str] = ...) -> None: ...

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
