"""The workers connected to this control plane, and the commands sent to them."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace

import redis.asyncio as redis

from controlplane import telemetry
from controlplane.errors import LoadFailed, NoCapacity, NotFound
from controlplane.peers import Peers
from controlplane.placement import LoadBudget, WorkerView, decide
from controlplane.store import Store
from loraplane import logs
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.state.records import Activity, AdapterRecord, WorkerRecord

log = logging.getLogger(__name__)
OUTBOX_SIZE = 64
MAX_RELOAD_FAILURES = 3
ACTIVITY_TTL_S = 30  # a worker's activity record expires this long after its last heartbeat
ACTIVITY_REFRESH_S = 10.0  # well inside ACTIVITY_TTL_S
MAX_LOAD_ATTEMPTS = 3  # workers tried before a placement is marked failed
RETRY_BACKOFF_S = (0.2, 1.0)  # first wait between attempts, cap (doubling)


class CommandFailed(Exception):
    pass


def _redact(error: str) -> str:
    """A worker's error as tenants may read it: no file system paths, bounded."""
    return re.sub(r"(?<![\w.])/[^\s'\",:]+", "<path>", error)[:300] or "unknown error"


class WorkerLoadFailed(NoCapacity):
    """One worker failed to load the adapter; another may succeed."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"{worker_id}: {reason}")
        self.worker_id = worker_id


@dataclass
class AgentSession:
    record: WorkerRecord
    outbox: asyncio.Queue[pb.ConnectResponse] = field(default_factory=lambda: asyncio.Queue(OUTBOX_SIZE))
    pending: dict[str, asyncio.Future[pb.CommandResult]] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    evicting: set[str] = field(default_factory=set)  # victims chosen, their evictions not done yet
    busy: frozenset[str] = frozenset()  # adapters with requests in flight, as vLLM reports them
    in_flight: int = 0  # requests running or waiting in vLLM
    results_seen: int = 0  # command results received on this session
    activity_written: float = 0.0  # when busy and in_flight were last written to Redis (they expire)
    last_seen: float = field(default_factory=time.monotonic)
    reconciling: asyncio.Task[None] | None = None
    unsynced: bool = False  # the record's last write to Redis failed
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set: the control plane closes the stream
    failures: dict[str, int] = field(default_factory=dict)  # consecutive failed reloads
    budget: LoadBudget = field(default_factory=lambda: LoadBudget(10))

    def view(self, draining: bool) -> WorkerView:
        r = self.record
        return WorkerView(
            id=r.id,
            base_model=r.base_model,
            healthy=r.healthy,
            max_adapters=r.max_adapters,
            resident=frozenset(r.resident),
            loading=frozenset(self.loading),
            evicting=frozenset(self.evicting),
            draining=draining,
            in_flight=self.in_flight,
            busy=self.busy,
        )

    async def command(self, msg: pb.ConnectResponse, command_id: str, timeout: float) -> pb.CommandResult:
        fut: asyncio.Future[pb.CommandResult] = asyncio.get_running_loop().create_future()
        self.pending[command_id] = fut
        try:
            self.outbox.put_nowait(msg)
            return await asyncio.wait_for(fut, timeout)
        except asyncio.QueueFull:
            raise CommandFailed("worker's command queue is full") from None
        except TimeoutError:
            raise CommandFailed(f"worker did not answer within {timeout:.0f}s") from None
        finally:
            self.pending.pop(command_id, None)

    def resolve(self, result: pb.CommandResult) -> None:
        self.results_seen += 1
        fut = self.pending.get(result.command_id)
        if fut and not fut.done():
            fut.set_result(result)

    def fail_all(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(CommandFailed(reason))


class Fleet:
    """This replica's agent sessions, and placement across the whole fleet: a decision about
    a worker whose agent is connected to another replica is carried out there."""

    def __init__(
        self,
        store: Store,
        load_timeout_s: float,
        self_addr: str,
        peers: Peers,
        max_loads_per_s: int = 10,
        failed_hold_s: float = 30.0,
    ) -> None:
        self._store = store
        self._max_loads_per_s = max_loads_per_s
        self._load_timeout = load_timeout_s
        self._self_addr = self_addr
        self._peers = peers
        self._failed_hold = failed_hold_s
        self.sessions: dict[str, AgentSession] = {}
        self._placing: dict[tuple[object, ...], asyncio.Task[tuple[str, bool, int]]] = {}
        self._decide = asyncio.Lock()
        self._epoch = ""
        # False once Redis was seen empty (when this process started, or since): its records
        # then say nothing about which bytes are unused, and no orphan sweep may trust them.
        self.redis_trusted = True

    async def attach(self, reg: pb.Register) -> AgentSession:
        old = self.sessions.pop(reg.worker_id, None)
        if old:
            old.fail_all("worker reconnected")
        record = WorkerRecord(
            id=reg.worker_id,
            base_model=reg.base_model,
            endpoint=reg.endpoint,
            max_adapters=reg.max_adapters,
            resident=sorted(reg.resident),
            healthy=True,
            updated_at=time.time(),
            owner=self._self_addr,
        )
        session = AgentSession(record, budget=LoadBudget(self._max_loads_per_s))
        self.sessions[reg.worker_id] = session
        self._count_agents()
        # Before the record: a replica that sees this record sees a live worker (`sweep`).
        await self._store.put_activity(record.id, Activity(), ACTIVITY_TTL_S)
        session.activity_written = time.monotonic()
        await self._store.put_worker(record)
        log.info("worker %s registered (%s, %d resident)", reg.worker_id, reg.base_model, len(reg.resident))
        return session

    def _count_agents(self) -> None:
        counts = dict.fromkeys(telemetry.AGENTS.values, 0.0)  # a base model left with none shows 0
        for s in self.sessions.values():
            counts[(s.record.base_model,)] = counts.get((s.record.base_model,), 0.0) + 1
        for labels, n in counts.items():
            telemetry.AGENTS.set(*labels, value=n)

    async def evict_everywhere(
        self, adapter_id: str, worker_id: str | None = None, forwarded: bool = False
    ) -> list[str]:
        """Evict from every worker that holds it, or from the one named (the agent lets
        requests in flight finish first). Returns the workers it was evicted from."""
        views, owners = await self._views()
        holders = [v.id for v in views if adapter_id in v.resident and worker_id in (None, v.id)]
        if forwarded:
            holders = [h for h in holders if h in self.sessions]

        async def evict(wid: str) -> list[str]:
            if wid in self.sessions:
                await self._evict(self.sessions[wid], adapter_id)
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
        record = await self._store.get_worker(worker_id)
        if record is None:
            raise NotFound(f"worker {worker_id!r} does not exist")
        await self._store.set_draining(worker_id, draining)
        await self._store.put_worker(replace(record, updated_at=time.time()))  # a new routing version
        log.info("worker %s %s", worker_id, "draining" if draining else "undrained")

    def converge(self, session: AgentSession) -> None:
        """Start a reconcile of the worker unless one is running (level-triggered: called on
        register and on every heartbeat that differs from the desired state)."""
        if session.reconciling is None or session.reconciling.done():
            session.reconciling = asyncio.create_task(self._reconcile(session))

    async def _reconcile(self, session: AgentSession) -> None:
        """Load what the worker should hold and does not (a restarted vLLM); evict what it holds
        and should not (deleted while it was away). An adapter with no record is left alone:
        Redis may have lost it, and LRU eviction reclaims the slot when it is needed."""
        wid = session.record.id
        desired = await self._store.desired(wid)
        resident = set(session.record.resident)
        for adapter_id in sorted(desired - resident - session.loading):
            rec = await self._store.get_adapter(adapter_id)
            if rec is None or rec.status != "ready":
                await self._store.desire(wid, adapter_id, wanted=False)
                continue
            session.loading.add(adapter_id)  # a placement meanwhile counts the slot as taken
            try:
                await self._load(session, rec, keep_intent=True)
                session.failures.pop(adapter_id, None)
            except NoCapacity as err:
                session.failures[adapter_id] = failures = session.failures.get(adapter_id, 0) + 1
                log.warning("reloading %s on %s failed (%d): %s", adapter_id, wid, failures, err)
                if failures >= MAX_RELOAD_FAILURES:
                    await self._store.desire(wid, adapter_id, wanted=False)
            finally:
                session.loading.discard(adapter_id)
        for adapter_id in sorted(resident - desired - session.loading - session.busy):
            if await self._store.get_adapter(adapter_id) is None:
                continue
            try:
                await self._evict(session, adapter_id)
            except NoCapacity as err:
                log.warning("evicting stale %s from %s failed: %s", adapter_id, wid, err)

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
            for session in self.sessions.values():
                session.ended.set()
        return not lost

    async def watch(self, timeout_s: float, every_s: float = 1.0) -> None:
        """A worker whose agent stops sending heartbeats leaves the routing table within seconds;
        Redis coming back empty is noticed within seconds too."""
        swept = time.monotonic()
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.check_epoch()
                telemetry.REDIS_UP.set("controlplane", value=1)
                for session in list(self.sessions.values()):
                    if session.record.healthy and time.monotonic() - session.last_seen > timeout_s:
                        log.warning("worker %s sent no heartbeat for %.0fs", session.record.id, timeout_s)
                        await self.report(session, session.record.resident, healthy=False, seen=False)
                if time.monotonic() - swept > ACTIVITY_REFRESH_S:
                    swept = time.monotonic()
                    await self.sweep()
            except redis.RedisError as err:  # Redis is away: try again next round
                telemetry.REDIS_UP.set("controlplane", value=0)
                log.warning("watching the workers: Redis is unreachable: %s", err)

    async def sweep(self) -> list[str]:
        """Workers left healthy by a replica that died with their streams (this one before a
        restart, or another that does not answer), whose agents did not come back anywhere:
        their activity record, refreshed with their heartbeats and written before the worker's
        record at registration, has expired. They leave routing ACTIVITY_TTL_S or a little more
        after their last heartbeat. Returns the workers marked."""
        orphans = [w for w in await self._store.list_workers() if w.healthy and w.id not in self.sessions]
        alive = await self._store.activity([w.id for w in orphans])
        marked = []
        for w in orphans:
            if w.id in alive or (w.owner not in ("", self._self_addr) and await self._peers.alive(w.owner)):
                continue  # a live replica's worker is that replica's to judge (its Redis writes may lag)
            if await self._store.abandon_worker(w):
                marked.append(w.id)
        for wid in marked:
            log.warning("worker %s: no agent connected anywhere and no heartbeat for %ds; out of routing",
                        wid, ACTIVITY_TTL_S)  # fmt: skip
        return marked

    async def detach(self, session: AgentSession) -> None:
        session.fail_all("worker disconnected")
        if self.sessions.get(session.record.id) is session:
            del self.sessions[session.record.id]
            self._count_agents()
            current = await self._store.get_worker(session.record.id)
            if current is None or current.owner == self._self_addr:  # not already taken over elsewhere
                await self._store.put_worker(replace(session.record, healthy=False, owner="", updated_at=time.time()))
            log.info("worker %s disconnected", session.record.id)

    async def report(
        self,
        session: AgentSession,
        resident: list[str],
        healthy: bool,
        busy: frozenset[str] | None = None,
        seen: bool = True,
    ) -> None:
        """Record what vLLM really holds; writes Redis only when that changed."""
        if seen:
            session.last_seen = time.monotonic()
        if busy is not None:
            session.busy = busy
        rec = session.record
        resident = sorted(resident)
        if resident != rec.resident or healthy != rec.healthy or session.unsynced:
            # A write that failed may still have landed (a timeout): the next report writes again.
            session.unsynced = True
            session.record = replace(rec, resident=resident, healthy=healthy, updated_at=time.time())
            await self._store.put_worker(session.record)
            session.unsynced = False

    async def heartbeat(
        self,
        session: AgentSession,
        resident: list[str],
        healthy: bool,
        busy: list[str],
        in_flight: int = 0,
        commands_done: int | None = None,
    ) -> None:
        if commands_done is not None and commands_done < session.results_seen:
            resident = session.record.resident  # measured before a result already applied: older news
        now = time.monotonic()
        changed = (frozenset(busy), in_flight) != (session.busy, session.in_flight)
        if changed or now - session.activity_written > ACTIVITY_REFRESH_S:
            await self._store.put_activity(session.record.id, Activity(frozenset(busy), in_flight), ACTIVITY_TTL_S)
            session.activity_written = now
        session.in_flight = in_flight
        await self.report(session, resident, healthy, frozenset(busy))
        if healthy and set(resident) != await self._store.desired(session.record.id):
            self.converge(session)

    async def place(
        self,
        adapter: AdapterRecord,
        worker_id: str | None = None,
        forwarded: bool = False,
        replicate: bool = False,
        avoid: frozenset[str] = frozenset(),
    ) -> tuple[str, bool, int]:
        """(worker id, already loaded, load ms). One placement per adapter at a time in this
        replica: callers that arrive while one runs share its outcome. An operator may name
        the worker (a forced load, which ignores draining and is not retried elsewhere)."""
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

    async def _place_anywhere(
        self, adapter: AdapterRecord, replicate: bool, avoid: frozenset[str]
    ) -> tuple[str, bool, int]:
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
        """Every live worker: this replica's sessions as they are now, the others' from Redis."""
        views, owners = [], {}
        remote = []
        for w in await self._store.list_workers():
            session = self.sessions.get(w.id)
            if session is not None:
                views.append(session.view(w.draining))
            elif w.owner and w.owner != self._self_addr:
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
    ) -> tuple[str, bool, int]:
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
                return decision.worker_id, True, 0
            session = self.sessions.get(decision.worker_id)
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
                await self._evict(session, decision.evict)
            result = await self._load(session, adapter)
        except WorkerLoadFailed:
            raise
        except NoCapacity as err:
            raise WorkerLoadFailed(decision.worker_id, str(err)) from None
        finally:
            session.loading.discard(adapter.id)
            session.evicting.discard(decision.evict or "")
        return decision.worker_id, result.already_done, result.duration_ms

    async def _load(self, session: AgentSession, adapter: AdapterRecord, keep_intent: bool = False) -> pb.CommandResult:
        """Record the intent, then load. A failed placement drops the intent; a failed reload
        (`keep_intent`) keeps it, to be tried again on a later heartbeat."""
        generation = await self._store.desire(session.record.id, adapter.id)
        try:
            return await self._send_load(session, adapter, generation)
        except NoCapacity:
            if not keep_intent:
                await self._store.desire(session.record.id, adapter.id, wanted=False)
            raise

    async def _send_load(self, session: AgentSession, adapter: AdapterRecord, generation: int) -> pb.CommandResult:
        while (wait := session.budget.delay(time.monotonic())) > 0:
            await asyncio.sleep(wait)
        session.budget.spend(time.monotonic())
        cid = uuid.uuid4().hex
        msg = pb.ConnectResponse(
            load=pb.LoadAdapter(
                command_id=cid,
                adapter_id=adapter.id,
                vllm_name=adapter.vllm_name,
                sha256=adapter.sha256,
                size_bytes=adapter.size_bytes,
                adapter_config=adapter.adapter_config.encode(),
                generation=generation,
                request_id=logs.REQUEST_ID.get(),
            )
        )
        try:
            result = await session.command(msg, cid, self._load_timeout)
        except CommandFailed as err:
            telemetry.LOADS.inc(adapter.base_model, "failed")
            raise WorkerLoadFailed(session.record.id, str(err)) from None
        if not result.ok:  # what it holds is not measured after a failure: the next heartbeat says
            telemetry.LOADS.inc(adapter.base_model, "failed")
            log.warning("load of %s on %s failed: %s", adapter.id, session.record.id, result.error)
            raise WorkerLoadFailed(session.record.id, _redact(result.error))
        telemetry.LOADS.inc(adapter.base_model, "ok")
        telemetry.LOAD_SECONDS.observe(adapter.base_model, value=result.duration_ms / 1000)
        await self.report(session, list(result.resident), session.record.healthy)
        log.info("loaded %s on %s in %d ms", adapter.id, session.record.id, result.duration_ms)
        return result

    async def _evict(self, session: AgentSession, adapter_id: str) -> None:
        generation = await self._store.desire(session.record.id, adapter_id, wanted=False)
        cid = uuid.uuid4().hex
        evict = pb.EvictAdapter(
            command_id=cid, vllm_name=adapter_id, generation=generation, request_id=logs.REQUEST_ID.get()
        )
        msg = pb.ConnectResponse(evict=evict)
        try:
            result = await session.command(msg, cid, self._load_timeout)
        except CommandFailed as err:
            raise NoCapacity(f"evicting to make room failed: {err}") from None
        if not result.ok:
            raise NoCapacity(f"evicting to make room failed: {_redact(result.error)}")
        await self.report(session, list(result.resident), session.record.healthy)
        telemetry.EVICTIONS.inc(session.record.base_model)
        log.info("evicted %s from %s", adapter_id, session.record.id)
