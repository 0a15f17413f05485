from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loraplane.controlplane.v1 import adapter_pb2, adapter_pb2_grpc
from loraplane.limits import RATE_VARS
from loraplane.stack import Stack, StackConfig, WorkerSpec, vllm_args
from tests.hubserver import HubServer
from tests.support import FIGURES, RedisServer, free_port, start_simulator


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability suite's figures (THREATS.md's list), one per line."""
    if FIGURES:
        terminalreporter.section("figures")
        for name, value in FIGURES:
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplane import tinymodel

    return tinymodel.build(tmp_path_factory.mktemp("models") / "tiny-llama")


UNLIMITED = tuple((name, "0") for name in RATE_VARS)


def running_stack(
    tmp: Path,
    with_worker: bool,
    env: tuple[tuple[str, str], ...] = (),
    replicas: int = 1,
    extra_workers: tuple[WorkerSpec, ...] = (),
    extra_models: tuple[tuple[str, str], ...] = (),
    redis_url: str = "",
    lora_models: tuple[tuple[str, Path], ...] = (),
    dataplanes: int = 1,
) -> Iterator[Stack]:
    """A started stack on free ports, logging under `tmp/logs`; stopped afterwards. No tier has
    rate limits unless `env` gives some (tests of other things send faster than a tier allows)."""
    env = UNLIMITED + env
    config = StackConfig(
        data_dir=tmp / "data",
        redis_url=redis_url,
        http_port=free_port(),
        grpc_port=free_port(),
        vllm_port=free_port(),
        log_dir=tmp / "logs",
        with_worker=with_worker,
        extra_env=env,
        second_grpc_port=free_port() if replicas == 2 else 0,
        extra_workers=extra_workers,
        extra_models=extra_models,
        lora_models=lora_models,
        second_http_port=free_port() if dataplanes == 2 else 0,
    )
    stack = Stack(config)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every training pipeline's output directory for tiny-llama (tests/trainers.py), built once."""
    from tests import trainers

    return trainers.build_all(tiny_model, tmp_path_factory.mktemp("trainers"))


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    """A local Hugging Face Hub the control stack downloads from."""
    server = HubServer().start()
    yield server
    server.stop()


CONTROL_STACK_MAX_BYTES = 1_000_000


@pytest.fixture(scope="session")
def control_stack(tmp_path_factory: pytest.TempPathFactory, hub: HubServer) -> Iterator[Stack]:
    """Redis, control plane and data plane; no worker. The shared tier's size limit is 1 MB."""
    env = (("HF_ENDPOINT", hub.url), ("LORAPLANE_TIER_SHARED_MAX_BYTES", str(CONTROL_STACK_MAX_BYTES)))
    yield from running_stack(tmp_path_factory.mktemp("control-stack"), with_worker=False, env=env)


# The second worker's vLLM takes LoRA ranks up to 32 only (the catalog allows 64): a worker
# on which some adapters fail to load, as in a fleet whose nodes are configured unevenly.
SECOND_WORKER_MAX_RANK = 32
REPLICATE_AT_IN_FLIGHT = 4


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole embedded stack with two real vLLM workers and two control plane replicas:
    the first agent is connected to the first replica; the second agent and the data plane
    to the second. An adapter with more than REPLICATE_AT_IN_FLIGHT requests in flight per
    worker holding it gets another copy."""
    second = WorkerSpec(
        free_port(),
        env=(("LORAPLANE_VLLM_ARGS", " ".join([*vllm_args(), "--max-lora-rank", str(SECOND_WORKER_MAX_RANK)])),),
    )
    env = (("LORAPLANE_REPLICATE_AT_IN_FLIGHT", str(REPLICATE_AT_IN_FLIGHT)),)
    yield from running_stack(
        tmp_path_factory.mktemp("full-stack"), with_worker=True, env=env, replicas=2, extra_workers=(second,)
    )


@dataclass
class SimStack:
    stack: Stack
    sim_url: str  # tiny-llama's simulated worker
    embed_sim_url: str  # tiny-embed's (an embedding model)

    def state(self, url: str = "") -> dict[str, Any]:
        body: dict[str, Any] = httpx.get((url or self.sim_url) + "/sim/state", timeout=5).json()
        return body


@pytest.fixture(scope="session")
def sim_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimStack]:
    """The whole stack with agents attached to vLLM simulators instead of vLLMs: one for
    tiny-llama, one for tiny-embed (an embedding model). For the data plane's own behaviour
    (cancellation, limits, retries, every endpoint), fast and deterministic."""
    sims = []
    try:
        sim, url, _ = start_simulator("tiny-llama")
        sims.append(sim)
        embed_sim, embed_url, embed_port = start_simulator("tiny-embed")
        sims.append(embed_sim)
        embed_worker = WorkerSpec(
            embed_port, env=(("LORAPLANE_BASE_MODEL", "tiny-embed"), ("LORAPLANE_VLLM_URL", embed_url))
        )
        for stack in running_stack(
            tmp_path_factory.mktemp("sim-stack"),
            with_worker=True,
            env=(("LORAPLANE_VLLM_URL", url),),
            extra_workers=(embed_worker,),
            extra_models=(("tiny-embed", "embedding"),),
        ):
            yield SimStack(stack, url, embed_url)
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait(10)


def new_tenant(stack: Stack, name: str) -> str:
    return stack.operator().create_tenant(name).api_key


def upload(
    stack: Stack, key: str, name: str, data: bytes, config: bytes | None = None, **fields: str
) -> httpx.Response:
    """POST /v1/adapters/upload as httpx sends multipart forms."""
    files = {"file": ("adapter_model.safetensors", data)}
    if config is not None:
        files["config"] = ("adapter_config.json", config)
    return httpx.post(
        stack.http_url + "/v1/adapters/upload",
        headers={"Authorization": f"Bearer {key}"},
        data={"name": name, "base_model": "tiny-llama", **fields},
        files=files,
        timeout=60,
    )


def curl_upload(stack: Stack, key: str, directory: Path) -> dict[str, object]:
    """The README's curl upload, run as written but for host and key, in `directory`."""
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{stack.http_url}/v1/adapters/upload", "-H", f"Authorization: Bearer {key}",
         "-F", "name=my-finetuned-v3", "-F", "base_model=tiny-llama", "-F", "file=@adapter_model.safetensors"],
        cwd=directory, capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    adapter: dict[str, object] = json.loads(out)
    return adapter


def grpc_upload(addr: str, key: str, name: str, data: bytes, send_metadata: bool = True) -> adapter_pb2.Adapter:
    """AdapterService/UploadAdapter as a gRPC caller uses it: bytes, then the metadata."""

    def messages() -> Iterator[adapter_pb2.UploadAdapterRequest]:
        for i in range(0, len(data), 4096):
            yield adapter_pb2.UploadAdapterRequest(chunk=data[i : i + 4096])
        if send_metadata:
            yield adapter_pb2.UploadAdapterRequest(
                metadata=adapter_pb2.UploadAdapterMetadata(name=name, base_model="tiny-llama")
            )

    with grpc.insecure_channel(addr) as ch:
        resp = adapter_pb2_grpc.AdapterServiceStub(ch).UploadAdapter(
            messages(), metadata=(("authorization", f"Bearer {key}"),), timeout=30
        )
    adapter: adapter_pb2.Adapter = resp.adapter
    return adapter
