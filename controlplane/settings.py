"""The control plane's settings, each field with the variable it is read from (docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane import config, limits
from loraplane.config import ConfigError, derived, var
from loraplane.limits import MAX_ADAPTER_BYTES, RateLimits, tier_var
from loraplane.s3 import BUCKET_ENV, STORE, S3Settings, bucket_from_env

TIER_LIMITS = {"shared": 20, "reserved": 200, "dedicated": 200}  # adapters per tenant
ARTIFACT_DIR = "LORAPLANE_ARTIFACT_DIR"


def _tier_limits(environ: Mapping[str, str], _: Mapping[str, Any]) -> dict[str, int]:
    return {t: config.get(environ, tier_var(t, "MAX_ADAPTERS"), int, n) for t, n in TIER_LIMITS.items()}


def _tier_max_bytes(environ: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, int]:
    default: int = values["max_adapter_bytes"]
    return {t: config.get(environ, tier_var(t, "MAX_BYTES"), int, default) for t in TIER_LIMITS}


def _advertise_addr(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    addr: str = environ.get("LORAPLANE_ADVERTISE_ADDR") or values["grpc_addr"]
    return addr


def _artifact_dir(environ: Mapping[str, str], _: Mapping[str, Any]) -> Path:
    location = environ.get(STORE, "")
    if location and "://" not in location:
        return Path(location)
    return config.get(environ, ARTIFACT_DIR, Path, Path(".loraplane/artifacts"))


def _artifact_s3(environ: Mapping[str, str], _: Mapping[str, Any]) -> S3Settings | None:
    location = environ.get(STORE, "")
    if "://" in location and not location.startswith("s3://"):
        raise ConfigError(f"{STORE}={location!r}: not a directory or an s3://bucket/prefix URL")
    return bucket_from_env(environ)


@dataclass(frozen=True, kw_only=True)
class Settings:
    grpc_addr: str = field(default="127.0.0.1:50051", metadata=var("LORAPLANE_GRPC_ADDR"))
    # where the other replicas reach this one
    advertise_addr: str = field(metadata=derived(("LORAPLANE_ADVERTISE_ADDR",), _advertise_addr))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=var("LORAPLANE_REDIS_URL"))
    # the filesystem store; with an S3 store, where uploads are staged
    artifact_dir: Path = field(metadata=derived((STORE, ARTIFACT_DIR), _artifact_dir))
    catalog_path: Path = field(default=Path(".loraplane/catalog.json"), metadata=var("LORAPLANE_CATALOG"))
    operator_token: str = field(repr=False, metadata=var("LORAPLANE_OPERATOR_TOKEN", secret=True))
    agent_token: str = field(repr=False, metadata=var("LORAPLANE_AGENT_TOKEN", secret=True))
    # what replicas forwarding to each other present; no operator or agent holds it
    peer_token: str = field(repr=False, metadata=var("LORAPLANE_PEER_TOKEN", secret=True))
    max_adapter_bytes: int = field(default=MAX_ADAPTER_BYTES, metadata=var("LORAPLANE_MAX_ADAPTER_BYTES"))
    tier_limits: Mapping[str, int] = field(
        default_factory=lambda: dict(TIER_LIMITS),
        metadata=derived([tier_var(t, "MAX_ADAPTERS") for t in TIER_LIMITS], _tier_limits),
    )
    tier_max_bytes: Mapping[str, int] = field(
        default_factory=lambda: dict.fromkeys(TIER_LIMITS, MAX_ADAPTER_BYTES),
        metadata=derived([tier_var(t, "MAX_BYTES") for t in TIER_LIMITS], _tier_max_bytes),
    )
    # shown to operators (the data planes enforce them)
    tier_rate_limits: Mapping[str, RateLimits] = field(
        default_factory=lambda: dict(limits.TIER_RATE_LIMITS),
        metadata=derived(limits.RATE_VARS, limits.tier_rate_limits),
    )
    # adapters a tenant may pin, per tier (LORAPLANE_TIER_<TIER>_PINNED_SLOTS); a tenant's own replaces it
    tier_pinned_slots: Mapping[str, int] = field(
        default_factory=lambda: dict(limits.TIER_PINNED_SLOTS),
        metadata=derived(limits.PINNED_SLOT_VARS, limits.tier_pinned_slots),
    )
    # an adapter's bytes are pushed into this many node caches of its base model when it becomes
    # ready (those a placement would pick next); 0: none
    prefetch_workers: int = field(default=2, metadata=var("LORAPLANE_PREFETCH_WORKERS"))
    load_timeout_s: float = field(default=60.0, metadata=var("LORAPLANE_LOAD_TIMEOUT_S"))
    heartbeat_timeout_s: float = field(default=6.0, metadata=var("LORAPLANE_HEARTBEAT_TIMEOUT_S"))
    max_loads_per_s: int = field(default=10, metadata=var("LORAPLANE_MAX_LOADS_PER_S"))
    placement_failed_hold_s: float = field(default=30.0, metadata=var("LORAPLANE_PLACEMENT_FAILED_HOLD_S"))
    upload_idle_timeout_s: float = 60.0  # not read from the environment
    # host:port of /metrics; empty: none
    metrics_addr: str = field(default="127.0.0.1:9090", metadata=var("LORAPLANE_METRICS_ADDR"))
    # a blob no adapter names, this old, is deleted by the sweep
    orphan_grace_s: float = field(default=3600.0, metadata=var("LORAPLANE_ORPHAN_GRACE_S"))
    orphan_sweep_s: float = field(default=600.0, metadata=var("LORAPLANE_ORPHAN_SWEEP_S"))
    hf_endpoint: str = field(
        default="https://huggingface.co", metadata=var("HF_ENDPOINT", parse=lambda url: url.rstrip("/"))
    )
    hub_timeout_s: float = field(default=30.0, metadata=var("LORAPLANE_HUB_TIMEOUT_S"))
    hub_total_timeout_s: float = field(default=900.0, metadata=var("LORAPLANE_HUB_TOTAL_TIMEOUT_S"))
    # set: blobs live in this bucket, not in artifact_dir
    artifact_s3: S3Settings | None = field(default=None, metadata=derived(BUCKET_ENV, _artifact_s3))

    def __post_init__(self) -> None:
        if self.peer_token in (self.operator_token, self.agent_token):
            raise config.ConfigError("LORAPLANE_PEER_TOKEN must differ from the operator and agent tokens")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return config.from_env(cls, env)
