"""LoRA slots that leak (`workeragent/slots.py`): a vLLM that answers an unload with success and
drops the adapter from /v1/models but keeps its slot. How a refused load is judged; then an agent
against the vLLM simulator in leak mode and a real control plane: the refused load fails (the
control plane places the adapter elsewhere), an engine the agent started is recycled once its
requests in flight finish and gets its adapters back, and one it attached to is reported and
kept out of service until it is seen restarted."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
import redis.asyncio as redis

from loraplane import metrics, tinymodel
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import tenant_pb2
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.operator import Operator
from tests.conftest import grpc_upload
from tests.controlplane.test_service import AGENT, OPERATOR, start_control_plane
from tests.support import (
    ROOT,
    RedisServer,
    free_port,
    lora_tensors,
    metric,
    safetensors_bytes,
    start_simulator,
    wait_for,
    with_metadata,
)
from workeragent.agent import Agent
from workeragent.settings import Settings
from workeragent.slots import NO_FREE_SLOT, Ledger
from workeragent.vllm import parse_max_loras

SLOTS = 2  # the catalog's LoRA slots per worker (the simulator's --max-loras)
WORKER = "w-slots"
T = TypeVar("T")


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        ('/v1/load_lora_adapter answered 500: {"error": {"message": "No free adapter slots."}}', True),
        ("/v1/load_lora_adapter answered 400: no free LoRA slot (max_loras=2)", True),  # the simulator's
        ("No free lora slots", True),
        ("Number of requested LoRAs (9) is greater than the number of GPU LoRA slots (8).", False),
        ("The lora adapter 'a' has already been loaded.", False),
    ],
)
def test_a_refusal_for_want_of_a_slot_is_told_by_its_words(error: str, refused: bool) -> None:
    assert bool(NO_FREE_SLOT.search(error)) == refused


def test_the_installed_vllms_words_are_the_ones_known() -> None:
    """If this fails, vLLM words a load refused for want of a slot differently: change NO_FREE_SLOT."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    source = (Path(spec.submodule_search_locations[0]) / "lora" / "model_manager.py").read_text()
    words = re.findall(r"Error\(\s*\"(No free[^\"]*)\"", source)
    assert words and all(NO_FREE_SLOT.search(w) for w in words), words


def test_vllms_slots_are_read_from_its_metrics_page() -> None:
    page = 'vllm:lora_requests_info{max_lora="8",running_lora_adapters="a",waiting_lora_adapters=""} 1.7e+09\n'
    assert parse_max_loras(page) == 8
    assert parse_max_loras("vllm:num_requests_running 0.0\n") is None  # before the engine's first step


def test_a_refused_load_is_judged_alone_only_if_no_other_load_or_unload_ran_meanwhile() -> None:
    ledger = Ledger()
    with ledger.change() as alone:
        assert alone()
    with ledger.change() as first, ledger.change() as second:  # both running at once
        assert not first() and not second()
    with ledger.change() as alone:
        with ledger.change():  # one started and ended while this one ran
            pass
        assert not alone()
    with ledger.change() as alone:
        assert alone()  # what ran before this one began does not matter


ADAPTER = safetensors_bytes(lora_tensors(rank=4))


