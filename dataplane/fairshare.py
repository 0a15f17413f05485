"""Fair share of a base model's workers when they are full: each worker takes at most its
engine's concurrency (`Worker.capacity`, vLLM's --max-num-seqs, split among the data plane
replicas); a request that finds no room waits here, in its tenant's queue, and queues are served
by weighted fair queuing (weights by tier), for at most `queue_timeout_s`.

The unit is a scope: one base model's workers in one pool (the shared workers, or one tenant's
dedicated pool, which only its tenant uses, so its traffic never waits behind anyone else's).

Fairness without idling capacity: a tenant that has work takes any free slot, except the slots
kept for the other tenants that were active lately and hold less than their fair share (share:
the scope's capacity split by weight among the tenants active in the last `ACTIVE_S`); each such
tenant is kept as many slots as it used at its peak lately, plus one, up to its share. A tenant
alone gets every slot; a flood from one tenant leaves a light tenant the few slots it uses, so
the light one's requests do not wait for the flood's to finish. Waiting requests are taken in
the order of their virtual finish times (start: the later of the scope's virtual time and the
tenant's last finish; finish: start + 1/weight), each only when a slot is free for it under the
rule above and one of its candidate workers has room.

Per data plane replica: each replica counts only its own requests in flight, and keeps each
worker to `capacity / replicas` of them, the replicas counted by their beats in Redis
(`follow_replicas`) unless LORAPLANE_DATAPLANE_REPLICAS says; see docs/dataplane.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as redis

from dataplane.errors import RateLimited, Unavailable
from dataplane.metrics import Metrics
from dataplane.routing import Worker
from loraplane.state import keys

log = logging.getLogger(__name__)

ACTIVE_S = 2.0  # a tenant with requests in the last this-many seconds is active (its peak, twice that)
POLL_S = 0.25  # a waiting request looks again this often (routing changes wake nobody)
UNLIMITED = 1 << 30

# The workers a request may use, with room for one more request: the best one, or None.
Pick = Callable[[], Worker | None]


class QueueTimeout(Unavailable):
    code = "server_overloaded"


class QueueFull(RateLimited):
    code = "queue_full"


@dataclass
class Waiter:
    tenant: TenantShare
    tag: float  # virtual finish time
    pick: Pick
    future: asyncio.Future[Worker]


@dataclass
class TenantShare:
    """A tenant's requests in one scope: in flight, waiting, and its recent peak of both."""

    tier: str
    weight: int
    in_flight: int = 0
    waiting: deque[Waiter] = field(default_factory=deque)
    finish: float = 0.0  # virtual finish time of its last request queued
    window: float = 0.0  # when the current peak window began
    peak: int = 0  # most requests in flight or waiting at once in the current window
    last_peak: int = 0  # ... in the window before

    def note(self, now: float) -> int:
        """Its recent peak (in this window or the last), rolling the windows as time passes."""
        if now - self.window >= ACTIVE_S:
            self.last_peak = self.peak if now - self.window < 2 * ACTIVE_S else 0
            self.peak, self.window = 0, now
        self.peak = max(self.peak, self.in_flight + len(self.waiting))
        return max(self.peak, self.last_peak)


@dataclass
class Scope:
    workers: Callable[[], Sequence[Worker]]  # its workers now
    tenants: dict[str, TenantShare] = field(default_factory=dict)
    vtime: float = 0.0
    queued: int = 0


class Slot:
    """A request's place on a worker, given back once (`release`)."""

    def __init__(self, gate: Gate, scope: Scope, tenant: TenantShare, worker: Worker) -> None:
        self._gate, self._scope, self._tenant, self.worker = gate, scope, tenant, worker
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.leave(self._scope, self._tenant, self.worker)


