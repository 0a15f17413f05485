"""The routing table: a versioned in-process snapshot of the workers, read from Redis
(see `dataplane/events.py` for what keeps it fresh); and worker choice as small pure
functions over it."""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from dataclasses import dataclass, replace

import redis.asyncio as redis

from loraplane.state import queries

log = logging.getLogger(__name__)
SUSPECT_S = 5.0
# A holder whose GPU slots hold the adapter (as far as this data plane can tell) is taken over a
# less loaded holder, unless it has more than this many more requests in flight: swapping an
# adapter in from host memory costs little, a queue behind a busy engine more. Bounded, so that
# one copy of an adapter cannot take all its traffic while its other copies' slots forget it.
HOT_CREDIT = 4


@dataclass(frozen=True)
class Worker:
    id: str
    base_model: str
    endpoint: str
    resident: frozenset[str]
    healthy: bool
    pool: str = ""  # the tenant whose dedicated pool it is in; "": shared
    capacity: int = 0  # most requests its engine runs at once; 0: not known (no queueing)
    # Its engine's LoRA slots when it holds more adapters loaded than that (the others wait in host
    # memory); 0: no host-memory tier (or an agent too old to say).
    gpu_slots: int = 0


def candidates(workers: Sequence[Worker], base_model: str, adapter_id: str | None, pool: str = "") -> list[Worker]:
    """Healthy workers of the base model in `pool` (a tenant's id, or "" the shared workers); for
    an adapter, only those that hold it."""
    ok = [w for w in workers if w.healthy and w.base_model == base_model and w.pool == pool]
    if adapter_id is None:
        return ok
    return [w for w in ok if adapter_id in w.resident]


def least_loaded(
    workers: Sequence[Worker],
    in_flight: Counter[str],
    adapter_id: str | None = None,
    in_gpu: Mapping[str, Container[str]] | None = None,
) -> Worker | None:
    """The worker with the fewest requests in flight; for an adapter, one whose GPU slots hold it
    (`in_gpu`: per worker with a host-memory tier, the adapters estimated there) counts HOT_CREDIT
    fewer, and wins a tie."""
    if adapter_id is None or not in_gpu:
        return min(workers, key=lambda w: (in_flight[w.id], w.id), default=None)

    def key(w: Worker) -> tuple[int, bool, str]:
        slots = in_gpu.get(w.id)
        hot = slots is not None and adapter_id in slots
        return (in_flight[w.id] - HOT_CREDIT if hot else in_flight[w.id], not hot, w.id)

    return min(workers, key=key, default=None)


def is_hot(in_flight: int, holders: int, threshold: int) -> bool:
    """An adapter whose requests in flight pass `threshold` per worker holding it wants one more."""
    return holders > 0 and in_flight > threshold * holders


# Requests in flight per copy below which an adapter gets no copy for balance: one request per
# copy cannot be split, and a copy for it only churns places (bench/affinity.py's W2 with a host
# tier: with 1, fourteen times the loads for the same balance).
COPY_MIN_IN_FLIGHT = 2


def wants_copy(
    adapter_in_flight: int,
    holders: Sequence[Worker],
    in_flight: Counter[str],
    workers: Callable[[], Sequence[Worker]],
    threshold: int,
) -> bool:
    """Whether an adapter wants one more copy, counting the request being routed
    (`adapter_in_flight` includes it): past `threshold` requests in flight per holder (`is_hot`);
    or, where every holder has a host-memory tier (a copy takes a place in host memory, not a
    GPU slot), relative to the fleet: even its least loaded holder would have more requests in
    flight with this one than the mean of `workers` (the base model's in the pool, holders
    among them; asked for only past the cheap tests), and it has at least COPY_MIN_IN_FLIGHT
    requests in flight per holder. The copy goes elsewhere; requests then spread over the copies
    by load. Without a host tier a copy evicts an adapter from a GPU slot, and the fleet-relative
    rule costs more loads than it saves imbalance (bench/affinity.py): the threshold alone."""
    if is_hot(adapter_in_flight, len(holders), threshold):
        return True
    if not holders or adapter_in_flight < COPY_MIN_IN_FLIGHT * len(holders):
        return False
    if not all(w.gpu_slots for w in holders):
        return False
    fleet = workers()
    if len(fleet) <= len(holders):
        return False
    least = min(in_flight[w.id] for w in holders) + 1
    return least * len(fleet) > sum(in_flight[w.id] for w in fleet) + 1


# Of these control plane replicas (addresses), those that answer.
Vouch = Callable[[set[str]], Awaitable[set[str]]]


