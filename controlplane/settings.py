from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.s3 import S3Settings

TIER_LIMITS = {"shared": 20, "reserved": 200, "dedicated": 200}


@dataclass(frozen=True)
class Settings:
    grpc_addr: str
    advertise_addr: str  # where the other replicas reach this one
    redis_url: str
    artifact_dir: Path  # the filesystem store; with an S3 store, where uploads are staged
    catalog_path: Path
    operator_token: str
    agent_token: str
    max_adapter_bytes: int = 500 * 1000 * 1000
    tier_limits: Mapping[str, int] = field(default_factory=lambda: dict(TIER_LIMITS))
    tier_max_bytes: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(TIER_LIMITS, 500 * 1000 * 1000))
    load_timeout_s: float = 60.0
    heartbeat_timeout_s: float = 6.0
    max_loads_per_s: int = 10
    placement_failed_hold_s: float = 30.0
    upload_idle_timeout_s: float = 60.0
    metrics_addr: str = "127.0.0.1:9090"  # host:port of /metrics; empty: none
    orphan_grace_s: float = 3600.0  # a blob no adapter names, this old, is deleted by the sweep
    orphan_sweep_s: float = 600.0
    hf_endpoint: str = "https://huggingface.co"
    hub_timeout_s: float = 30.0
    hub_total_timeout_s: float = 900.0
    artifact_s3: S3Settings | None = None  # set: blobs live in this bucket, not in artifact_dir

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        limits = dict(TIER_LIMITS)
        max_bytes = int(env.get("LORAPLANE_MAX_ADAPTER_BYTES", 500 * 1000 * 1000))
        sizes = dict.fromkeys(TIER_LIMITS, max_bytes)
        for tier in TIER_LIMITS:
            limits[tier] = int(env.get(f"LORAPLANE_TIER_{tier.upper()}_MAX_ADAPTERS", limits[tier]))
            sizes[tier] = int(env.get(f"LORAPLANE_TIER_{tier.upper()}_MAX_BYTES", max_bytes))
        location = env.get("LORAPLANE_ARTIFACT_STORE", "")
        s3 = S3Settings.from_env(location, env) if location.startswith("s3://") else None
        if "://" in location and s3 is None:
            raise ValueError("LORAPLANE_ARTIFACT_STORE must be a directory or an s3://bucket/prefix URL")
        return cls(
            grpc_addr=env.get("LORAPLANE_GRPC_ADDR", "127.0.0.1:50051"),
            advertise_addr=env.get("LORAPLANE_ADVERTISE_ADDR") or env.get("LORAPLANE_GRPC_ADDR", "127.0.0.1:50051"),
            redis_url=env.get("LORAPLANE_REDIS_URL", "redis://127.0.0.1:6379/0"),
            artifact_dir=Path(
                location if location and s3 is None else env.get("LORAPLANE_ARTIFACT_DIR", ".loraplane/artifacts")
            ),
            artifact_s3=s3,
            catalog_path=Path(env.get("LORAPLANE_CATALOG", ".loraplane/catalog.json")),
            operator_token=_required(env, "LORAPLANE_OPERATOR_TOKEN"),
            agent_token=_required(env, "LORAPLANE_AGENT_TOKEN"),
            max_adapter_bytes=max_bytes,
            tier_limits=limits,
            tier_max_bytes=sizes,
            hf_endpoint=env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            hub_timeout_s=float(env.get("LORAPLANE_HUB_TIMEOUT_S", 30)),
            hub_total_timeout_s=float(env.get("LORAPLANE_HUB_TOTAL_TIMEOUT_S", 900)),
            load_timeout_s=float(env.get("LORAPLANE_LOAD_TIMEOUT_S", 60)),
            heartbeat_timeout_s=float(env.get("LORAPLANE_HEARTBEAT_TIMEOUT_S", 6)),
            max_loads_per_s=int(env.get("LORAPLANE_MAX_LOADS_PER_S", 10)),
            placement_failed_hold_s=float(env.get("LORAPLANE_PLACEMENT_FAILED_HOLD_S", 30)),
            metrics_addr=env.get("LORAPLANE_METRICS_ADDR", "127.0.0.1:9090"),
            orphan_grace_s=float(env.get("LORAPLANE_ORPHAN_GRACE_S", 3600)),
            orphan_sweep_s=float(env.get("LORAPLANE_ORPHAN_SWEEP_S", 600)),
        )


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if len(value) < 16:
        raise ValueError(f"{name} must be set to a secret of at least 16 characters")
    return value
