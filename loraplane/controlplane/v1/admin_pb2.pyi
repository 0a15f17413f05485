from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefetchAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "worker_ids")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchAdapterResponse(_message.Message):
    __slots__ = ("worker_ids",)
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AssignWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "tenant_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tenant_id: str
    def __init__(self, worker_id: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class AssignWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "tenant_id", "evicted_adapter_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EVICTED_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tenant_id: str
    evicted_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., evicted_adapter_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UnassignWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UnassignWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "tenant_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tenant_id: str
    def __init__(self, worker_id: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UndrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class UndrainWorkerResponse(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class ForceLoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "worker_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    worker_id: str
    def __init__(self, adapter_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ForceLoadAdapterResponse(_message.Message):
    __slots__ = ("worker_id", "already_loaded")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    already_loaded: bool
    def __init__(self, worker_id: _Optional[str] = ..., already_loaded: _Optional[bool] = ...) -> None: ...

class ForceEvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "worker_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    worker_id: str
    def __init__(self, adapter_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ForceEvictAdapterResponse(_message.Message):
    __slots__ = ("worker_ids",)
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRoutingTableRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoutingEntry(_message.Message):
    __slots__ = ("worker_id", "base_model", "endpoint", "adapter_ids", "healthy", "draining", "pool_tenant_id", "pinned_adapter_ids", "max_concurrency")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    POOL_TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    base_model: str
    endpoint: str
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    healthy: bool
    draining: bool
    pool_tenant_id: str
    pinned_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    def __init__(self, worker_id: _Optional[str] = ..., base_model: _Optional[str] = ..., endpoint: _Optional[str] = ..., adapter_ids: _Optional[_Iterable[str]] = ..., healthy: _Optional[bool] = ..., draining: _Optional[bool] = ..., pool_tenant_id: _Optional[str] = ..., pinned_adapter_ids: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class GetRoutingTableResponse(_message.Message):
    __slots__ = ("version", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    workers: _containers.RepeatedCompositeFieldContainer[RoutingEntry]
    def __init__(self, version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[RoutingEntry, _Mapping]]] = ...) -> None: ...
