import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_SHARED: _ClassVar[Tier]
    TIER_RESERVED: _ClassVar[Tier]
    TIER_DEDICATED: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_SHARED: Tier
TIER_RESERVED: Tier
TIER_DEDICATED: Tier

class Tenant(_message.Message):
    __slots__ = ("id", "name", "tier", "max_adapters", "created_at", "suspended", "limits", "own_limits", "pinned_slots", "own_pinned_slots", "spill_over", "pool_worker_ids", "pinned_adapter_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    OWN_LIMITS_FIELD_NUMBER: _ClassVar[int]
    PINNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OWN_PINNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SPILL_OVER_FIELD_NUMBER: _ClassVar[int]
    POOL_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tier: Tier
    max_adapters: int
    created_at: _timestamp_pb2.Timestamp
    suspended: bool
    limits: RateLimits
    own_limits: bool
    pinned_slots: int
    own_pinned_slots: bool
    spill_over: bool
    pool_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    pinned_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., max_adapters: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., suspended: _Optional[bool] = ..., limits: _Optional[_Union[RateLimits, _Mapping]] = ..., own_limits: _Optional[bool] = ..., pinned_slots: _Optional[int] = ..., own_pinned_slots: _Optional[bool] = ..., spill_over: _Optional[bool] = ..., pool_worker_ids: _Optional[_Iterable[str]] = ..., pinned_adapter_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RateLimits(_message.Message):
    __slots__ = ("rpm", "tpm", "concurrency")
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    rpm: int
    tpm: int
    concurrency: int
    def __init__(self, rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., concurrency: _Optional[int] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: Tier
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "api_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    api_key: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key_prefix")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key_prefix: str
    def __init__(self, api_key: _Optional[str] = ..., key_prefix: _Optional[str] = ...) -> None: ...

class SetTenantTierRequest(_message.Message):
    __slots__ = ("tenant_id", "tier")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tier: Tier
    def __init__(self, tenant_id: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class SetTenantTierResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class SuspendTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class SuspendTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class UnsuspendTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class UnsuspendTenantResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_prefix", "tenant_id", "created_at")
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    key_prefix: str
    tenant_id: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, key_prefix: _Optional[str] = ..., tenant_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_prefix",)
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    key_prefix: str
    def __init__(self, key_prefix: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key_prefix",)
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    key_prefix: str
    def __init__(self, key_prefix: _Optional[str] = ...) -> None: ...

class SetTenantLimitsRequest(_message.Message):
    __slots__ = ("tenant_id", "limits", "tier_default")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TIER_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    limits: RateLimits
    tier_default: bool
    def __init__(self, tenant_id: _Optional[str] = ..., limits: _Optional[_Union[RateLimits, _Mapping]] = ..., tier_default: _Optional[bool] = ...) -> None: ...

class SetTenantLimitsResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class ExportUsageRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "bucket_width", "tenant_id", "page_token", "page_size")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    BUCKET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    start_time: int
    end_time: int
    bucket_width: str
    tenant_id: str
    page_token: str
    page_size: int
    def __init__(self, start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., bucket_width: _Optional[str] = ..., tenant_id: _Optional[str] = ..., page_token: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant_id", "kind", "start_time", "end_time", "model", "adapter_id", "input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_MODEL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    kind: str
    start_time: int
    end_time: int
    model: str
    adapter_id: str
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    num_model_requests: int
    def __init__(self, tenant_id: _Optional[str] = ..., kind: _Optional[str] = ..., start_time: _Optional[int] = ..., end_time: _Optional[int] = ..., model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., input_cached_tokens: _Optional[int] = ..., num_model_requests: _Optional[int] = ...) -> None: ...

class ExportUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetTenantCapacityRequest(_message.Message):
    __slots__ = ("tenant_id", "pinned_slots", "pinned_slots_tier_default", "spill_over")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PINNED_SLOTS_TIER_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SPILL_OVER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    pinned_slots: int
    pinned_slots_tier_default: bool
    spill_over: bool
    def __init__(self, tenant_id: _Optional[str] = ..., pinned_slots: _Optional[int] = ..., pinned_slots_tier_default: _Optional[bool] = ..., spill_over: _Optional[bool] = ...) -> None: ...

class SetTenantCapacityResponse(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...
