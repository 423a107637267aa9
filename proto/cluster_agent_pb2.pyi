import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FollowFrom(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOOP: _ClassVar[FollowFrom]
    DEFAULT: _ClassVar[FollowFrom]
    END: _ClassVar[FollowFrom]
NOOP: FollowFrom
DEFAULT: FollowFrom
END: FollowFrom

class LogMetadataFileInfo(_message.Message):
    __slots__ = ("size", "last_modified_at")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_MODIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    size: int
    last_modified_at: _timestamp_pb2.Timestamp
    def __init__(self, size: _Optional[int] = ..., last_modified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LogMetadataSpec(_message.Message):
    __slots__ = ("node_name", "namespace", "pod_name", "container_name", "container_id")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    namespace: str
    pod_name: str
    container_name: str
    container_id: str
    def __init__(self, node_name: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., container_name: _Optional[str] = ..., container_id: _Optional[str] = ...) -> None: ...

class LogMetadata(_message.Message):
    __slots__ = ("id", "spec", "fileInfo")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    FILEINFO_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: LogMetadataSpec
    fileInfo: LogMetadataFileInfo
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[LogMetadataSpec, _Mapping]] = ..., fileInfo: _Optional[_Union[LogMetadataFileInfo, _Mapping]] = ...) -> None: ...

class LogMetadataList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LogMetadata]
    def __init__(self, items: _Optional[_Iterable[_Union[LogMetadata, _Mapping]]] = ...) -> None: ...

class LogMetadataListRequest(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class LogMetadataWatchRequest(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class LogMetadataWatchEvent(_message.Message):
    __slots__ = ("type", "object")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    type: str
    object: LogMetadata
    def __init__(self, type: _Optional[str] = ..., object: _Optional[_Union[LogMetadata, _Mapping]] = ...) -> None: ...

class LogRecordsStreamRequest(_message.Message):
    __slots__ = ("namespace", "pod_name", "container_name", "container_id", "start_time", "stop_time", "grep", "follow_from")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    GREP_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FROM_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod_name: str
    container_name: str
    container_id: str
    start_time: str
    stop_time: str
    grep: str
    follow_from: FollowFrom
    def __init__(self, namespace: _Optional[str] = ..., pod_name: _Optional[str] = ..., container_name: _Optional[str] = ..., container_id: _Optional[str] = ..., start_time: _Optional[str] = ..., stop_time: _Optional[str] = ..., grep: _Optional[str] = ..., follow_from: _Optional[_Union[FollowFrom, str]] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("timestamp", "message", "is_final")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    timestamp: _timestamp_pb2.Timestamp
    message: str
    is_final: bool
    def __init__(self, timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., is_final: _Optional[bool] = ...) -> None: ...