class RoutingTable:
    """`vouch`: at the first read, a healthy worker whose owner replica does not answer is taken
    as a previous run's (everything restarted, this data plane before any control plane) and
    not counted until its record changes: a control plane marks it down, or its agent registers."""

    def __init__(self, client: redis.Redis, vouch: Vouch | None = None) -> None:
        self._r = client
        self._vouch = vouch
        self._unproven: dict[str, float] = {}  # worker id -> `updated_at` of the record not vouched for
        self.version = -1
        self.workers: tuple[Worker, ...] = ()
        # (tenant, base model) of every dedicated pool (of workers live or not)
        self.pooled: frozenset[tuple[str, str]] = frozenset()
        self.in_flight: Counter[str] = Counter()  # per worker, from this data plane
        self.adapter_in_flight: Counter[str] = Counter()
        self._suspects: dict[str, float] = {}  # worker id -> until when it is skipped
        # What placements told this data plane before the worker's record did: worker id ->
        # (`updated_at` of the record read then, the adapters placed on it since).
        self._placed: dict[str, tuple[float, frozenset[str]]] = {}
        self._updated_at: dict[str, float] = {}
        # Per worker with a host-memory tier: the last `gpu_slots` distinct adapters this data plane
        # sent it, least recently first — its estimate of what is in that worker's GPU slots.
        self.in_gpu: dict[str, OrderedDict[str, None]] = {}

    def routed(self, worker: Worker, adapter_id: str) -> None:
        """A request for the adapter went to the worker: its engine swaps it into a GPU slot,
        out of which the least recently used goes back to host memory."""
        if not worker.gpu_slots:
            return
        slots = self.in_gpu.get(worker.id)
        if slots is None:
            slots = self.in_gpu[worker.id] = OrderedDict()
        if adapter_id in slots:
            slots.move_to_end(adapter_id)
            return
        slots[adapter_id] = None
        if len(slots) > worker.gpu_slots:
            slots.popitem(last=False)

    def suspect(self, worker_id: str, for_s: float = SUSPECT_S) -> None:
        """Skip a worker that just failed to answer, for long enough that its agent's next
        heartbeat can tell the table whether it is down."""
        self._suspects[worker_id] = time.monotonic() + for_s

    def usable(self, workers: Sequence[Worker]) -> Sequence[Worker]:
        if not self._suspects:  # the usual case: no copy on the hot path
            return workers
        now = time.monotonic()
        return [w for w in workers if self._suspects.get(w.id, 0.0) < now]

    def get(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def placed(self, worker_id: str, adapter_id: str) -> Worker | None:
        """A placement's answer: the adapter is on the worker, as far as this table goes, until
        the worker's record is rewritten (its agent's report is the word after that) — so that
        the next request goes there even if Redis went away before that report reached it."""
        worker = self.get(worker_id)
        if worker is None or adapter_id in worker.resident:
            return worker
        since, adapters = self._placed.get(worker_id, (self._updated_at.get(worker_id, 0.0), frozenset()))
        self._placed[worker_id] = (since, adapters | {adapter_id})
        worker = replace(worker, resident=worker.resident | {adapter_id})
        self.workers = tuple(worker if w.id == worker_id else w for w in self.workers)
        return worker

    async def refresh(self) -> None:
        version, records = await queries.routing_table(self._r, self.version)
        if records is None:
            return
        if self.version < 0 and self._vouch is not None:
            live = await self._vouch({w.owner for w in records if w.healthy and w.owner})
            self._unproven = {w.id: w.updated_at for w in records if w.healthy and w.owner and w.owner not in live}
            if self._unproven:
                log.warning("not routing to %d worker(s) until they register again: no replica answers for them",
                            len(self._unproven))  # fmt: skip
        if self._unproven:  # those rewritten since are proven
            self._unproven = {w.id: w.updated_at for w in records if self._unproven.get(w.id) == w.updated_at}
        self._updated_at = {w.id: w.updated_at for w in records}
        if self._placed:  # a placement's word holds until the worker's record is rewritten
            self._placed = {i: p for i, p in self._placed.items() if self._updated_at.get(i) == p[0]}
        none: tuple[float, frozenset[str]] = (0.0, frozenset())
        workers = tuple(
            Worker(w.id, w.base_model, w.endpoint, frozenset(w.resident) | self._placed.get(w.id, none)[1],
                   w.healthy and w.id not in self._unproven, w.pool, w.max_concurrency,
                   w.gpu_slots if 0 < w.gpu_slots < w.max_adapters else 0)
            for w in records
        )  # fmt: skip
        if self.in_gpu:
            self._forget(workers)
        if self._suspects:  # a worker whose agent reported it down and then serving again has proved itself
            was_down = {w.id for w in self.workers if not w.healthy}
            for w in workers:
                if w.healthy and w.id in was_down:
                    self._suspects.pop(w.id, None)
        self.workers, self.version = workers, version
        self.pooled = frozenset((w.pool, w.base_model) for w in workers if w.pool)

    def _forget(self, workers: Sequence[Worker]) -> None:
        """Out of the GPU slot estimates: adapters their worker no longer holds, and workers gone
        or without a host-memory tier now."""
        by_id = {w.id: w for w in workers}
        for worker_id, slots in list(self.in_gpu.items()):
            w = by_id.get(worker_id)
            if w is None or not w.gpu_slots:
                del self.in_gpu[worker_id]
                continue
            for adapter_id in [a for a in slots if a not in w.resident]:
                del slots[adapter_id]
            while len(slots) > w.gpu_slots:
                slots.popitem(last=False)

    def pools(self, tenant_id: str, base_model: str, spill: bool) -> tuple[str, ...]:
        """Where a tenant's requests for a base model may go, in order: its dedicated pool if it
        has one of that model (then the shared workers, if it may spill over), else the shared
        workers."""
        if (tenant_id, base_model) not in self.pooled:
            return ("",)
        return (tenant_id, "") if spill else (tenant_id,)
