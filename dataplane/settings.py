from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    redis_url: str
    controlplane_addr: str
    catalog_path: Path
    worker_api_key: str
    max_adapter_bytes: int = 500 * 1000 * 1000
    max_body_bytes: int = 1 << 20
    upload_timeout_s: float = 600.0
    place_timeout_s: float = 60.0
    upstream_timeout_s: float = 600.0
    key_cache_ttl_s: float = 30.0
    adapter_cache_ttl_s: float = 5.0
    routing_refresh_s: float = 5.0
    max_tokens: int = 4096  # per request (max_tokens, max_completion_tokens)
    max_n: int = 8  # choices per request
    replicate_at_in_flight: int = 16  # requests in flight per holder that make an adapter hot
    header_timeout_s: float = 15.0  # a request's headers, from its first byte (slowloris)
    body_timeout_s: float = 30.0  # a JSON request body, whole
    upload_idle_timeout_s: float = 60.0  # an upload with no bytes for this long is given up

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            host=env.get("LORAPLANE_HTTP_HOST", "127.0.0.1"),
            port=int(env.get("LORAPLANE_HTTP_PORT", "8080")),
            redis_url=env.get("LORAPLANE_REDIS_URL", "redis://127.0.0.1:6379/0"),
            controlplane_addr=env.get("LORAPLANE_CONTROLPLANE_ADDR", "127.0.0.1:50051"),
            catalog_path=Path(env.get("LORAPLANE_CATALOG", ".loraplane/catalog.json")),
            worker_api_key=env.get("LORAPLANE_WORKER_API_KEY", ""),
            max_adapter_bytes=int(env.get("LORAPLANE_MAX_ADAPTER_BYTES", 500 * 1000 * 1000)),
            max_body_bytes=int(env.get("LORAPLANE_MAX_BODY_BYTES", 1 << 20)),
            max_tokens=int(env.get("LORAPLANE_MAX_TOKENS", 4096)),
            max_n=int(env.get("LORAPLANE_MAX_N", 8)),
            replicate_at_in_flight=int(env.get("LORAPLANE_REPLICATE_AT_IN_FLIGHT", 16)),
            header_timeout_s=float(env.get("LORAPLANE_HEADER_TIMEOUT_S", 15)),
            body_timeout_s=float(env.get("LORAPLANE_BODY_TIMEOUT_S", 30)),
            upload_idle_timeout_s=float(env.get("LORAPLANE_UPLOAD_IDLE_TIMEOUT_S", 60)),
            upload_timeout_s=float(env.get("LORAPLANE_UPLOAD_TIMEOUT_S", 600)),
        )
