"""The reliability suite's stack: real processes it can kill, freeze and start again.

Redis runs on a TCP port with AOF (so it can be `kill -9`'d and restarted on the same port and
files); the two workers' engines are vLLM simulators (real processes speaking vLLM's HTTP API),
so a worker can be killed and back in a second. `LORAPLANE_RELIABILITY_LONG=1` (`make
reliability`) runs every fault longer and more often.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.stack import Stack, WorkerSpec
from tests.conftest import running_stack
from tests.support import (
    RedisServer,
    lora_tensors,
    metric,
    safetensors_bytes,
    scrape,
    start_simulator,
    wait_for,
    with_metadata,
)

SLOW_CLIENT_S = 2  # the data plane's header, body and upload-idle budgets here
QUOTA = 4  # the shared tier's adapters per tenant here, for the quota race; other tenants are "reserved"


@dataclass
class FaultStack:
    stack: Stack
    redis: RedisServer
    sims: list[subprocess.Popen[bytes]]  # worker i+1's engine
    sim_ports: list[int]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.stack.http_url

    def sim_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.sim_ports[i]}"

    def sim_state(self, i: int) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.sim_url(i) + "/sim/state", timeout=5).json()
        return state

    def kill_sim(self, i: int) -> None:
        self.sims[i].kill()
        self.sims[i].wait()

    def start_sim(self, i: int) -> None:
        self.sims[i], _, _ = start_simulator("tiny-llama", port=self.sim_ports[i])

    def tenant(self, name: str, tier: tenant_pb2.Tier = tenant_pb2.TIER_RESERVED) -> dict[str, str]:
        key = self.stack.operator().create_tenant(name, tier).api_key
        return {"Authorization": f"Bearer {key}"}

    def upload(self, headers: dict[str, str], name: str, variant: str = "", timeout: float = 30) -> httpx.Response:
        """An adapter whose bytes differ per `variant` (its safetensors metadata)."""
        data = safetensors_bytes(lora_tensors(rank=4))
        if variant:
            data = with_metadata(data, {"variant": variant})
        return httpx.post(
            self.url + "/v1/adapters/upload",
            headers=headers,
            data={"name": name, "base_model": "tiny-llama"},
            files={"file": ("adapter_model.safetensors", data)},
            timeout=timeout,
        )

    def chat(self, headers: dict[str, str], model: str, timeout: float = 30, **fields: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **fields}
        return httpx.post(self.url + "/v1/chat/completions", headers=headers, json=body, timeout=timeout)

    def wait_connected(self, within_s: float = 30, agents: int = 2) -> None:
        """Until the agents have a stream open to the control plane (the data plane's table may
        still show a worker whose agent is reconnecting: its record outlives the stream)."""
        page = self.stack.metrics_urls["controlplane"]
        wait_for(lambda: metric([scrape(page)], "loraplane_agents_connected", base_model="tiny-llama") == agents,
                 within_s, f"the agents did not reconnect within {within_s}s")  # fmt: skip

    def wait_serving(self, headers: dict[str, str], model: str, within_s: float) -> float:
        """Seconds until a chat through `model` succeeds again."""
        return wait_for(lambda: self.chat(headers, model, timeout=5).status_code == 200,
                        within_s, f"{model} is not served again within {within_s}s")  # fmt: skip


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    tmp = tmp_path_factory.mktemp("fault-stack")
    redis = RedisServer(tmp / "redis", aof=True)
    sims: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for _ in range(2):
            sim, _, port = start_simulator("tiny-llama")
            sims.append(sim)
            ports.append(port)
        env = (
            ("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{ports[0]}"),
            ("LORAPLANE_TIER_SHARED_MAX_ADAPTERS", str(QUOTA)),
            ("LORAPLANE_HEARTBEAT_TIMEOUT_S", "3"),
            ("LORAPLANE_HEADER_TIMEOUT_S", str(SLOW_CLIENT_S)),
            ("LORAPLANE_BODY_TIMEOUT_S", str(SLOW_CLIENT_S)),
            ("LORAPLANE_UPLOAD_IDLE_TIMEOUT_S", str(SLOW_CLIENT_S)),
            ("LORAPLANE_ORPHAN_GRACE_S", "3"),
            ("LORAPLANE_ORPHAN_SWEEP_S", "2"),
        )
        second = WorkerSpec(ports[1], env=(("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{ports[1]}"),))
        for stack in running_stack(tmp, with_worker=True, env=env, extra_workers=(second,), redis_url=redis.url):
            yield FaultStack(stack, redis, sims, ports)
    finally:
        for sim in sims:
            sim.kill()
            sim.wait()
        redis.stop()


def logs(stack: Stack) -> str:
    """Everything every component logged so far."""
    d = stack.config.log_dir
    assert d is not None
    return "\n".join(p.read_text(errors="replace") for p in sorted(Path(d).glob("*.log")))
