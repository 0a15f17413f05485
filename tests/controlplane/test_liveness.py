"""Liveness: workers whose agents are connected nowhere, against a real Redis and a real peer."""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.liveness import Liveness
from controlplane.peers import Peers
from controlplane.sessions import ACTIVITY_TTL_S, Sessions
from controlplane.store import Store
from loraplane.state.records import Activity, WorkerRecord
from tests.support import RedisServer


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
    liveness = Liveness(store, Sessions(store, "cp-me", 5, 10), peers)

    def worker(wid: str, owner: str) -> WorkerRecord:
        return WorkerRecord(wid, "m", "http://w", 8, ["adp_x"], healthy=True, updated_at=time.time(), owner=owner)

    cases = {"mine": "cp-me", "dead-replica": "127.0.0.1:1", "live-replica": live_replica, "beating": "127.0.0.1:1"}
    for wid, owner in cases.items():
        await store.put_worker(worker(wid, owner))
    await store.put_activity("beating", Activity(), ACTIVITY_TTL_S)
    version = (await store.routing_table())[0]
    assert sorted(await liveness.sweep()) == ["dead-replica", "mine"]
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
