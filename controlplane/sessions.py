"""This replica's agent sessions: the workers whose agents hold a stream to it, what they report
(registration, heartbeats, command results), and the load and evict commands sent down those
streams. What to load where is decided elsewhere (`placer`, `reconcile`)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace

from controlplane import telemetry
from controlplane.errors import NoCapacity
from controlplane.placement import LoadBudget, Placement, WorkerView
from controlplane.store import Store
from loraplane import logs
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.state.records import ENGINE_STATES, SERVING, Activity, AdapterRecord, WorkerRecord

log = logging.getLogger(__name__)
OUTBOX_SIZE = 64
ACTIVITY_TTL_S = 30  # a worker's activity record expires this long after its last heartbeat
ACTIVITY_REFRESH_S = 10.0  # well inside ACTIVITY_TTL_S
ENGINE_ERROR_CHARS = 500  # of the engine's last error line, kept in the worker's record


class CommandFailed(Exception):
    pass


class WorkerLoadFailed(NoCapacity):
    """One worker failed to load the adapter; another may succeed."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"{worker_id}: {reason}")
        self.worker_id = worker_id


def serving(engine: pb.EngineStatus) -> bool:
    """Whether the engine takes requests: an agent too old to report its engine is taken at its word."""
    return engine.state in ("", SERVING)


def _engine_label(state: str) -> str:
    """The engine state as a metric label: one of a bounded set, whatever the agent sent."""
    return state if state in ENGINE_STATES else "unknown"


def _redact(error: str) -> str:
    """A worker's error as tenants may read it: no file system paths, bounded."""
    return re.sub(r"(?<![\w.])/[^\s'\",:]+", "<path>", error)[:300] or "unknown error"