@dataclass
class Worker:
    """An agent in this process, its engine (the simulator) and a real control plane; a tenant."""

    agent: Agent
    operator: Operator
    addr: str  # the control plane's
    url: str  # the simulator's
    key: str = ""

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call (the control plane runs on this loop)."""
        return await asyncio.to_thread(fn, *args)

    async def until(self, done: Callable[[], bool], within_s: float, what: str) -> float:
        return await asyncio.to_thread(wait_for, done, within_s, what)

    def worker(self) -> pb.Worker:
        (w,) = self.operator.list_workers().workers
        return w

    def sim(self) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.url + "/sim/state", timeout=5).json()
        return state

    def metric(self, name: str, **labels: str) -> float:
        return metric([_page(self.agent)], name, **labels)

    async def upload(self, name: str) -> str:
        data = with_metadata(ADAPTER, {"variant": name})
        return (await self.call(grpc_upload, self.addr, self.key, name, data)).id

    async def leak_one(self, adapter_id: str) -> None:
        """The adapter loaded, then unloaded through the agent with its slot kept."""
        await self.call(self.operator.force_load, adapter_id, WORKER)
        async with httpx.AsyncClient() as client:
            assert (await client.post(self.url + "/sim/leak", json={"unloads": 1})).status_code == 200
        await self.call(self.operator.force_evict, adapter_id, WORKER)


def _page(agent: Agent) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in metrics.render(agent.metrics).decode().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            pairs = (p.split("=", 1) for p in labels.rstrip("}").split(",") if p)
            out[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


@contextlib.asynccontextmanager
async def running(redis_server: RedisServer, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Worker]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    await client.aclose()
    catalog = tmp_path / "lora-catalog.json"
    # the tiny model's shape inline: adapters are validated against it; the simulator needs no weights
    Catalog.write(catalog, [{"name": "tiny-llama", "kind": "chat", "path": str(tmp_path), "lora": True,
                             "architecture": dict(tinymodel.DIMENSIONS), "max_rank": 64,
                             "max_adapters_per_worker": SLOTS}])  # fmt: skip
    cp = await start_control_plane(redis_server.url, tmp_path, LORAPLANE_CATALOG=str(catalog))
    addr = f"127.0.0.1:{cp.port}"
    port = free_port()
    settings = Settings.from_env(
        {
            "LORAPLANE_CONTROLPLANE_ADDR": addr,
            "LORAPLANE_AGENT_TOKEN": AGENT,
            "LORAPLANE_WORKER_ID": WORKER,
            "LORAPLANE_CATALOG": str(catalog),
            "LORAPLANE_CACHE_DIR": str(tmp_path / "cache"),
            "LORAPLANE_VLLM_PORT": str(port),
            "LORAPLANE_METRICS_ADDR": "",
            "LORAPLANE_HEARTBEAT_S": "0.5",
            "LORAPLANE_DRAIN_TIMEOUT_S": "20",
            **env,
        }
    )
    agent = Agent(settings, Catalog.load(catalog))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    w = Worker(agent, Operator(addr, OPERATOR), addr, settings.vllm_url or f"http://127.0.0.1:{port}")
    try:
        await w.until(lambda: [x.healthy for x in w.operator.list_workers().workers] == [True], 30, "never served")
        w.key = (await w.call(w.operator.create_tenant, "leaky", tenant_pb2.TIER_RESERVED)).api_key
        yield w
    finally:
        stop.set()
        await task
        # the control plane has written the worker down (its stream's end) before it stops
        gone = lambda: [x.healthy for x in w.operator.list_workers().workers] == [False]  # noqa: E731
        await w.until(gone, 10, "the control plane missed the agent leaving")
        await cp.stop(0)


async def stream(url: str, model: str, tokens: int, per_s: float) -> str:
    """A completion streamed from the engine itself, whole: its body."""
    body = {"model": model, "prompt": "x", "max_tokens": tokens, "stream": True, "sim_tokens_per_s": per_s}
    async with httpx.AsyncClient(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return "".join([chunk async for chunk in r.aiter_text()])


async def test_an_engine_the_agent_started_is_recycled_once_its_requests_finish(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    command = f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'}"
    async with running(redis_server, tmp_path, {"LORAPLANE_VLLM_COMMAND": command}) as w:
        engine = w.agent.engine
        assert engine is not None
        a, b = await w.upload("a"), await w.upload("b")
        await w.leak_one(a)
        await w.call(w.operator.force_load, b, WORKER)
        assert (w.sim()["adapters"], w.sim()["leaked"]) == ([b], 1)  # 1 listed, 2 slots taken

        in_flight = asyncio.create_task(stream(w.url, b, tokens=20, per_s=10))  # 2 s
        await w.until(lambda: w.sim()["running"] == 1, 10, "the stream never started")
        group = engine.group
        with pytest.raises(grpc.RpcError) as refused:
            await w.call(w.operator.force_load, a, WORKER)
        detected = time.monotonic()
        assert "LoRA slots leaked" in (refused.value.details() or "")
        await w.until(lambda: w.worker().engine_state == "recycling", 5, "the worker was not reported recycling")
        worker = await w.call(w.worker)
        assert not worker.healthy and worker.engine_last_error.startswith("LoRA slots leaked")

        body = await in_flight  # whole: the engine was not restarted while it ran
        assert body.count('"text":"tok "') == 20 and body.endswith("data: [DONE]\n\n")
        drained = time.monotonic() - detected

        def serving_again() -> bool:
            w_ = w.worker()
            return w_.healthy and w_.engine_state == "serving" and engine.group != group

        await w.until(serving_again, 30, "the recycled engine never served again")
        serving = time.monotonic() - detected
        await w.until(lambda: w.sim()["adapters"] == [b], 30, "the control plane did not load b back")
        reloaded = time.monotonic() - detected
        assert w.sim()["leaked"] == 0
        print(f"drained {drained:.2f} s, serving {serving:.2f} s, reloaded {reloaded:.2f} s after the refused load")

        assert w.metric("loraplane_worker_slot_leaks_total", worker=WORKER) == 1
        assert w.metric("loraplane_worker_engine_restarts_total", reason="recycled") == 1
        assert (await w.call(w.worker)).engine_restarts == 1
        await w.call(w.operator.force_load, a, WORKER)  # both slots free again
        assert w.sim()["adapters"] == sorted([a, b])


async def test_an_attached_vllm_that_leaks_is_kept_out_of_service_until_it_restarts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sim, url, port = start_simulator("tiny-llama", "--max-loras", str(SLOTS))
    sims: list[subprocess.Popen[bytes]] = [sim]
    try:
        async with running(redis_server, tmp_path, {"LORAPLANE_VLLM_URL": url}) as w:
            a, b = await w.upload("a"), await w.upload("b")
            await w.leak_one(a)
            await w.call(w.operator.force_load, b, WORKER)
            with pytest.raises(grpc.RpcError) as refused:
                await w.call(w.operator.force_load, a, WORKER)
            assert "LoRA slots leaked" in (refused.value.details() or "")
            await w.until(lambda: w.worker().engine_state == "slots_leaked", 5, "the leak was not reported")
            worker = await w.call(w.worker)
            assert not worker.healthy
            assert worker.engine_last_error.endswith("restart this vLLM")
            assert w.metric("loraplane_worker_slot_leaks_total", worker=WORKER) == 1

            await asyncio.sleep(1.5)  # three heartbeats: still out, and nobody restarted it
            worker = await w.call(w.worker)
            assert (worker.engine_state, worker.healthy) == ("slots_leaked", False)
            assert sim.poll() is None and w.sim()["leaked"] == 1

            sim.kill()
            sim.wait()
            await w.until(lambda: w.worker().engine_state == "down", 10, "the agent never saw its vLLM gone")
            sim, _, _ = await asyncio.to_thread(start_simulator, "tiny-llama", "--max-loras", str(SLOTS), port=port)
            sims.append(sim)
            await w.until(lambda: w.worker().healthy, 10, "the restarted vLLM is not served")
            await w.until(lambda: w.sim()["adapters"] == [b], 30, "the control plane did not load b back")
            await w.call(w.operator.force_load, a, WORKER)
    finally:
        for s in sims:
            s.kill()
            s.wait()
