from __future__ import annotations

import asyncio

import redis.asyncio as redis

from controlplane.fleet import Fleet
from controlplane.peers import Peers
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.controlplane.test_store import record
from tests.support import RedisServer


async def test_a_heartbeat_measured_before_an_applied_result_does_not_undo_it(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    fleet = Fleet(Store(client), 5, "cp-test", Peers("t" * 32, 5))
    register = pb.Register(worker_id="hb-w", base_model="m", endpoint="http://w", max_adapters=8, resident=["adp_x"])
    session = await fleet.attach(register)
    session.resolve(pb.CommandResult(command_id="c1", ok=True))  # an eviction's result...
    await fleet.report(session, [], healthy=True)  # ...applied: the worker holds nothing
    await fleet.heartbeat(session, ["adp_x"], True, [], 0, commands_done=0)  # measured before that result
    assert session.record.resident == []
    await fleet.heartbeat(session, ["adp_x"], True, [], 0, commands_done=1)  # measured after: believed
    assert session.record.resident == ["adp_x"]
    if session.reconciling:
        await asyncio.wait_for(session.reconciling, 5)
    await client.aclose()


async def test_concurrent_placements_on_a_full_worker_evict_different_adapters(redis_server: RedisServer) -> None:
    """Two cold adapters placed at once on a full worker: each evicts its own victim, and the
    worker never holds more than its slots (the same victim chosen twice loaded one too many)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    fleet = Fleet(store, 5, "cp-test", Peers("t" * 32, 5))
    old = [record("ten_race", f"old{i}") for i in range(3)]
    new = [record("ten_race", f"new{i}") for i in range(2)]
    register = pb.Register(worker_id="race-w", base_model="tiny-llama", endpoint="http://w", max_adapters=3,
                           resident=[a.id for a in old])  # fmt: skip
    session = await fleet.attach(register)
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
    placed = await asyncio.gather(*(fleet.place(a) for a in new))
    answering.cancel()
    assert [p[0] for p in placed] == ["race-w", "race-w"]
    assert len(set(evicted)) == 2 and most == 3, (evicted, most)
    await client.aclose()
