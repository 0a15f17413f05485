"""The host-memory tier on the agent's side (issue 19): a catalog's `max_cpu_loras`, the vLLM it
starts with `--max-cpu-loras`, what it registers (`max_adapters`: loaded at once, `gpu_slots`: of
those in LoRA slots), the adapters on its node's disk cache in every heartbeat (`cached`), and a
refused load judged a slot leak against what vLLM holds loaded at once. The agent runs against a
fake control plane (a gRPC WorkerService in this process that records what the agent says and
sends it commands) and the vLLM simulator it starts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest

from loraplane import metrics
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.controlplane.v1 import worker_pb2_grpc
from tests.support import ROOT, free_port
from workeragent.agent import Agent
from workeragent.cache import ArtifactCache
from workeragent.settings import Settings
from workeragent.slots import judge
from workeragent.vllm import VllmClient, VllmError, engine_command

# --- the catalog ----------------------------------------------------------------------------------


def load_catalog(tmp_path: Path, **entry: object) -> Catalog:
    path = tmp_path / "catalog.json"
    Catalog.write(path, [{"name": "m", "kind": "chat", "path": str(tmp_path), "lora": False,
                          "max_adapters_per_worker": 8, **entry}])  # fmt: skip
    return Catalog.load(path)


@pytest.mark.parametrize(("given", "max_cpu_loras", "host_slots"), [(None, 0, 8), (0, 0, 8), (8, 8, 8), (32, 32, 32)])
def test_a_catalog_entry_gives_a_host_memory_tier_or_none(
    tmp_path: Path, given: int | None, max_cpu_loras: int, host_slots: int
) -> None:
    model = load_catalog(tmp_path, **({} if given is None else {"max_cpu_loras": given})).models["m"]
    assert (model.max_cpu_loras, model.host_slots, model.max_adapters_per_worker) == (max_cpu_loras, host_slots, 8)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (4, "catalog: m: max_cpu_loras (4) must be at least max_adapters_per_worker (8): "),
        (-1, "catalog: m: max_cpu_loras must be 0 or a whole number of adapters"),
        ("16", "catalog: m: max_cpu_loras must be 0 or a whole number of adapters"),
        (2.5, "catalog: m: max_cpu_loras must be 0 or a whole number of adapters"),
        (True, "catalog: m: max_cpu_loras must be 0 or a whole number of adapters"),
    ],
)
def test_a_host_memory_tier_smaller_than_the_slots_is_refused_at_load(
    tmp_path: Path, given: object, error: str
) -> None:
    """vLLM refuses `--max-cpu-loras` below `--max-loras`: a worker would never start."""
    with pytest.raises(ValueError, match="^" + re.escape(error)):
        load_catalog(tmp_path, max_cpu_loras=given)


# --- the vLLM command -----------------------------------------------------------------------------


def command(max_loras: int, max_cpu_loras: int | None = None) -> list[str]:
    """The command, with `max_cpu_loras` if given (else the parameter's default)."""
    args = (("vllm",), "/models/m", "m", "127.0.0.1", 8100, max_loras, 64, ())
    if max_cpu_loras is None:
        return engine_command(*args)
    return engine_command(*args, max_cpu_loras=max_cpu_loras)


def test_vllm_gets_max_cpu_loras_only_with_a_host_memory_tier() -> None:
    without = command(8)
    assert "--max-cpu-loras" not in without
    assert command(8, max_cpu_loras=0) == without == command(8, max_cpu_loras=8)  # no tier: vLLM's default
    args = command(8, max_cpu_loras=32)
    at = args.index("--max-loras")
    assert args[at : at + 4] == ["--max-loras", "8", "--max-cpu-loras", "32"]
    assert [a for a in args if a not in ("--max-cpu-loras", "32")] == without


# --- a refused load, judged -----------------------------------------------------------------------


@dataclass
class Listing:
    """The two things `judge` asks vLLM: what it lists, and its slots."""

    listed: int
    slots: int

    async def resident(self) -> list[str]:
        return [f"a{i}" for i in range(self.listed)]

    async def max_loras(self) -> int:
        return self.slots


NO_SLOT = VllmError("/v1/load_lora_adapter answered 500: No free lora slots")


async def test_a_refused_load_proves_a_leak_while_vllm_lists_fewer_than_it_holds_loaded() -> None:
    """2 slots and 6 adapters in host memory: vLLM listing 4 frees a slot for a 5th by
    deactivating one (its LRU), so a refusal proves slots leaked although it lists more adapters
    than it has slots. Without a tier, 4 listed in 2 slots proves nothing."""
    vllm = cast(VllmClient, Listing(listed=4, slots=2))
    leak = await judge(NO_SLOT, vllm, 2, lambda: True, capacity=6)
    assert leak is not None and (leak.listed, leak.slots, leak.capacity, leak.leaked) == (4, 2, 6, 1)
    assert str(leak).startswith("LoRA slots leaked: vLLM refused a load for lack of a free slot while it lists 4 of ")
    assert "2 in slots, the others in host memory" in str(leak)
    assert await judge(NO_SLOT, vllm, 2, lambda: True) is None
    assert await judge(NO_SLOT, cast(VllmClient, Listing(6, 2)), 2, lambda: True, capacity=6) is None  # it is full
    assert await judge(NO_SLOT, vllm, 2, lambda: False, capacity=6) is None  # another load ran meanwhile
    # without a tier, the words are as they were
    leak = await judge(NO_SLOT, cast(VllmClient, Listing(1, 2)), 2, lambda: True, capacity=2)
    assert leak is not None and str(leak).endswith("adapters in 1 of its 2 slots (1 taken by adapters it unloaded)")


# --- an agent, its engine and a fake control plane ------------------------------------------------


class FakeControlPlane(worker_pb2_grpc.WorkerServiceServicer):
    """Records the agent's Register and heartbeats, sends it commands, and serves artifacts."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.registers: list[pb.Register] = []
        self.beats: list[pb.Heartbeat] = []
        self.results = 0  # command results received
        self._outbox: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[pb.CommandResult]] = {}

    async def Connect(  # noqa: N802 (the servicer's name)
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ConnectResponse]:
        first = await anext(aiter(request_iterator))
        self.registers.append(first.register)
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while True:
                yield await self._outbox.get()
        finally:
            reader.cancel()

    async def _read(self, requests: AsyncIterator[pb.ConnectRequest]) -> None:
        async for msg in requests:
            if msg.HasField("heartbeat"):
                self.beats.append(msg.heartbeat)
            elif msg.HasField("result"):
                self.results += 1
                fut = self._waiting.pop(msg.result.command_id, None)
                if fut is not None:
                    fut.set_result(msg.result)

    async def FetchArtifact(  # noqa: N802
        self, request: pb.FetchArtifactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.FetchArtifactResponse]:
        data = self.blobs[request.sha256]
        end = request.offset + request.length if request.length else len(data)
        for i in range(request.offset, end, 1 << 20):
            yield pb.FetchArtifactResponse(chunk=data[i : min(end, i + (1 << 20))])

    async def command(self, msg: pb.ConnectResponse) -> pb.CommandResult:
        kind = msg.WhichOneof("msg")
        assert kind is not None
        cid = getattr(msg, kind).command_id
        fut: asyncio.Future[pb.CommandResult] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        await self._outbox.put(msg)
        result = await asyncio.wait_for(fut, 30)
        assert result.ok, result.error
        return result


async def until(done: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


@dataclass
class Node:
    agent: Agent
    cp: FakeControlPlane
    url: str  # the simulator's
    generation: int = 0

    async def sim(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            state: dict[str, Any] = (await client.get(self.url + "/sim/state", timeout=5)).json()
            return state

    async def beat_after(self) -> pb.Heartbeat:
        """The first heartbeat measured after every command result so far (and sent after now)."""
        done, seen = self.cp.results, len(self.cp.beats)
        await until(lambda: any(b.commands_done >= done for b in self.cp.beats[seen:]), 10, "no heartbeat came")
        return next(b for b in self.cp.beats[seen:] if b.commands_done >= done)

    async def load(self, name: str) -> None:
        self.generation += 1
        data = self.cp.blobs[sha(name)]
        cmd = pb.LoadAdapter(command_id=uuid.uuid4().hex, adapter_id=name, vllm_name=name, sha256=sha(name),
                             size_bytes=len(data), adapter_config=b"{}", generation=self.generation)  # fmt: skip
        await self.cp.command(pb.ConnectResponse(load=cmd))

    async def evict(self, name: str) -> None:
        self.generation += 1
        cmd = pb.EvictAdapter(command_id=uuid.uuid4().hex, vllm_name=name, generation=self.generation)
        await self.cp.command(pb.ConnectResponse(evict=cmd))

    async def prefetch(self, name: str, named: bool = False) -> None:
        """`named`: the command names the adapter (a control plane of this version); else only its bytes."""
        data = self.cp.blobs[sha(name)]
        cmd = pb.PrefetchArtifact(command_id=uuid.uuid4().hex, sha256=sha(name), size_bytes=len(data),
                                  vllm_name=name if named else "")  # fmt: skip
        await self.cp.command(pb.ConnectResponse(prefetch=cmd))


BLOB = 1000  # bytes of each adapter's weights (the simulator does not read them)
BLOBS = {name: name.encode() * BLOB for name in ("a", "b")}


def sha(name: str) -> str:
    return hashlib.sha256(BLOBS[name]).hexdigest()


@contextlib.asynccontextmanager
async def node(tmp_path: Path, slots: int, max_cpu_loras: int | None, **env: str) -> AsyncIterator[Node]:
    """An agent starting the simulator for a catalog entry with these slots (and host-memory
    tier), connected to a fake control plane, once it has registered and sent a healthy beat."""
    catalog = tmp_path / "catalog.json"
    tier = {} if max_cpu_loras is None else {"max_cpu_loras": max_cpu_loras}
    Catalog.write(catalog, [{"name": "tiny-llama", "kind": "chat", "path": str(tmp_path), "lora": False,
                             "max_adapters_per_worker": slots, **tier}])  # fmt: skip
    cp = FakeControlPlane({sha(n): data for n, data in BLOBS.items()})
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(cp, server)
    port = server.add_insecure_port("127.0.0.1:0")
    vllm_port = free_port()
    settings = Settings.from_env(
        {
            "LORAPLANE_CONTROLPLANE_ADDR": f"127.0.0.1:{port}",
            "LORAPLANE_AGENT_TOKEN": "agent-token-of-this-test",
            "LORAPLANE_WORKER_ID": "w-host",
            "LORAPLANE_CATALOG": str(catalog),
            "LORAPLANE_CACHE_DIR": str(tmp_path / "cache"),
            "LORAPLANE_VLLM_PORT": str(vllm_port),
            "LORAPLANE_VLLM_COMMAND": f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'}",
            "LORAPLANE_METRICS_ADDR": "",
            "LORAPLANE_HEARTBEAT_S": "0.2",
            **env,
        }
    )
    agent = Agent(settings, Catalog.load(catalog))
    stop = asyncio.Event()
    await server.start()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: any(b.healthy for b in cp.beats), 60, "the agent's engine never served")
        yield Node(agent, cp, f"http://127.0.0.1:{vllm_port}")
    finally:
        stop.set()
        await task
        await server.stop(0)


def gauges(agent: Agent) -> dict[str, float]:
    """The agent's gauges of its worker, by name."""
    out = {}
    for line in metrics.render(agent.metrics).decode().splitlines():
        if line.startswith("loraplane_worker_lora_"):
            series, _, value = line.rpartition(" ")
            out[series.partition("{")[0]] = float(value)
    return out


@pytest.mark.parametrize(("slots", "max_cpu_loras", "registered"), [(2, None, (2, 2)), (1, 3, (3, 1))])
async def test_the_agent_starts_vllm_with_its_host_memory_tier_and_registers_both_counts(
    tmp_path: Path, slots: int, max_cpu_loras: int | None, registered: tuple[int, int]
) -> None:
    """`max_adapters`: the adapters the worker holds loaded at once (vLLM's --max-cpu-loras, its
    slots without a tier); `gpu_slots`: its LoRA slots (--max-loras)."""
    async with node(tmp_path, slots, max_cpu_loras) as n:
        (register,) = n.cp.registers
        assert (register.max_adapters, register.gpu_slots) == registered
        state = await n.sim()
        assert (state["max_cpu_loras"], state["max_loras"]) == registered  # what vLLM was started with
        assert n.agent.engine is not None
        assert ("--max-cpu-loras" in n.agent.engine.args) == (max_cpu_loras is not None)
        assert gauges(n.agent) == {
            "loraplane_worker_lora_slots_used": 0,
            "loraplane_worker_lora_slots": registered[1],
            "loraplane_worker_lora_host_slots_used": 0,
            "loraplane_worker_lora_host_slots": registered[0],
        }


async def test_heartbeats_list_the_adapters_on_the_node_cache_that_vllm_does_not_hold(tmp_path: Path) -> None:
    """Room on the node's disk for one adapter's bytes unless loaded adapters keep more. An
    adapter evicted is on disk (cached); its bytes deleted to make room for another's, it is not;
    prefetched again, it is; loaded, it is resident, not cached."""
    async with node(tmp_path, 1, 3, LORAPLANE_CACHE_MAX_BYTES=str(BLOB + BLOB // 2)) as n:
        assert (await n.beat_after()).cached == []
        await n.load("a")
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == (["a"], [])

        await n.evict("a")
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == ([], ["a"])  # its bytes stay on the node

        await n.load("b")  # b's bytes take the room: a's go
        assert not (tmp_path / "cache" / "blobs" / sha("a")).exists()
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == (["b"], [])

        await n.prefetch("a")  # back on the node, not loaded
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == (["b"], ["a"])

        await n.load("a")  # loaded: resident only
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == (["a", "b"], [])
        assert gauges(n.agent)["loraplane_worker_lora_host_slots_used"] == 2
        assert gauges(n.agent)["loraplane_worker_lora_slots_used"] == 1  # one slot: the other in host memory
        assert (await n.sim())["host"] == ["b", "a"]


async def test_an_adapter_prefetched_before_any_load_is_listed_as_cached(tmp_path: Path) -> None:
    """The prefetch names the adapter: placement can prefer this node before the adapter was ever
    loaded anywhere (what a prefetch is for)."""
    async with node(tmp_path, 1, 3) as n:
        await n.prefetch("a", named=True)
        beat = await n.beat_after()
        assert (list(beat.resident), list(beat.cached)) == ([], ["a"])


async def test_the_cache_lists_from_memory(tmp_path: Path) -> None:
    """`cached()` (called for every heartbeat) reads no file: it answers with the cache's
    directory gone."""

    async def nothing(sha256: str, offset: int, length: int) -> AsyncGenerator[bytes]:
        yield b""

    cache = ArtifactCache(tmp_path / "c", nothing)
    data = b"x" * 10
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "c" / "blobs" / digest).write_bytes(data)  # found on disk: verified at its first use
    assert cache.cached() == []
    await cache.adapter_dir("a", digest, len(data), json.dumps({}).encode())
    await cache.adapter_dir("b", digest, len(data), json.dumps({}).encode())  # the same bytes
    cache.forget("a")
    shutil.rmtree(tmp_path / "c")
    assert cache.cached() == ["a", "b"] and cache.cached(exclude=["b"]) == ["a"]
