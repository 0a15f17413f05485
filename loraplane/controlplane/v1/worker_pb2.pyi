from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Register(_message.Message):
    __slots__ = ("worker_id", "base_model", "endpoint", "max_adapters", "resident", "engine", "max_concurrency", "prefetch", "gpu_slots")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    base_model: str
    endpoint: str
    max_adapters: int
    resident: _containers.RepeatedScalarFieldContainer[str]
    engine: EngineStatus
    max_concurrency: int
    prefetch: bool
    gpu_slots: int
    def __init__(self, worker_id: _Optional[str] = ..., base_model: _Optional[str] = ..., endpoint: _Optional[str] = ..., max_adapters: _Optional[int] = ..., resident: _Optional[_Iterable[str]] = ..., engine: _Optional[_Union[EngineStatus, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., prefetch: _Optional[bool] = ..., gpu_slots: _Optional[int] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("state", "last_error", "restarts")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    state: str
    last_error: str
    restarts: int
    def __init__(self, state: _Optional[str] = ..., last_error: _Optional[str] = ..., restarts: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("resident", "healthy", "busy", "requests_in_flight", "commands_done", "engine", "cached")
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_DONE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    resident: _containers.RepeatedScalarFieldContainer[str]
    healthy: bool
    busy: _containers.RepeatedScalarFieldContainer[str]
    requests_in_flight: int
    commands_done: int
    engine: EngineStatus
    cached: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, resident: _Optional[_Iterable[str]] = ..., healthy: _Optional[bool] = ..., busy: _Optional[_Iterable[str]] = ..., requests_in_flight: _Optional[int] = ..., commands_done: _Optional[int] = ..., engine: _Optional[_Union[EngineStatus, _Mapping]] = ..., cached: _Optional[_Iterable[str]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "ok", "error", "already_done", "duration_ms", "resident")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALREADY_DONE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    error: str
    already_done: bool
    duration_ms: int
    resident: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., already_done: _Optional[bool] = ..., duration_ms: _Optional[int] = ..., resident: _Optional[_Iterable[str]] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("register", "heartbeat", "result")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    result: CommandResult
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ...) -> None: ...

class LoadAdapter(_message.Message):
    __slots__ = ("command_id", "adapter_id", "vllm_name", "sha256", "size_bytes", "adapter_config", "generation", "request_id")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VLLM_NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    adapter_id: str
    vllm_name: str
    sha256: str
    size_bytes: int
    adapter_config: bytes
    generation: int
    request_id: str
    def __init__(self, command_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., vllm_name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., adapter_config: _Optional[bytes] = ..., generation: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class EvictAdapter(_message.Message):
    __slots__ = ("command_id", "vllm_name", "generation", "request_id")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    VLLM_NAME_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    vllm_name: str
    generation: int
    request_id: str
    def __init__(self, command_id: _Optional[str] = ..., vllm_name: _Optional[str] = ..., generation: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class PrefetchArtifact(_message.Message):
    __slots__ = ("command_id", "sha256", "size_bytes", "request_id", "vllm_name")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VLLM_NAME_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    sha256: str
    size_bytes: int
    request_id: str
    vllm_name: str
    def __init__(self, command_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., request_id: _Optional[str] = ..., vllm_name: _Optional[str] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("load", "evict", "prefetch")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    load: LoadAdapter
    evict: EvictAdapter
    prefetch: PrefetchArtifact
    def __init__(self, load: _Optional[_Union[LoadAdapter, _Mapping]] = ..., evict: _Optional[_Union[EvictAdapter, _Mapping]] = ..., prefetch: _Optional[_Union[PrefetchArtifact, _Mapping]] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("sha256", "offset", "length")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    length: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FetchArtifactResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Worker(_message.Message):
    __slots__ = ("worker_id", "base_model", "endpoint", "max_adapters", "resident_adapter_ids", "healthy", "engine_state", "engine_last_error", "engine_restarts", "pool_tenant_id", "pinned_adapter_ids", "draining", "max_concurrency", "gpu_slots", "cached_adapter_ids")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ENGINE_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    POOL_TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    base_model: str
    endpoint: str
    max_adapters: int
    resident_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    healthy: bool
    engine_state: str
    engine_last_error: str
    engine_restarts: int
    pool_tenant_id: str
    pinned_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    draining: bool
    max_concurrency: int
    gpu_slots: int
    cached_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., base_model: _Optional[str] = ..., endpoint: _Optional[str] = ..., max_adapters: _Optional[int] = ..., resident_adapter_ids: _Optional[_Iterable[str]] = ..., healthy: _Optional[bool] = ..., engine_state: _Optional[str] = ..., engine_last_error: _Optional[str] = ..., engine_restarts: _Optional[int] = ..., pool_tenant_id: _Optional[str] = ..., pinned_adapter_ids: _Optional[_Iterable[str]] = ..., draining: _Optional[bool] = ..., max_concurrency: _Optional[int] = ..., gpu_slots: _Optional[int] = ..., cached_adapter_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...
