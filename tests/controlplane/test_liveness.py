"""Liveness: workers whose agents are connected nowhere, against a real Redis and a real peer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.liveness import Liveness
from controlplane.peers import Peers
from controlplane.sessions import ACTIVITY_TTL_S, Sessions
from controlplane.store import Store
from loraplane.state.records import Activity, WorkerRecord
from tests.controlplane.test_service import start_control_plane
from tests.support import RedisServer, free_port


async def test_workers_whose_agents_are_nowhere_leave_routing(redis_server: RedisServer) -> None:
    """Records left healthy by a dead replica (or this one before a restart) are marked unhealthy
    unless a live replica vouches for them; a worker with recent heartbeats recorded by a live
    replica, or one a live replica holds, is left alone, and so is one whose agent registered
    again since it was read."""
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
    await store.put_activity("beating", Activity(owner=live_replica), ACTIVITY_TTL_S)
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


def healthy(wid: str, owner: str) -> WorkerRecord:
    return WorkerRecord(wid, "tiny-llama", "http://w", 8, ["adp_x"], healthy=True, updated_at=time.time(), owner=owner)


async def test_only_heartbeats_recorded_by_another_live_replica_keep_a_worker(redis_server: RedisServer) -> None:
    """Every worker here was held by a replica that is gone. An unexpired activity record keeps one
    routable only if a live replica other than this one wrote it: one this replica wrote is from its
    previous life (it holds none of these workers now), a dead replica's or an unsigned one proves nothing."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    store = Store(client)
    peer = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), peer)
    live_replica = f"127.0.0.1:{peer.add_insecure_port('127.0.0.1:0')}"
    await peer.start()
    peers = Peers("t" * 32, 5)
    liveness = Liveness(store, Sessions(store, "cp-me", 5, 10), peers)
    writers = {"by-live-replica": live_replica, "by-dead-replica": "127.0.0.1:1", "by-me": "cp-me", "unsigned": ""}
    for wid, writer in writers.items():
        await store.put_worker(healthy(wid, "127.0.0.1:1"))
        await store.put_activity(wid, Activity(frozenset({"adp_x"}), 2, writer), ACTIVITY_TTL_S)
    assert sorted(await liveness.sweep()) == ["by-dead-replica", "by-me", "unsigned"]
    assert [w.id for w in await store.list_workers() if w.healthy] == ["by-live-replica"]
    await peers.close()
    await peer.stop(None)
    await client.aclose()


async def test_a_starting_control_plane_releases_the_workers_of_its_previous_life(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """After a restart of everything, the records the previous run left healthy (this address's,
    a replica's that is not back) are out of routing before the first agent can connect, though
    their activity records have not expired: each worker is routable again once its agent registers."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    store = Store(client)
    port = free_port()
    me, gone = f"127.0.0.1:{port}", "127.0.0.1:1"
    for wid, owner in (("w-mine", me), ("w-gone", gone)):
        await store.put_worker(healthy(wid, owner))
        await store.put_activity(wid, Activity(owner=owner), ACTIVITY_TTL_S)
    cp = await start_control_plane(redis_server.url, tmp_path, port)
    try:
        after = {w.id: w for w in await store.list_workers()}
        assert [(w.healthy, w.owner, w.resident) for w in after.values()] == [(False, "", ["adp_x"])] * 2
    finally:
        await cp.stop(0)
        await client.aclose()


class SilentReplica:
    """A replica that accepts connections and never answers: its health check times out."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


async def test_owners_are_asked_all_at_once(redis_server: RedisServer) -> None:
    """A sweep (the one a starting control plane runs before it accepts streams, too) waits for
    one health check timeout however many unresponsive replicas the records name."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    store = Store(client)
    silent = [SilentReplica() for _ in range(3)]
    for i, replica in enumerate(silent):
        await store.put_worker(healthy(f"w-{i}", await replica.start()))
    peers = Peers("t" * 32, 5)
    started = time.monotonic()
    assert sorted(await Liveness(store, Sessions(store, "cp-me", 5, 10), peers).sweep()) == ["w-0", "w-1", "w-2"]
    assert time.monotonic() - started < 3.5  # one 2 s health check timeout, not three
    await peers.close()
    for replica in silent:
        await replica.stop()
    await client.aclose()


async def test_releasing_at_startup_does_not_need_redis() -> None:
    """Redis away at that moment is no reason not to start: the periodic sweep tries again."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    store = Store(client)
    peers = Peers("t" * 32, 5)
    await Liveness(store, Sessions(store, "cp-me", 5, 10), peers).release_stale()
    await peers.close()
    await client.aclose()
