from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraplane.s3 import S3Settings


@dataclass(frozen=True)
class Settings:
    controlplane_addr: str
    agent_token: str
    worker_id: str
    base_model: str
    catalog_path: Path
    cache_dir: Path
    vllm_host: str
    vllm_port: int
    vllm_api_key: str
    vllm_agent_secret: str  # the attached vLLM's guard secret; a vLLM we start gets a generated one
    vllm_url: str  # attach to this vLLM instead of starting one
    advertise_url: str  # where data planes reach this worker's vLLM
    vllm_args: tuple[str, ...]
    heartbeat_s: float = 2.0
    metrics_addr: str = "127.0.0.1:9091"  # host:port of /metrics; empty: none
    drain_timeout_s: float = 30.0
    cache_max_bytes: int = 20 << 30
    startup_timeout_s: float = 300.0
    artifact_s3: S3Settings | None = None  # set: fetch blobs from this bucket, not from the control plane

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        token = env.get("LORAPLANE_AGENT_TOKEN", "")
        if len(token) < 16:
            raise ValueError("LORAPLANE_AGENT_TOKEN must be set to a secret of at least 16 characters")
        base_model = env.get("LORAPLANE_BASE_MODEL", "tiny-llama")
        store = env.get("LORAPLANE_ARTIFACT_STORE", "")  # a directory (the control plane's) or s3://
        return cls(
            controlplane_addr=env.get("LORAPLANE_CONTROLPLANE_ADDR", "127.0.0.1:50051"),
            agent_token=token,
            worker_id=env.get("LORAPLANE_WORKER_ID") or f"{socket.gethostname()}-{base_model}",
            base_model=base_model,
            catalog_path=Path(env.get("LORAPLANE_CATALOG", ".loraplane/catalog.json")),
            cache_dir=Path(env.get("LORAPLANE_CACHE_DIR", ".loraplane/agent-cache")),
            vllm_host=env.get("LORAPLANE_VLLM_HOST", "127.0.0.1"),
            vllm_port=int(env.get("LORAPLANE_VLLM_PORT", "8100")),
            vllm_api_key=env.get("LORAPLANE_WORKER_API_KEY", ""),
            vllm_agent_secret=env.get("LORAPLANE_VLLM_AGENT_SECRET", ""),
            vllm_url=env.get("LORAPLANE_VLLM_URL", ""),
            advertise_url=env.get("LORAPLANE_ADVERTISE_URL", ""),
            vllm_args=tuple(shlex.split(env.get("LORAPLANE_VLLM_ARGS", ""))),
            heartbeat_s=float(env.get("LORAPLANE_HEARTBEAT_S", "2")),
            metrics_addr=env.get("LORAPLANE_METRICS_ADDR", "127.0.0.1:9091"),
            drain_timeout_s=float(env.get("LORAPLANE_DRAIN_TIMEOUT_S", "30")),
            cache_max_bytes=int(env.get("LORAPLANE_CACHE_MAX_BYTES", 20 << 30)),
            startup_timeout_s=float(env.get("LORAPLANE_VLLM_STARTUP_TIMEOUT_S", "300")),
            artifact_s3=S3Settings.from_env(store, env) if store.startswith("s3://") else None,
        )
