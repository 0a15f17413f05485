"""Which workers are alive, and whether Redis still holds what it held: the heartbeat-timeout
watch over this replica's agents, the sweep of workers whose agents are connected nowhere, and
the Redis epoch that tells an emptied Redis from a quiet one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import redis.asyncio as redis

from controlplane import telemetry
from controlplane.peers import Peers
from controlplane.sessions import ACTIVITY_REFRESH_S, ACTIVITY_TTL_S, Sessions
from controlplane.store import Store
from loraplane.state.records import WorkerRecord

log = logging.getLogger(__name__)


class Liveness:
    """`grace_s`: how long after this replica starts the agents of its previous life may take to
    come back (see `reconnecting`)."""

    def __init__(self, store: Store, sessions: Sessions, peers: Peers, grace_s: float = ACTIVITY_TTL_S) -> None:
        self._store = store
        self._sessions = sessions
        self._peers = peers
        self._patient_until = time.monotonic() + grace_s
        self._epoch = ""
        # False once Redis was seen empty (when this process started, or since): its records
        # then say nothing about which bytes are unused, and no orphan sweep may trust them.
        self.redis_trusted = True

    async def check_epoch(self) -> bool:
        """False when Redis lost its data since the last check. Then every agent session is
        ended: the agents reconnect and register what their vLLMs hold (worker records, command
        generations and routing come back), and reconciling leaves adapters Redis has no record
        of alone, so an empty Redis never evicts anything."""
        epoch, made = await self._store.epoch()
        lost = bool(self._epoch) and epoch != self._epoch
        self._epoch = epoch
        self.redis_trusted = self.redis_trusted and not made and not lost
        if lost:
            log.error("Redis lost its data (its epoch changed); agents re-register, nothing is evicted")
            for session in self._sessions.all():
                session.ended.set()
        return not lost

    async def watch(self, timeout_s: float, every_s: float = 1.0) -> None:
        """A worker whose agent stops sending heartbeats leaves the routing table within seconds;
        Redis coming back empty is noticed within seconds too."""
        swept = time.monotonic()
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(every_s)
            if me is not None and me.cancelling():  # cancelled, and a callee swallowed it: stop anyway
                raise asyncio.CancelledError
            try:
                await self.check_epoch()
                telemetry.REDIS_UP.set("controlplane", value=1)
                for session in self._sessions.all():
                    if session.record.healthy and time.monotonic() - session.last_seen > timeout_s:
                        log.warning("worker %s sent no heartbeat for %.0fs", session.record.id, timeout_s)
                        await self._sessions.report(session, session.record.resident, healthy=False, seen=False)
                if time.monotonic() - swept > ACTIVITY_REFRESH_S:
                    swept = time.monotonic()
                    await self.sweep(spare=self.reconnecting)
            except redis.RedisError as err:  # Redis is away: try again next round
                telemetry.REDIS_UP.set("controlplane", value=0)
                log.warning("watching the workers: Redis is unreachable: %s", err)

    async def release_stale(self) -> None:
        """At startup, before this replica accepts streams: workers left healthy by its previous
        life (or by a replica that is gone) whose engines do not answer leave routing now, not
        ACTIVITY_TTL_S later (everything restarted: no engine is up yet). One whose engine
        answers keeps serving while its agent reconnects (this replica alone restarted); the
        periodic sweep judges it if the agent does not come back (`reconnecting`). Redis away is
        no reason not to start: the periodic sweep tries again."""
        try:
            marked = await self.sweep(spare=self.reconnecting)
        except redis.RedisError as err:
            log.warning("releasing the workers of a previous run: Redis is unreachable: %s", err)
            return
        if marked:
            log.info("released %d worker(s) whose engines do not answer and whose agents are nowhere", len(marked))

    async def sweep(self, spare: Spare | None = None) -> list[str]:
        """Workers left healthy by a replica that died with their streams (this one before a
        restart, or another that does not answer), whose agents did not come back anywhere.
        Only a live replica other than this one vouches for a worker: as its recorded owner, or
        as the writer of its activity record (refreshed with its heartbeats, written before the
        worker's record at registration, expiring ACTIVITY_TTL_S after the last heartbeat). This
        replica writes activity only for its own sessions, so activity it wrote for a worker it
        does not hold is from its previous life. `spare`: of the workers no replica vouches for,
        those to leave alone. Returns the workers marked."""
        orphans = [w for w in await self._store.list_workers() if w.healthy and w.id not in self._sessions]
        activity = await self._store.activity([w.id for w in orphans])
        alive = await self._live_peers({w.owner for w in orphans} | {a.owner for a in activity.values()})
        unvouched = []
        for w in orphans:
            written = activity.get(w.id)
            if w.owner in alive or (written is not None and written.owner in alive):
                continue  # a live replica's worker is that replica's to judge (its Redis writes may lag)
            unvouched.append(w)
        spared = await spare(unvouched) if spare is not None and unvouched else set()
        marked = [w.id for w in unvouched if w.id not in spared and await self._store.abandon_worker(w)]
        for wid in marked:
            log.warning("worker %s: no agent connected anywhere since its last heartbeat; out of routing", wid)
        return marked

    async def reconnecting(self, workers: list[WorkerRecord]) -> set[str]:
        """Of these workers (no live replica vouches for them), those whose agents may still be
        on their way back, left in routing: the engine answers, and the agent was last heard of
        less than ACTIVITY_TTL_S ago (its activity record has not expired) or this replica
        started less than `grace_s` ago.

        An agent retries with a jittered backoff (up to 7.5 s between tries, its gRPC channel's
        own besides), so it may register again more than ACTIVITY_REFRESH_S after its replica is
        back, or after another replica's sweep finds its replica dead. Judged at that sweep, its
        worker left routing and the data planes had its adapters loaded on another worker for
        nothing (test_faults' control plane kill: an agent back 10 s after the restart, one
        adapter loaded again)."""
        if time.monotonic() >= self._patient_until:
            activity = await self._store.activity([w.id for w in workers])
            workers = [w for w in workers if w.id in activity]
        return await engines_answering(workers) if workers else set()

    async def _live_peers(self, addrs: set[str]) -> set[str]:
        """The replicas among `addrs`, other than this one, that answer their health check; asked
        all at once, so that a dead one costs one health check timeout, not one each."""
        others = sorted(addrs - {"", self._sessions.addr})
        answers = await asyncio.gather(*(self._peers.alive(a) for a in others))
        return {a for a, up in zip(others, answers, strict=True) if up}


# Of these workers, the ids to leave alone.
Spare = Callable[[list[WorkerRecord]], Awaitable[set[str]]]


async def engines_answering(workers: list[WorkerRecord], timeout_s: float = 2.0) -> set[str]:
    """The workers whose engine answers its `/health` (vLLM's, open to anyone) now, asked at once."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def answers(w: WorkerRecord) -> bool:
            try:
                async with http.get(w.endpoint.rstrip("/") + "/health") as r:
                    return r.status == 200
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return False

        up = await asyncio.gather(*map(answers, workers))
    return {w.id for w, ok in zip(workers, up, strict=True) if ok}
