"""Placement across the whole fleet: which worker loads an adapter (`placement.decide` over a
snapshot of every live worker), the load itself on one of this replica's agents or forwarded to
the replica that holds the chosen worker's agent, retries on other workers, and evictions."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from controlplane.errors import LoadFailed, NoCapacity, NotFound
from controlplane.peers import Peers
from controlplane.placement import Placement, WorkerView, decide
from controlplane.sessions import AgentSession, Sessions, WorkerLoadFailed
from controlplane.store import Store
from loraplane.state.records import Activity, AdapterRecord

log = logging.getLogger(__name__)
MAX_LOAD_ATTEMPTS = 3  # workers tried before a placement is marked failed
RETRY_BACKOFF_S = (0.2, 1.0)  # first wait between attempts, cap (doubling)


class Placer:
    def __init__(self, store: Store, sessions: Sessions, peers: Peers, failed_hold_s: float) -> None:
        self._store = store
        self._sessions = sessions
        self._peers = peers
        self._failed_hold = failed_hold_s
        self._placing: dict[tuple[object, ...], asyncio.Task[Placement]] = {}
        self._decide = asyncio.Lock()

    async def place(
        self,
        adapter: AdapterRecord,
        worker_id: str | None = None,
        forwarded: bool = False,
        replicate: bool = False,
        avoid: frozenset[str] = frozenset(),
    ) -> Placement:
        """One placement per adapter at a time in this replica: callers that arrive while one
        runs share its outcome. An operator may name the worker (a forced load, which ignores
        draining and is not retried elsewhere); a forwarded one must be this replica's."""
        await self._store.touch(adapter.id, time.time())
        flight = (adapter.id, worker_id, replicate, avoid)
        task = self._placing.get(flight)
        if task is None:
            if worker_id is None:
                task = asyncio.create_task(self._place_anywhere(adapter, replicate, avoid))
            else:
                task = asyncio.create_task(self._place(adapter, worker_id, forwarded))
            self._placing[flight] = task
            task.add_done_callback(lambda _: self._placing.pop(flight, None))
        return await asyncio.shield(task)

    async def evict_everywhere(
        self, adapter_id: str, worker_id: str | None = None, forwarded: bool = False
    ) -> list[str]:
        """Evict from every worker that holds it, or from the one named (the agent lets
        requests in flight finish first). Returns the workers it was evicted from."""
        views, owners = await self._views()
        holders = [v.id for v in views if adapter_id in v.resident and worker_id in (None, v.id)]
        if forwarded:
            holders = [h for h in holders if h in self._sessions]

        async def evict(wid: str) -> list[str]:
            session = self._sessions.get(wid)
            if session is not None:
                await self._sessions.evict(session, adapter_id)
                return [wid]
            return await self._peers.evict(owners[wid], adapter_id, wid)

        results = await asyncio.gather(*(evict(h) for h in holders), return_exceptions=True)
        evicted: list[str] = []
        for wid, result in zip(holders, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("evicting %s from %s failed: %s", adapter_id, wid, result)
            else:
                evicted += result
        return evicted

    async def set_draining(self, worker_id: str, draining: bool) -> None:
        """A draining worker keeps serving what it holds but takes no new adapter."""
        record = await self._store.get_worker(worker_id)
        if record is None:
            raise NotFound(f"worker {worker_id!r} does not exist")
        await self._store.set_draining(worker_id, draining)
        await self._store.put_worker(replace(record, updated_at=time.time()))  # a new routing version
        log.info("worker %s %s", worker_id, "draining" if draining else "undrained")

    async def _place_anywhere(self, adapter: AdapterRecord, replicate: bool, avoid: frozenset[str]) -> Placement:
        """A load that fails is tried on another worker, waiting a little longer each time;
        when no worker is left to try, the placement is marked failed with the reasons and
        further requests fail at once for a while (`failed_hold_s`)."""
        if adapter.placement_error and time.time() - adapter.placement_failed_at < self._failed_hold:
            raise LoadFailed(f"the adapter could not be loaded: {adapter.placement_error}")
        tried, reasons = set(avoid), []
        wait, cap = RETRY_BACKOFF_S
        for _ in range(MAX_LOAD_ATTEMPTS):
            try:
                placed = await self._place(adapter, None, False, replicate, frozenset(tried))
            except WorkerLoadFailed as err:
                tried.add(err.worker_id)
                reasons.append(str(err))
                await asyncio.sleep(wait)
                wait = min(wait * 2, cap)
                continue
            except NoCapacity:
                if not reasons:
                    raise
                break
            if adapter.placement_error:
                await self._store.set_placement_error(adapter.id, "", 0.0)
            return placed
        reason = "; ".join(reasons)
        if not replicate:
            await self._store.set_placement_error(adapter.id, reason, time.time())
        log.warning("placing %s failed on every worker tried: %s", adapter.id, reason)
        raise LoadFailed(f"the adapter could not be loaded: {reason}")

    async def _views(self) -> tuple[list[WorkerView], dict[str, str]]:
        """Every live worker: this replica's sessions as they are now, the others' from Redis;
        and the replica that holds each of the others."""
        views, owners = [], {}
        remote = []
        for w in await self._store.list_workers():
            session = self._sessions.get(w.id)
            if session is not None:
                views.append(session.view(w.draining))
            elif w.owner and w.owner != self._sessions.addr:
                remote.append(w)
                owners[w.id] = w.owner
        activity = await self._store.activity([w.id for w in remote])
        for w in remote:
            act = activity.get(w.id, Activity())
            views.append(WorkerView(w.id, w.base_model, w.healthy, w.max_adapters, frozenset(w.resident),
                                    draining=w.draining, in_flight=act.in_flight, busy=act.busy))  # fmt: skip
        return views, owners

    async def _place(
        self,
        adapter: AdapterRecord,
        worker_id: str | None,
        forwarded: bool,
        replicate: bool = False,
        avoid: frozenset[str] = frozenset(),
    ) -> Placement:
        session: AgentSession | None
        async with self._decide:
            views, owners = await self._views()
            if worker_id is not None:
                views = [replace(v, draining=False) for v in views if v.id == worker_id]
                if not views or (forwarded and worker_id in owners):
                    raise NotFound(f"worker {worker_id!r} is not connected")
            decision = decide(views, adapter.base_model, adapter.id, {}, avoid=avoid, replicate=replicate)
            if decision is not None and decision.evict is not None:  # only now is recency needed
                residents = sorted(set().union(*(v.resident for v in views)))
                last_used = await self._store.last_used(residents)
                decision = decide(views, adapter.base_model, adapter.id, last_used, avoid=avoid, replicate=replicate)
            if decision is None:
                raise NoCapacity(f"no worker of {adapter.base_model} can take the adapter right now")
            if decision.already_loaded:
                await self._store.desire(decision.worker_id, adapter.id)
                return Placement(decision.worker_id, already_loaded=True)
            session = self._sessions.get(decision.worker_id)
            if session is not None:
                session.loading.add(adapter.id)
                if decision.evict:  # no other placement may pick the same victim meanwhile
                    session.evicting.add(decision.evict)
        if session is None:
            try:
                return await self._peers.load(owners[decision.worker_id], adapter.id, decision.worker_id)
            except NoCapacity as err:  # the owner's WorkerLoadFailed, as text
                raise WorkerLoadFailed(decision.worker_id, str(err).removeprefix(f"{decision.worker_id}: ")) from None
        try:
            if decision.evict:
                await self._sessions.evict(session, decision.evict)
            return await self._sessions.load(session, adapter)
        except WorkerLoadFailed:
            raise
        except NoCapacity as err:
            raise WorkerLoadFailed(decision.worker_id, str(err)) from None
        finally:
            session.loading.discard(adapter.id)
            session.evicting.discard(decision.evict or "")
