"""Placement orchestration on this replica's workers, against a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from controlplane.peers import Peers
from controlplane.placer import Placer
from controlplane.sessions import Sessions
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.controlplane.test_store import record
from tests.support import RedisServer


async def test_concurrent_placements_on_a_full_worker_evict_different_adapters(redis_server: RedisServer) -> None:
    """Two cold adapters placed at once on a full worker: each evicts its own victim, and the
    worker never holds more than its slots (the same victim chosen twice loaded one too many)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    sessions = Sessions(store, "cp-test", 5, 10)
    placer = Placer(store, sessions, Peers("t" * 32, 5), 30.0)
    old = [record("ten_race", f"old{i}") for i in range(3)]
    new = [record("ten_race", f"new{i}") for i in range(2)]
    register = pb.Register(worker_id="race-w", base_model="tiny-llama", endpoint="http://w", max_adapters=3,
                           resident=[a.id for a in old])  # fmt: skip
    session = await sessions.attach(register)
    held, most, evicted = {a.id for a in old}, 3, []

    async def agent() -> None:  # answers like vLLM, slowly enough for the two placements to overlap
        nonlocal most
        while True:
            msg = await session.outbox.get()
            await asyncio.sleep(0.05)
            command = msg.load if msg.HasField("load") else msg.evict
            if msg.HasField("load"):
                held.add(msg.load.adapter_id)
            else:
                evicted.append(msg.evict.vllm_name)
                held.discard(msg.evict.vllm_name)
            most = max(most, len(held))
            session.resolve(pb.CommandResult(command_id=command.command_id, ok=True, resident=sorted(held)))

    answering = asyncio.create_task(agent())
    placed = await asyncio.gather(*(placer.place(a) for a in new))
    answering.cancel()
    assert [p.worker_id for p in placed] == ["race-w", "race-w"]
    assert len(set(evicted)) == 2 and most == 3, (evicted, most)
    await client.aclose()
