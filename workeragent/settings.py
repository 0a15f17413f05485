"""The agent's settings, each field with the variable it is read from (docs/configuration.md)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane import config
from loraplane.config import derived, var
from loraplane.s3 import BUCKET_ENV, S3Settings, bucket_from_env


def _worker_id(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    return environ.get("LORAPLANE_WORKER_ID") or f"{socket.gethostname()}-{values['base_model']}"


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("not 0 or a positive whole number")
    return int(text)


def _artifact_s3(environ: Mapping[str, str], _: Mapping[str, Any]) -> S3Settings | None:
    return bucket_from_env(environ)  # else the agent fetches blobs through the control plane


@dataclass(frozen=True, kw_only=True)
class Settings:
    controlplane_addr: str = field(default="127.0.0.1:50051", metadata=var("LORAPLANE_CONTROLPLANE_ADDR"))
    agent_token: str = field(repr=False, metadata=var("LORAPLANE_AGENT_TOKEN", secret=True))
    worker_id: str = field(metadata=derived(("LORAPLANE_WORKER_ID",), _worker_id))  # default: <host>-<base model>
    base_model: str = field(default="tiny-llama", metadata=var("LORAPLANE_BASE_MODEL"))
    catalog_path: Path = field(default=Path(".loraplane/catalog.json"), metadata=var("LORAPLANE_CATALOG"))
    cache_dir: Path = field(default=Path(".loraplane/agent-cache"), metadata=var("LORAPLANE_CACHE_DIR"))
    vllm_host: str = field(default="127.0.0.1", metadata=var("LORAPLANE_VLLM_HOST"))
    vllm_port: int = field(default=8100, metadata=var("LORAPLANE_VLLM_PORT"))
    vllm_api_key: str = field(default="", repr=False, metadata=var("LORAPLANE_WORKER_API_KEY"))
    # the attached vLLM's guard secret; a vLLM we start gets a generated one
    vllm_agent_secret: str = field(default="", repr=False, metadata=var("LORAPLANE_VLLM_AGENT_SECRET"))
    # attach to this vLLM instead of starting one
    vllm_url: str = field(default="", metadata=var("LORAPLANE_VLLM_URL"))
    # where data planes reach this worker's vLLM
    advertise_url: str = field(default="", metadata=var("LORAPLANE_ADVERTISE_URL"))
    vllm_args: tuple[str, ...] = field(default=(), metadata=var("LORAPLANE_VLLM_ARGS"))  # split like a shell
    # what runs vLLM's OpenAI server; empty: this Python's `-m vllm.entrypoints.openai.api_server`
    vllm_command: tuple[str, ...] = field(default=(), metadata=var("LORAPLANE_VLLM_COMMAND"))
    # most requests the engine runs at once (a vLLM the agent starts gets it as --max-num-seqs,
    # unless vllm_args has that flag); 0: vLLM's default, or not known (workeragent/concurrency.py)
    max_concurrency: int = field(default=0, metadata=var("LORAPLANE_MAX_CONCURRENCY", parse=_count))
    heartbeat_s: float = field(default=2.0, metadata=var("LORAPLANE_HEARTBEAT_S"))
    # host:port of /metrics; empty: none
    metrics_addr: str = field(default="127.0.0.1:9091", metadata=var("LORAPLANE_METRICS_ADDR"))
    drain_timeout_s: float = field(default=30.0, metadata=var("LORAPLANE_DRAIN_TIMEOUT_S"))
    cache_max_bytes: int = field(default=20 << 30, metadata=var("LORAPLANE_CACHE_MAX_BYTES"))
    startup_timeout_s: float = field(default=300.0, metadata=var("LORAPLANE_VLLM_STARTUP_TIMEOUT_S"))
    # an engine with no progress and no answer this long is hung (killed and started again)
    engine_hang_s: float = field(default=6.0, metadata=var("LORAPLANE_ENGINE_HANG_S"))
    # an engine that served this long before it ended did not crash-loop
    engine_stable_s: float = field(default=30.0, metadata=var("LORAPLANE_ENGINE_STABLE_S"))
    engine_backoff_cap_s: float = field(default=60.0, metadata=var("LORAPLANE_ENGINE_BACKOFF_CAP_S"))
    # most to wait, after an engine ended, for its GPUs to hold no process (NVML)
    engine_gpu_release_s: float = field(default=60.0, metadata=var("LORAPLANE_ENGINE_GPU_RELEASE_S"))
    # set: fetch blobs from this bucket, not from the control plane
    artifact_s3: S3Settings | None = field(default=None, metadata=derived(BUCKET_ENV, _artifact_s3))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return config.from_env(cls, env)
