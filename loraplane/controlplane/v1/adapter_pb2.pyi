import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_PENDING: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_READY: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_FAILED: _ClassVar[AdapterStatus]
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_STATUS_PENDING: AdapterStatus
ADAPTER_STATUS_READY: AdapterStatus
ADAPTER_STATUS_FAILED: AdapterStatus

class AdapterSource(_message.Message):
    __slots__ = ("kind", "repo", "revision", "commit_sha")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPO_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SHA_FIELD_NUMBER: _ClassVar[int]
    kind: str
    repo: str
    revision: str
    commit_sha: str
    def __init__(self, kind: _Optional[str] = ..., repo: _Optional[str] = ..., revision: _Optional[str] = ..., commit_sha: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("id", "name", "base_model", "model", "status", "status_reason", "source", "rank", "target_modules", "lora_alpha", "size_bytes", "sha256", "created_at", "placement_error", "pinned")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_ERROR_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    base_model: str
    model: str
    status: AdapterStatus
    status_reason: str
    source: AdapterSource
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    lora_alpha: float
    size_bytes: int
    sha256: str
    created_at: _timestamp_pb2.Timestamp
    placement_error: str
    pinned: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., base_model: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., status_reason: _Optional[str] = ..., source: _Optional[_Union[AdapterSource, _Mapping]] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., lora_alpha: _Optional[float] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., placement_error: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class UploadAdapterMetadata(_message.Message):
    __slots__ = ("name", "base_model", "lora_alpha", "adapter_config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    lora_alpha: float
    adapter_config: bytes
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., lora_alpha: _Optional[float] = ..., adapter_config: _Optional[bytes] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadAdapterMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadAdapterMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class CreateAdapterRequest(_message.Message):
    __slots__ = ("name", "base_model", "repo", "revision", "hf_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    REPO_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HF_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    repo: str
    revision: str
    hf_token: str
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., repo: _Optional[str] = ..., revision: _Optional[str] = ..., hf_token: _Optional[str] = ...) -> None: ...

class CreateAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("id", "deleted")
    ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    id: str
    deleted: bool
    def __init__(self, id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class PlaceAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "replicate", "avoid_worker_ids")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_FIELD_NUMBER: _ClassVar[int]
    AVOID_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    replicate: bool
    avoid_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., replicate: _Optional[bool] = ..., avoid_worker_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PlaceAdapterResponse(_message.Message):
    __slots__ = ("worker_id", "already_loaded", "load_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    already_loaded: bool
    load_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., already_loaded: _Optional[bool] = ..., load_ms: _Optional[int] = ...) -> None: ...

class PinAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PinAdapterResponse(_message.Message):
    __slots__ = ("adapter", "worker_id", "pinned", "pinned_slots")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PINNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    worker_id: str
    pinned: int
    pinned_slots: int
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., worker_id: _Optional[str] = ..., pinned: _Optional[int] = ..., pinned_slots: _Optional[int] = ...) -> None: ...

class UnpinAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UnpinAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...
