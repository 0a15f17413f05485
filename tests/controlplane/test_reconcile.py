"""Desired-state reconcile of one worker, against a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from controlplane.reconcile import Reconciler
from controlplane.sessions import Sessions
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.controlplane.test_store import record
from tests.support import RedisServer


async def test_a_worker_is_brought_to_its_desired_state_and_unknown_adapters_are_left_alone(
    redis_server: RedisServer,
) -> None:
    """Loads what it should hold and does not, evicts what it holds and should not; an adapter
    Redis has no record of is neither loaded (its intent is dropped) nor evicted."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    sessions = Sessions(store, "cp-test", 5, 10)
    missing, stale = record("ten_rec", "missing"), record("ten_rec", "stale")
    for rec in (missing, stale):
        await store.create_adapter(rec, 20)
    await store.desire("rec-w", missing.id)
    await store.desire("rec-w", "adp_gone")  # wanted, but Redis has no record of it
    held = {stale.id, "adp_unknown"}
    register = pb.Register(worker_id="rec-w", base_model="tiny-llama", endpoint="http://w", max_adapters=8,
                           resident=sorted(held))  # fmt: skip
    session = await sessions.attach(register)
    commands: list[str] = []

    async def agent() -> None:
        while True:
            msg = await session.outbox.get()
            command = msg.load if msg.HasField("load") else msg.evict
            if msg.HasField("load"):
                held.add(msg.load.adapter_id)
                commands.append(f"load {msg.load.adapter_id}")
            else:
                held.discard(msg.evict.vllm_name)
                commands.append(f"evict {msg.evict.vllm_name}")
            session.resolve(pb.CommandResult(command_id=command.command_id, ok=True, resident=sorted(held)))

    answering = asyncio.create_task(agent())
    Reconciler(store, sessions).converge(session)
    assert session.reconciling is not None
    await asyncio.wait_for(session.reconciling, 5)
    answering.cancel()
    assert commands == [f"load {missing.id}", f"evict {stale.id}"]
    assert session.record.resident == sorted({missing.id, "adp_unknown"})
    assert await store.desired("rec-w") == {missing.id}
    await client.aclose()