class Gate:
    """`in_flight`: requests in flight per worker (this replica's, the routing table's counter);
    `capacity_override`: each worker's concurrency if not 0, else the worker's own; `replicas`:
    data plane replicas sharing the workers; `weights`: by tier."""

    def __init__(
        self,
        in_flight: Counter[str],
        metrics: Metrics,
        weights: dict[str, int],
        queue_timeout_s: float,
        max_queued: int,
        replicas: int = 1,
        capacity_override: int = 0,
    ) -> None:
        self._in_flight = in_flight
        self._metrics = metrics
        self._weights = weights
        self._timeout = queue_timeout_s
        self._max_queued = max_queued
        self.replicas = max(1, replicas)
        self._override = capacity_override
        self._scopes: dict[tuple[str, str], Scope] = {}

    def capacity(self, worker: Worker) -> int:
        """Requests this replica may have in flight on the worker (UNLIMITED: not known)."""
        cap = self._override or worker.capacity
        return math.ceil(cap / self.replicas) if cap > 0 else UNLIMITED

    def has_room(self, worker: Worker) -> bool:
        return self._in_flight[worker.id] < self.capacity(worker)

    def scope(self, base_model: str, pool: str, workers: Callable[[], Sequence[Worker]]) -> Scope:
        key = (base_model, pool)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = Scope(workers)
        scope.workers = workers
        return scope

    async def enter(self, scope: Scope, tenant_id: str, tier: str, pick: Pick, base_model: str) -> Slot:
        """A slot on a worker `pick` gives, at once when the rule allows, else after waiting in
        the tenant's queue; QueueTimeout (503) after `queue_timeout_s`, QueueFull (429) when the
        tenant already has `max_queued` requests waiting here."""
        now = time.monotonic()
        share = scope.tenants.get(tenant_id)
        if share is None:
            share = scope.tenants[tenant_id] = TenantShare(tier, self._weights.get(tier, 1), window=now)
        elif share.tier != tier:  # its tier changed: its weight from now on
            share.tier, share.weight = tier, self._weights.get(tier, 1)
        if not scope.queued:
            worker = pick()
            if worker is not None and self._may_take(scope, share, now):
                self._take(scope, share, worker)
                return Slot(self, scope, share, worker)
        if len(share.waiting) >= self._max_queued:
            self._metrics.queue_rejected.inc(tier, "full")
            raise QueueFull(
                f"{len(share.waiting)} of the tenant's requests are already waiting for {base_model}; "
                "wait for some to finish",
                headers={"Retry-After": "1"},
            )
        return await self._wait(scope, share, pick, base_model, now)

    async def _wait(self, scope: Scope, share: TenantShare, pick: Pick, base_model: str, since: float) -> Slot:
        start = max(scope.vtime, share.finish)
        share.finish = start + 1.0 / share.weight
        waiter = Waiter(share, share.finish, pick, asyncio.get_running_loop().create_future())
        share.waiting.append(waiter)
        scope.queued += 1
        share.note(since)
        depth, tier = self._metrics.queue_depth, share.tier
        depth.add(base_model, tier, by=1)
        try:
            deadline = since + self._timeout
            while not waiter.future.done():
                self._dispatch(scope)
                left = deadline - time.monotonic()
                if waiter.future.done():
                    break
                if left <= 0:
                    self._metrics.queue_rejected.inc(tier, "timeout")
                    raise QueueTimeout(
                        f"{base_model}'s workers are at capacity: the request waited {self._timeout:.0f}s for "
                        "a slot; try again later"
                    )
                await asyncio.wait((waiter.future,), timeout=min(left, POLL_S))
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():  # given a slot as it gave up
                self.leave(scope, share, waiter.future.result())
            else:
                waiter.future.cancel()
                share.waiting.remove(waiter)
                scope.queued -= 1
            raise
        finally:
            depth.add(base_model, tier, by=-1)
        self._metrics.queue_wait.observe(tier, value=time.monotonic() - since)
        return Slot(self, scope, share, waiter.future.result())

    def leave(self, scope: Scope, share: TenantShare, worker: Worker) -> None:
        self._in_flight[worker.id] -= 1
        share.in_flight -= 1
        if scope.queued:
            self._dispatch(scope)

    def _take(self, scope: Scope, share: TenantShare, worker: Worker) -> None:
        self._in_flight[worker.id] += 1
        share.in_flight += 1
        share.note(time.monotonic())

    def _dispatch(self, scope: Scope) -> None:
        """Waiting requests onto free slots, in virtual finish order, while the rule allows."""
        while scope.queued:
            now = time.monotonic()
            heads = sorted((s.waiting[0] for s in scope.tenants.values() if s.waiting), key=lambda w: w.tag)
            for waiter in heads:
                if not self._may_take(scope, waiter.tenant, now):
                    continue
                worker = waiter.pick()
                if worker is None:
                    continue
                waiter.tenant.waiting.popleft()
                scope.queued -= 1
                scope.vtime = max(scope.vtime, waiter.tag - 1.0 / waiter.tenant.weight)
                self._take(scope, waiter.tenant, worker)
                waiter.future.set_result(worker)
                break
            else:
                return

    def _may_take(self, scope: Scope, share: TenantShare, now: float) -> bool:
        """Whether the tenant may take a free slot now: one is free, and it is under its fair
        share or the free slots are more than those kept for the other tenants under theirs."""
        total = free = 0
        for w in scope.workers():
            cap = self.capacity(w)
            if cap == UNLIMITED:
                return True
            total += cap
            free += max(0, cap - self._in_flight[w.id])
        if free <= 0:
            return False
        share.note(now)
        peaks = {}
        weights = 0
        for tid, s in list(scope.tenants.items()):
            peak = s.note(now)
            if peak == 0 and s is not share:  # idle for two windows: forgotten
                del scope.tenants[tid]
                continue
            peaks[tid] = peak
            weights += s.weight
        kept = 0
        for tid, s in scope.tenants.items():
            fair = total * s.weight / weights
            if s is share:
                if s.in_flight < fair:
                    return True
                continue
            if s.in_flight < fair:
                kept += max(0, min(math.ceil(fair), peaks[tid] + 1) - s.in_flight)
        return free > kept


async def follow_replicas(client: redis.Redis, gate: Gate, replica: str, every_s: float = 2.0) -> None:
    """Beat this replica into `dataplanes` and count the live ones (a beat in the last 5 beats),
    so that the replicas together keep each worker to its concurrency, however many run (an
    autoscaler's). Redis away: the last count holds."""
    while True:
        try:
            now = time.time()
            async with client.pipeline(transaction=True) as pipe:
                pipe.zadd(keys.DATA_PLANES, {replica: now})
                pipe.zremrangebyscore(keys.DATA_PLANES, 0, now - 5 * every_s)
                pipe.zcard(keys.DATA_PLANES)
                *_, live = await pipe.execute()
            if live != gate.replicas:
                log.info("%d data plane replica(s) share the workers", live)
            gate.replicas = max(1, int(live))
        except redis.RedisError as err:
            log.debug("counting data plane replicas: %s", err)
        await asyncio.sleep(every_s)
