"""The data plane's settings, each field with the variable it is read from (docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraplane import config
from loraplane.config import derived, var
from loraplane.limits import (
    MAX_ADAPTER_BYTES,
    RATE_VARS,
    TIER_RATE_LIMITS,
    TIER_WEIGHTS,
    WEIGHT_VARS,
    RateLimits,
    tier_rate_limits,
    tier_weights,
)


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata=var("LORAPLANE_HTTP_HOST"))
    port: int = field(default=8080, metadata=var("LORAPLANE_HTTP_PORT"))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=var("LORAPLANE_REDIS_URL"))
    controlplane_addr: str = field(default="127.0.0.1:50051", metadata=var("LORAPLANE_CONTROLPLANE_ADDR"))
    catalog_path: Path = field(default=Path(".loraplane/catalog.json"), metadata=var("LORAPLANE_CATALOG"))
    worker_api_key: str = field(default="", repr=False, metadata=var("LORAPLANE_WORKER_API_KEY"))
    max_adapter_bytes: int = field(default=MAX_ADAPTER_BYTES, metadata=var("LORAPLANE_MAX_ADAPTER_BYTES"))
    max_body_bytes: int = field(default=1 << 20, metadata=var("LORAPLANE_MAX_BODY_BYTES"))
    upload_timeout_s: float = field(default=600.0, metadata=var("LORAPLANE_UPLOAD_TIMEOUT_S"))
    place_timeout_s: float = 60.0  # not read from the environment
    upstream_timeout_s: float = 600.0  # not read from the environment
    key_cache_ttl_s: float = 30.0  # not read from the environment
    adapter_cache_ttl_s: float = 5.0  # not read from the environment
    routing_refresh_s: float = 5.0  # not read from the environment
    # per request (max_tokens, max_completion_tokens)
    max_tokens: int = field(default=4096, metadata=var("LORAPLANE_MAX_TOKENS"))
    max_n: int = field(default=8, metadata=var("LORAPLANE_MAX_N"))  # choices per request
    # requests in flight per holder that make an adapter hot
    replicate_at_in_flight: int = field(default=16, metadata=var("LORAPLANE_REPLICATE_AT_IN_FLIGHT"))
    # a request's headers, from its first byte (slowloris)
    header_timeout_s: float = field(default=15.0, metadata=var("LORAPLANE_HEADER_TIMEOUT_S"))
    # a JSON request body, whole
    body_timeout_s: float = field(default=30.0, metadata=var("LORAPLANE_BODY_TIMEOUT_S"))
    # an upload with no bytes for this long is given up
    upload_idle_timeout_s: float = field(default=60.0, metadata=var("LORAPLANE_UPLOAD_IDLE_TIMEOUT_S"))

    # rate limits per tier (LORAPLANE_TIER_<TIER>_{RPM,TPM,CONCURRENCY}); a tenant's own replace them
    tier_rate_limits: Mapping[str, RateLimits] = field(
        default_factory=lambda: dict(TIER_RATE_LIMITS), metadata=derived(RATE_VARS, tier_rate_limits)
    )
    # a per-minute limit's bucket holds this many seconds of it (the burst a tenant may send at once)
    rate_burst_s: float = field(default=5.0, metadata=var("LORAPLANE_RATE_BURST_S"))
    # completion tokens charged at admission for a request that does not say max_tokens
    estimate_completion_tokens: int = field(default=256, metadata=var("LORAPLANE_ESTIMATE_COMPLETION_TOKENS"))
    # usage is written to Redis this often (a data plane killed with -9 loses at most this much)
    usage_flush_s: float = field(default=0.5, metadata=var("LORAPLANE_USAGE_FLUSH_S"))
    # how long usage buckets are kept: minute, hour and day buckets (days; 0 forever)
    usage_minute_days: float = field(default=2.0, metadata=var("LORAPLANE_USAGE_MINUTE_DAYS"))
    usage_retention_days: float = field(default=90.0, metadata=var("LORAPLANE_USAGE_RETENTION_DAYS"))

    # fair queuing when a base model's workers are full (dataplane/fairshare.py): each worker's
    # concurrency (0: what its agent reports, vLLM's --max-num-seqs), split among this many data
    # plane replicas (0: the live ones, counted in Redis); how long a request may wait for a slot
    # (then 503), and how many of one tenant's may wait per base model (then 429); weights per
    # tier (LORAPLANE_TIER_<TIER>_WEIGHT)
    worker_concurrency: int = field(default=0, metadata=var("LORAPLANE_WORKER_CONCURRENCY"))
    dataplane_replicas: int = field(default=0, metadata=var("LORAPLANE_DATAPLANE_REPLICAS"))
    queue_timeout_s: float = field(default=30.0, metadata=var("LORAPLANE_QUEUE_TIMEOUT_S"))
    queue_max_per_tenant: int = field(default=1000, metadata=var("LORAPLANE_QUEUE_MAX_PER_TENANT"))
    tier_weights: Mapping[str, int] = field(
        default_factory=lambda: dict(TIER_WEIGHTS), metadata=derived(WEIGHT_VARS, tier_weights)
    )

    # browser origins allowed to call the API (comma-separated; "*" any); empty: no CORS
    cors_origins: str = field(default="", metadata=var("LORAPLANE_CORS_ORIGINS"))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return config.from_env(cls, env)
