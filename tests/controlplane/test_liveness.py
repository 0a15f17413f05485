"""Liveness: workers whose agents are connected nowhere, against a real Redis and a real peer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as redis

from controlplane.liveness import Liveness
from controlplane.peers import Peers
from controlplane.sessions import ACTIVITY_TTL_S, Sessions
from controlplane.store import Store
from loraplane.state.records import Activity, WorkerRecord
from tests.controlplane.test_service import start_control_plane
from tests.support import RedisServer, free_port, start_simulator


async def test_workers_whose_agents_are_nowhere_leave_routing(store: Store, live_replica: str) -> None:
    """Records left healthy by a dead replica (or this one before a restart) are marked unhealthy
    unless a live replica vouches for them; a worker with recent heartbeats recorded by a live
    replica, or one a live replica holds, is left alone, and so is one whose agent registered
    again since it was read."""
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


def healthy(wid: str, owner: str) -> WorkerRecord:
    return WorkerRecord(wid, "tiny-llama", "http://w", 8, ["adp_x"], healthy=True, updated_at=time.time(), owner=owner)


async def test_only_heartbeats_recorded_by_another_live_replica_keep_a_worker(store: Store, live_replica: str) -> None:
    """Every worker here was held by a replica that is gone. An unexpired activity record keeps one
    routable only if a live replica other than this one wrote it: one this replica wrote is from its
    previous life (it holds none of these workers now), a dead replica's or an unsigned one proves nothing."""
    peers = Peers("t" * 32, 5)
    liveness = Liveness(store, Sessions(store, "cp-me", 5, 10), peers)
    writers = {"by-live-replica": live_replica, "by-dead-replica": "127.0.0.1:1", "by-me": "cp-me", "unsigned": ""}
    for wid, writer in writers.items():
        await store.put_worker(healthy(wid, "127.0.0.1:1"))
        await store.put_activity(wid, Activity(frozenset({"adp_x"}), 2, writer), ACTIVITY_TTL_S)
    assert sorted(await liveness.sweep()) == ["by-dead-replica", "by-me", "unsigned"]
    assert [w.id for w in await store.list_workers() if w.healthy] == ["by-live-replica"]
    await peers.close()


async def test_a_starting_control_plane_releases_the_workers_of_its_previous_life(
    redis_server: RedisServer, store: Store, tmp_path: Path
) -> None:
    """After a restart of everything, the records the previous run left healthy (this address's,
    a replica's that is not back) whose engines do not answer are out of routing before the
    first agent can connect, though their activity records have not expired; each is routable
    again once its agent registers. A worker whose engine answers (this replica alone restarted)
    keeps serving while its agent reconnects."""
    port = free_port()
    me, gone = f"127.0.0.1:{port}", "127.0.0.1:1"
    engine, url, _ = start_simulator("tiny-llama")
    try:
        for wid, owner, endpoint in (("w-mine", me, "http://w"), ("w-gone", gone, "http://w"), ("w-up", me, url)):
            await store.put_worker(replace(healthy(wid, owner), endpoint=endpoint))
            await store.put_activity(wid, Activity(owner=owner), ACTIVITY_TTL_S)
        cp = await start_control_plane(redis_server.url, tmp_path, port)
        try:
            after = {w.id: (w.healthy, w.owner, w.resident) for w in await store.list_workers()}
            assert after == {
                "w-mine": (False, "", ["adp_x"]),
                "w-gone": (False, "", ["adp_x"]),
                "w-up": (True, me, ["adp_x"]),
            }
        finally:
            await cp.stop(0)
    finally:
        engine.terminate()
        engine.wait(10)


async def gone(store: Store, worker_id: str, within_s: float = 5.0) -> None:
    """Until the worker is out of routing."""
    async with asyncio.timeout(within_s):
        while (w := await store.get_worker(worker_id)) is None or w.healthy:
            await asyncio.sleep(0.05)


async def stopped(task: asyncio.Task[None], within_s: float = 10.0) -> None:
    """Cancels the task and waits until it ends, cancelling it again while it runs on, within
    `within_s` (a CI run hung in this test for 12 minutes, its event loop idle; not reproduced)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not task.done():
        assert asyncio.get_running_loop().time() < deadline, "the task does not stop"
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def test_a_restarted_replica_waits_for_agents_on_their_way_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This replica restarted alone: its agents retry with backoff and may register again after
    its first periodic sweep (CI saw one back 10 s after the restart). That sweep leaves a worker
    whose engine answers in routing, else the data planes have its adapters loaded on another
    worker for nothing; one whose engine does not answer leaves."""
    monkeypatch.setattr("controlplane.liveness.ACTIVITY_REFRESH_S", 0.0)  # a periodic sweep every round
    engine, url, _ = start_simulator("tiny-llama")
    peers = Peers("t" * 32, 5)
    try:
        for wid, endpoint in (("w-up", url), ("w-down", "http://127.0.0.1:1")):
            await store.put_worker(replace(healthy(wid, "cp-me"), endpoint=endpoint))
            await store.put_activity(wid, Activity(owner="cp-me"), ACTIVITY_TTL_S)
        watch = asyncio.create_task(Liveness(store, Sessions(store, "cp-me", 5, 10), peers).watch(3, every_s=0.05))
        try:
            await gone(store, "w-down")  # a periodic sweep ran: it judged both
            await asyncio.sleep(0.5)  # and a few more
        finally:
            await stopped(watch)
        assert {w.id: w.healthy for w in await store.list_workers()} == {"w-up": True, "w-down": False}
    finally:
        await peers.close()
        engine.terminate()
        engine.wait(10)


async def test_an_agent_is_waited_for_only_while_it_was_heard_of(store: Store) -> None:
    """Past a replica's start (or for a dead replica's workers): a worker whose engine answers
    stays while its agent was heard of within ACTIVITY_TTL_S (its activity record has not
    expired); one whose agent is long gone leaves, as does one whose engine does not answer."""
    engine, url, _ = start_simulator("tiny-llama")
    peers = Peers("t" * 32, 5)
    try:
        for wid, endpoint, heard in (("w-heard", url, True), ("w-long-gone", url, False),
                                     ("w-engine-down", "http://127.0.0.1:1", True)):  # fmt: skip
            await store.put_worker(replace(healthy(wid, "127.0.0.1:1"), endpoint=endpoint))
            if heard:
                await store.put_activity(wid, Activity(owner="127.0.0.1:1"), ACTIVITY_TTL_S)
        liveness = Liveness(store, Sessions(store, "cp-me", 5, 10), peers, grace_s=0)
        assert sorted(await liveness.sweep(spare=liveness.reconnecting)) == ["w-engine-down", "w-long-gone"]
        assert [w.id for w in await store.list_workers() if w.healthy] == ["w-heard"]
    finally:
        await peers.close()
        engine.terminate()
        engine.wait(10)


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


async def test_owners_are_asked_all_at_once(store: Store) -> None:
    """A sweep (the one a starting control plane runs before it accepts streams, too) waits for
    one health check timeout however many unresponsive replicas the records name."""
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


async def test_releasing_at_startup_does_not_need_redis() -> None:
    """Redis away at that moment is no reason not to start: the periodic sweep tries again."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    store = Store(client)
    peers = Peers("t" * 32, 5)
    await Liveness(store, Sessions(store, "cp-me", 5, 10), peers).release_stale()
    await peers.close()
    await client.aclose()