@dataclass
class AgentSession:
    record: WorkerRecord
    budget: LoadBudget  # this worker's loads per second
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
    prefetch: bool = False  # its agent takes PrefetchArtifact commands

    def view(self, draining: bool, pool: str = "") -> WorkerView:
        r = self.record
        return WorkerView(
            id=r.id,
            base_model=r.base_model,
            healthy=r.healthy,
            max_adapters=r.max_adapters,
            resident=frozenset(r.resident),
            cached=frozenset(r.cached),
            loading=frozenset(self.loading),
            evicting=frozenset(self.evicting),
            draining=draining,
            in_flight=self.in_flight,
            busy=self.busy,
            pool=pool,
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


class Sessions:
    """The agents connected to this replica, by worker id. `addr` is where the other replicas
    reach this one: it is recorded as the `owner` of these workers."""

    def __init__(self, store: Store, addr: str, load_timeout_s: float, max_loads_per_s: int) -> None:
        self._store = store
        self.addr = addr
        self._load_timeout = load_timeout_s
        self._max_loads_per_s = max_loads_per_s
        self._by_worker: dict[str, AgentSession] = {}
        self._detaching: set[asyncio.Task[None]] = set()

    def get(self, worker_id: str) -> AgentSession | None:
        return self._by_worker.get(worker_id)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._by_worker

    def all(self) -> list[AgentSession]:
        return list(self._by_worker.values())

    async def attach(self, reg: pb.Register) -> AgentSession:
        old = self._by_worker.pop(reg.worker_id, None)
        if old:
            old.fail_all("worker reconnected")
        record = WorkerRecord(
            id=reg.worker_id,
            base_model=reg.base_model,
            endpoint=reg.endpoint,
            max_adapters=reg.max_adapters,
            resident=sorted(reg.resident),
            healthy=serving(reg.engine),
            updated_at=time.time(),
            owner=self.addr,
            engine_state=reg.engine.state,
            engine_error=reg.engine.last_error[:ENGINE_ERROR_CHARS],
            engine_restarts=reg.engine.restarts,
            max_concurrency=reg.max_concurrency,
            gpu_slots=reg.gpu_slots,
        )
        session = AgentSession(record, LoadBudget(self._max_loads_per_s), prefetch=reg.prefetch)
        self._by_worker[reg.worker_id] = session
        self._count()
        # Before the record: a replica that sees this record sees a live worker (`Liveness.sweep`).
        await self._store.put_activity(record.id, Activity(owner=self.addr), ACTIVITY_TTL_S)
        session.activity_written = time.monotonic()
        await self._store.put_worker(record)
        log.info("worker %s registered (%s, %d resident, engine %s)",
                 reg.worker_id, reg.base_model, len(reg.resident), reg.engine.state or "not reported")  # fmt: skip
        return session

    def _count(self) -> None:
        """The connected agents per base model, and their engines per state (label sets left
        with none show 0)."""
        agents = dict.fromkeys(telemetry.AGENTS.values, 0.0)
        engines = dict.fromkeys(telemetry.ENGINES.values, 0.0)
        for s in self._by_worker.values():
            model, state = s.record.base_model, _engine_label(s.record.engine_state)
            agents[(model,)] = agents.get((model,), 0.0) + 1
            engines[(model, state)] = engines.get((model, state), 0.0) + 1
        for labels, n in agents.items():
            telemetry.AGENTS.set(*labels, value=n)
        for labels, n in engines.items():
            telemetry.ENGINES.set(*labels, value=n)

    def detach_soon(self, session: AgentSession) -> asyncio.Task[None]:
        """`detach` in a task of its own, which cancelling the caller does not cut short (gRPC
        may cancel a stream's handler again while it cleans up: a detach stopped at its Redis
        write left the worker in routing, ownerless in nobody's memory, for ACTIVITY_TTL_S);
        `settle` waits for it."""
        task = asyncio.ensure_future(self.detach(session))
        self._detaching.add(task)
        task.add_done_callback(self._detaching.discard)
        return task

    async def settle(self) -> None:
        """Until every detach started has written (before Redis is closed)."""
        if self._detaching:
            await asyncio.gather(*self._detaching, return_exceptions=True)

    async def detach(self, session: AgentSession) -> None:
        session.fail_all("worker disconnected")
        if self._by_worker.get(session.record.id) is session:
            del self._by_worker[session.record.id]
            self._count()
            current = await self._store.get_worker(session.record.id)
            if current is None or current.owner == self.addr:  # not already taken over elsewhere
                await self._store.put_worker(replace(session.record, healthy=False, owner="", updated_at=time.time()))
            log.info("worker %s disconnected", session.record.id)

    async def report(
        self,
        session: AgentSession,
        resident: list[str],
        healthy: bool,
        busy: frozenset[str] | None = None,
        seen: bool = True,
        engine: pb.EngineStatus | None = None,
        cached: list[str] | None = None,
    ) -> None:
        """Record what vLLM really holds, its engine's state and what its node's disk cache holds
        (None: unchanged); writes Redis only when that changed."""
        if seen:
            session.last_seen = time.monotonic()
        if busy is not None:
            session.busy = busy
        rec = session.record
        new = replace(rec, resident=sorted(resident), healthy=healthy)
        if engine is not None:
            error = engine.last_error[:ENGINE_ERROR_CHARS]
            new = replace(new, engine_state=engine.state, engine_error=error, engine_restarts=engine.restarts)
        if cached is not None:
            new = replace(new, cached=sorted(set(cached)))
        if new != rec or session.unsynced:
            # A write that failed may still have landed (a timeout): the next report writes again.
            session.unsynced = True
            session.record = replace(new, updated_at=time.time())
            if new.engine_state != rec.engine_state:
                self._count()
                log.info("worker %s: engine %s", rec.id, new.engine_state or "not reported")
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
        engine: pb.EngineStatus | None = None,
        cached: list[str] | None = None,
    ) -> None:
        """`engine`: the engine's state, `cached`: the adapters on its node's disk cache, not loaded
        (None: unchanged); the worker is healthy only while it serves."""
        if commands_done is not None and commands_done < session.results_seen:
            # Measured before a result already applied: older news (a load takes an adapter from
            # the cache, an eviction may leave it there).
            resident, cached = session.record.resident, None
        now = time.monotonic()
        changed = (frozenset(busy), in_flight) != (session.busy, session.in_flight)
        if changed or now - session.activity_written > ACTIVITY_REFRESH_S:
            activity = Activity(frozenset(busy), in_flight, self.addr)
            await self._store.put_activity(session.record.id, activity, ACTIVITY_TTL_S)
            session.activity_written = now
        session.in_flight = in_flight
        healthy = healthy and (engine is None or serving(engine))
        await self.report(session, resident, healthy, frozenset(busy), engine=engine, cached=cached)

    async def load(self, session: AgentSession, adapter: AdapterRecord, keep_intent: bool = False) -> Placement:
        """Record the intent, then load. A failed placement drops the intent; a failed reload
        (`keep_intent`) keeps it, to be tried again on a later heartbeat."""
        generation = await self._store.desire(session.record.id, adapter.id)
        try:
            result = await self._send_load(session, adapter, generation)
        except NoCapacity:
            if not keep_intent:
                await self._store.desire(session.record.id, adapter.id, wanted=False)
            raise
        return Placement(session.record.id, result.already_done, result.duration_ms)

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

    async def prefetch(self, session: AgentSession, adapter: AdapterRecord) -> None:
        """The adapter's bytes into the worker's node cache, not loaded."""
        cid = uuid.uuid4().hex
        cmd = pb.PrefetchArtifact(
            command_id=cid,
            sha256=adapter.sha256,
            size_bytes=adapter.size_bytes,
            request_id=logs.REQUEST_ID.get(),
            vllm_name=adapter.vllm_name,
        )
        try:
            result = await session.command(pb.ConnectResponse(prefetch=cmd), cid, self._load_timeout)
        except CommandFailed as err:
            raise NoCapacity(f"prefetching onto {session.record.id} failed: {err}") from None
        if not result.ok:
            raise NoCapacity(f"prefetching onto {session.record.id} failed: {_redact(result.error)}")
        log.info("prefetched %s onto %s in %d ms", adapter.id, session.record.id, result.duration_ms)

    async def evict(self, session: AgentSession, adapter_id: str) -> None:
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
