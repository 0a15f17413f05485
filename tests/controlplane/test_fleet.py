from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.fleet import Fleet
from controlplane.peers import Peers
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.state.records import Activity, WorkerRecord
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


async def test_workers_whose_agents_are_nowhere_leave_routing(redis_server: RedisServer) -> None:
    """Records left healthy by a dead replica (or this one before a restart) are marked unhealthy
    once their activity record has expired; a worker with recent heartbeats, or one a live replica
    holds, is left alone, and so is one whose agent registered again since it was read."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    store = Store(client)
    peer = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), peer)
    live_replica = f"127.0.0.1:{peer.add_insecure_port('127.0.0.1:0')}"
    await peer.start()
    peers = Peers("t" * 32, 5)
    fleet = Fleet(store, 5, "cp-me", peers)

    def worker(wid: str, owner: str) -> WorkerRecord:
        return WorkerRecord(wid, "m", "http://w", 8, ["adp_x"], healthy=True, updated_at=time.time(), owner=owner)

    cases = {"mine": "cp-me", "dead-replica": "127.0.0.1:1", "live-replica": live_replica, "beating": "127.0.0.1:1"}
    for wid, owner in cases.items():
        await store.put_worker(worker(wid, owner))
    await store.put_activity("beating", Activity())
    version = (await store.routing_table())[0]
    assert sorted(await fleet.sweep()) == ["dead-replica", "mine"]
    after = {w.id: w for w in await store.list_workers()}
    assert [wid for wid, w in sorted(after.items()) if w.healthy] == ["beating", "live-replica"]
    assert after["mine"].owner == "" and after["mine"].resident == ["adp_x"]
    assert (await store.routing_table())[0] > version  # the data planes re-read the table
    stale = after["live-replica"]
    await store.put_worker(replace(stale, updated_at=stale.updated_at + 1))  # its agent registered again
    assert not await store.abandon_worker(stale)
    await peers.close()
    await peer.stop(None)
    await client.aclose()
