"""Two control plane replicas in this process, sharing a real Redis: a placement decided on one
for a worker whose agent holds its stream to the other is carried out there, with the peer token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis

from controlplane import server
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import admin_pb2 as adpb
from loraplane.controlplane.v1 import admin_pb2_grpc, worker_pb2_grpc
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.controlplane.test_store import record
from tests.support import RedisServer, free_port, wait_for

AGENT, PEER = "a" * 32, "p" * 32
# Each replica its own operator token: what one replica forwards to another opens the door with
# the peer token alone.
OPERATORS = ("o" * 32, "O" * 32)


@pytest.fixture
async def replicas(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[list[server.ControlPlane]]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    await client.aclose()
    Catalog.write(tmp_path / "catalog.json", [{"name": "tiny-llama", "path": str(tmp_path), "lora": False}])
    planes = []
    for name, operator in zip(("one", "two"), OPERATORS, strict=True):
        env = {
            "LORAPLANE_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "LORAPLANE_REDIS_URL": redis_server.url,
            "LORAPLANE_ARTIFACT_DIR": str(tmp_path / name),
            "LORAPLANE_CATALOG": str(tmp_path / "catalog.json"),
            "LORAPLANE_OPERATOR_TOKEN": operator,
            "LORAPLANE_AGENT_TOKEN": AGENT,
            "LORAPLANE_PEER_TOKEN": PEER,
            "LORAPLANE_METRICS_ADDR": "",
            "LORAPLANE_HEARTBEAT_TIMEOUT_S": "60",  # the fake agent sends none
        }
        planes.append(await server.start(Settings.from_env(env)))
    yield planes
    for plane in planes:
        await plane.stop(0)


async def eventually(check: Callable[[], Coroutine[Any, Any, bool]], within_s: float, what: str) -> None:
    """`wait_for` over an async check on this loop (polled from a thread, so the loop runs on)."""
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(wait_for, lambda: asyncio.run_coroutine_threadsafe(check(), loop).result(), within_s, what)


async def agent(addr: str, worker_id: str, held: set[str]) -> None:
    """An agent that answers every command as vLLM would, holding `held`."""
    outgoing: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
    register = pb.Register(worker_id=worker_id, base_model="tiny-llama", endpoint="http://w", max_adapters=4)
    outgoing.put_nowait(pb.ConnectRequest(register=register))

    async def requests() -> AsyncIterator[pb.ConnectRequest]:
        while True:
            yield await outgoing.get()

    async with grpc.aio.insecure_channel(addr) as channel:
        stream = worker_pb2_grpc.WorkerServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {AGENT}"),)
        )
        async for msg in stream:
            command = msg.load if msg.HasField("load") else msg.evict
            if msg.HasField("load"):
                held.add(msg.load.adapter_id)
            else:
                held.discard(msg.evict.vllm_name)
            result = pb.CommandResult(command_id=command.command_id, ok=True, duration_ms=5, resident=sorted(held))
            outgoing.put_nowait(pb.ConnectRequest(result=result))


async def test_a_placement_decided_on_one_replica_is_carried_out_by_the_other(
    replicas: list[server.ControlPlane], redis_server: RedisServer
) -> None:
    one, two = (f"127.0.0.1:{p.port}" for p in replicas)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    adapter = record("ten_peers", "a1")
    await store.create_adapter(adapter, 20)
    held: set[str] = set()
    connected = asyncio.create_task(agent(one, "w-one", held))

    async def registered() -> bool:
        worker = await store.get_worker("w-one")
        return worker is not None and worker.owner == one

    await eventually(registered, 10, "the agent never registered with the first replica")
    operator = (("authorization", f"Bearer {OPERATORS[1]}"),)
    async with grpc.aio.insecure_channel(two) as channel:  # the replica that holds no agent
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        loaded = await admin.ForceLoadAdapter(
            adpb.ForceLoadAdapterRequest(adapter_id=adapter.id), metadata=operator, timeout=10
        )
        assert (loaded.worker_id, loaded.already_loaded, held) == ("w-one", False, {adapter.id})
        evicted = await admin.ForceEvictAdapter(
            adpb.ForceEvictAdapterRequest(adapter_id=adapter.id), metadata=operator, timeout=10
        )
        assert (list(evicted.worker_ids), held) == (["w-one"], set())
    connected.cancel()

    async def detached() -> bool:  # the replica is done with the stream (and with Redis for it)
        worker = await store.get_worker("w-one")
        return worker is not None and not worker.owner

    await eventually(detached, 10, "the first replica never noticed the agent leave")
    await client.aclose()
