"""Placement across the whole fleet: which worker loads an adapter (`placement.decide` over a
snapshot of every live worker), the load itself on one of this replica's agents or forwarded to
the replica that holds the chosen worker's agent, retries on other workers, and evictions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace

import redis.asyncio as redis

from controlplane.errors import ControlPlaneError, FailedPrecondition, LoadFailed, NoCapacity, NotFound
from controlplane.peers import Peers
from controlplane.placement import Decision, Placement, WorkerView, decide
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
        self._unplaced: set[str] = set()  # pinned adapters the pin keeper could not place (warned once)
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
        views, owners, _ = await self._views()
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

    async def assign(self, worker_id: str, tenant_id: str) -> list[str]:
        """Put a worker in a tenant's dedicated pool ("": shared again). The other tenants'
        adapters it holds leave it (requests in flight finish first); the ones it was to hold
        are dropped from its desired state, so no reconcile loads them back. Returns the
        adapters evicted."""
        record = await self._store.get_worker(worker_id)
        if record is None:
            raise NotFound(f"worker {worker_id!r} does not exist")
        await self._store.set_pool(record, tenant_id)
        log.info("worker %s %s", worker_id, f"in tenant {tenant_id}'s pool" if tenant_id else "shared")
        if not tenant_id:
            return []
        strangers = []
        for adapter_id in sorted(await self._store.desired(worker_id) | set(record.resident)):
            rec = await self._store.get_adapter(adapter_id)
            if rec is not None and rec.tenant_id != tenant_id:
                strangers.append(adapter_id)
                await self._store.desire(worker_id, adapter_id, wanted=False)
        evicted = []
        for adapter_id in strangers:
            if adapter_id in record.resident and await self.evict_everywhere(adapter_id, worker_id):
                evicted.append(adapter_id)
        return evicted

    async def prefetch(
        self, adapter: AdapterRecord, count: int, worker_ids: list[str] | None = None, forwarded: bool = False
    ) -> list[str]:
        """Push the adapter's bytes into node caches, without loading it: of the workers named,
        or of the `count` a placement would pick next (its tenant's pool's, or the shared ones;
        not draining, not holding it). A forwarded call acts on this replica's workers only.
        Returns the workers whose caches hold the bytes now; failures are logged, not raised."""
        views, owners, pooled = await self._views()
        home = (await self._pools(adapter, pooled))[0]
        if worker_ids:
            chosen = [v for v in views if v.id in worker_ids]
        else:
            fit = [v for v in views if v.healthy and v.base_model == adapter.base_model and v.pool == home
                   and not v.draining and adapter.id not in v.resident]  # fmt: skip
            chosen = sorted(fit, key=lambda v: (v.used >= v.max_adapters, v.used, v.in_flight, v.id))[:count]
        if forwarded:
            chosen = [v for v in chosen if v.id in self._sessions]

        async def push(wid: str) -> list[str]:
            session = self._sessions.get(wid)
            if session is None:
                return await self._peers.prefetch(owners[wid], adapter.id, wid)
            if not session.prefetch:
                return []  # an older agent: its first load fetches
            await self._sessions.prefetch(session, adapter)
            return [wid]

        results = await asyncio.gather(*(push(v.id) for v in chosen if v.id in owners or v.id in self._sessions),
                                       return_exceptions=True)  # fmt: skip
        done: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                log.warning("prefetching %s: %s", adapter.id, result)
            else:
                done += result
        return done

    async def keep_pinned(self, every_s: float = 2.0) -> None:
        """Pinned adapters stay loaded: one not resident on any serving worker (its worker lost,
        or restarted and not reloaded yet) is placed again. One replica at a time does it."""
        me = self._sessions.addr
        while True:
            await asyncio.sleep(every_s)
            try:
                if await self._store.lead(me, ttl_s=max(1, round(every_s * 3))):
                    await self._place_pinned()
            except (redis.RedisError, ControlPlaneError) as err:  # Redis or the store away: next round
                log.warning("keeping pinned adapters loaded: %s", err)

    async def _place_pinned(self) -> None:
        pinned = await self._store.pinned()
        if not pinned:
            return
        workers = await self._store.list_workers()
        pooled = {(w.pool, w.base_model) for w in workers if w.pool}
        # Held only where its tenant's requests go first: for a tenant with a pool, a copy on a
        # shared worker does not count (placing it loads it into the pool, or finds it where
        # it is while the pool is down and the tenant spills over).
        held = {a for w in workers if w.healthy and w.owner for a in w.resident
                if a in pinned and w.pool == _home(pinned[a], w.base_model, pooled)}  # fmt: skip
        for adapter_id in sorted(set(pinned) - held):
            rec = await self._store.get_adapter(adapter_id)
            if rec is None or rec.status != "ready":
                continue
            try:
                placed = await self.place(rec)
                self._unplaced.discard(adapter_id)
                log.info("pinned adapter %s placed again on %s", adapter_id, placed.worker_id)
            except ControlPlaneError as err:  # said once until it is placed, not every round
                (log.debug if adapter_id in self._unplaced else log.warning)(
                    "pinned adapter %s is not resident and could not be placed: %s", adapter_id, err
                )
                self._unplaced.add(adapter_id)

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

    async def _views(self) -> tuple[list[WorkerView], dict[str, str], set[tuple[str, str]]]:
        """Every live worker: this replica's sessions as they are now, the others' from Redis;
        the replica that holds each of the others; and the (tenant, base model) pairs of the
        dedicated pools (of workers live or not): a tenant's pool holds its adapters of the base
        models it has workers of; those of other models go to the shared workers."""
        views, owners = [], {}
        remote = []
        records = await self._store.list_workers()
        for w in records:
            session = self._sessions.get(w.id)
            if session is not None:
                views.append(session.view(w.draining, w.pool))
            elif w.owner and w.owner != self._sessions.addr:
                remote.append(w)
                owners[w.id] = w.owner
        activity = await self._store.activity([w.id for w in remote])
        for w in remote:
            act = activity.get(w.id, Activity())
            views.append(WorkerView(w.id, w.base_model, w.healthy, w.max_adapters, frozenset(w.resident),
                                    draining=w.draining, in_flight=act.in_flight, busy=act.busy,
                                    pool=w.pool, cached=frozenset(w.cached)))  # fmt: skip
        return views, owners, {(w.pool, w.base_model) for w in records if w.pool}

    async def _pools(self, adapter: AdapterRecord, pooled: set[tuple[str, str]]) -> list[str]:
        """The pools the adapter may be placed in, in order: its tenant's dedicated pool if it has
        one for its base model (then the shared workers, if the tenant may spill over), else the
        shared workers."""
        if (adapter.tenant_id, adapter.base_model) not in pooled:
            return [""]
        tenant = await self._store.tenants.get(adapter.tenant_id)
        return [adapter.tenant_id, ""] if tenant is not None and tenant.spill else [adapter.tenant_id]

    async def _decide_in(
        self,
        views: list[WorkerView],
        adapter: AdapterRecord,
        pool: str,
        pooled: set[tuple[str, str]],
        avoid: frozenset[str],
        replicate: bool,
    ) -> Decision | None:
        decision = decide(views, adapter.base_model, adapter.id, {}, avoid=avoid, replicate=replicate, pool=pool)
        if decision is not None and decision.evict is not None:  # only now are recency and pins needed
            residents = sorted(set().union(*(v.resident for v in views)))
            last_used = await self._store.last_used(residents)
            # A pinned adapter's last copy where its tenant's requests go is never evicted: in its
            # tenant's pool, else on the shared workers (a tenant without a pool, or spilling over
            # while its pool holds no copy). Another copy (placed while its worker restarted,
            # being evicted already, or in another tenant's pool) may be.
            copies = Counter((v.pool, a) for v in views if v.healthy for a in v.resident - v.evicting)
            pins = await self._store.pinned()
            pinned = frozenset(
                a for a, t in pins.items()
                if copies[pool, a] <= 1
                and (pool == _home(t, adapter.base_model, pooled) or (pool == "" and not copies[t, a]))
            )  # fmt: skip
            decision = decide(views, adapter.base_model, adapter.id, last_used, avoid=avoid, replicate=replicate,
                              pool=pool, pinned=pinned)  # fmt: skip
        return decision

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
            views, owners, pooled = await self._views()
            pools = await self._pools(adapter, pooled)
            if worker_id is not None:
                views = [replace(v, draining=False) for v in views if v.id == worker_id]
                if not views or (forwarded and worker_id in owners):
                    raise NotFound(f"worker {worker_id!r} is not connected")
                if views[0].pool not in pools:
                    raise FailedPrecondition(_outside(worker_id, views[0].pool, adapter))
            decision = None
            for pool in pools:  # the tenant's own pool first; shared workers only on spill-over
                decision = await self._decide_in(views, adapter, pool, pooled, avoid, replicate)
                if decision is not None:
                    break
            if decision is None:
                if pools[0]:
                    raise NoCapacity(f"the tenant's dedicated workers of {adapter.base_model} cannot take the "
                                     "adapter right now (down, draining, or every slot pinned or busy)")  # fmt: skip
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
            placed = await self._sessions.load(session, adapter)
            if (await self._store.pools()).get(placed.worker_id, "") not in pools:  # assigned meanwhile
                await self._sessions.evict(session, adapter.id)
                raise WorkerLoadFailed(placed.worker_id, "the worker joined another tenant's dedicated pool")
            return placed
        except WorkerLoadFailed:
            raise
        except NoCapacity as err:
            raise WorkerLoadFailed(decision.worker_id, str(err)) from None
        finally:
            session.loading.discard(adapter.id)
            session.evicting.discard(decision.evict or "")


def _home(tenant_id: str, base_model: str, pooled: set[tuple[str, str]]) -> str:
    """Where the tenant's adapters are served: its dedicated pool if it has one, else "" (shared)."""
    return tenant_id if (tenant_id, base_model) in pooled else ""


def _outside(worker_id: str, pool: str, adapter: AdapterRecord) -> str:
    if pool:
        return f"worker {worker_id!r} is in tenant {pool}'s dedicated pool; adapter {adapter.id} is not that tenant's"
    return f"adapter {adapter.id}'s tenant has a dedicated pool; worker {worker_id!r} is not in it"
