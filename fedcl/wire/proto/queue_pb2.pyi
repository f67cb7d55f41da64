from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType

class PushChunk(_message.Message):
    __slots__ = ("rows", "dim", "dtype", "data", "round", "model_version", "request_id", "total_rows")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    dim: int
    dtype: DType
    data: bytes
    round: int
    model_version: int
    request_id: str
    total_rows: int
    def __init__(self, rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., request_id: _Optional[str] = ..., total_rows: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "size", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    size: int
    duplicate: bool
    def __init__(self, accepted: _Optional[int] = ..., size: _Optional[int] = ..., duplicate: bool = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("k", "max_age", "dtype", "exclude_site")
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SITE_FIELD_NUMBER: _ClassVar[int]
    k: int
    max_age: int
    dtype: DType
    exclude_site: str
    def __init__(self, k: _Optional[int] = ..., max_age: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., exclude_site: _Optional[str] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("rows", "dim", "dtype", "data", "total")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    rows: int
    dim: int
    dtype: DType
    data: bytes
    total: int
    def __init__(self, rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., total: _Optional[int] = ...) -> None: ...

class AdvanceRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class AdvanceReply(_message.Message):
    __slots__ = ("evicted", "current_round", "size")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    current_round: int
    size: int
    def __init__(self, evicted: _Optional[int] = ..., current_round: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("size", "capacity", "dim", "dtype", "current_round", "max_staleness", "per_site_quota", "per_site", "pushed_total", "evicted_capacity", "evicted_quota", "evicted_staleness", "oldest_round", "newest_round", "restarts", "rows_lost")
    class PerSiteEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    PER_SITE_QUOTA_FIELD_NUMBER: _ClassVar[int]
    PER_SITE_FIELD_NUMBER: _ClassVar[int]
    PUSHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVICTED_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    EVICTED_QUOTA_FIELD_NUMBER: _ClassVar[int]
    EVICTED_STALENESS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEWEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_LOST_FIELD_NUMBER: _ClassVar[int]
    size: int
    capacity: int
    dim: int
    dtype: DType
    current_round: int
    max_staleness: int
    per_site_quota: int
    per_site: _containers.ScalarMap[str, int]
    pushed_total: int
    evicted_capacity: int
    evicted_quota: int
    evicted_staleness: int
    oldest_round: int
    newest_round: int
    restarts: int
    rows_lost: int
    def __init__(self, size: _Optional[int] = ..., capacity: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., current_round: _Optional[int] = ..., max_staleness: _Optional[int] = ..., per_site_quota: _Optional[int] = ..., per_site: _Optional[_Mapping[str, int]] = ..., pushed_total: _Optional[int] = ..., evicted_capacity: _Optional[int] = ..., evicted_quota: _Optional[int] = ..., evicted_staleness: _Optional[int] = ..., oldest_round: _Optional[int] = ..., newest_round: _Optional[int] = ..., restarts: _Optional[int] = ..., rows_lost: _Optional[int] = ...) -> None: ...
