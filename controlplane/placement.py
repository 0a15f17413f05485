"""Placement decisions as small pure functions over a snapshot of workers."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    id: str
    base_model: str
    healthy: bool
    max_adapters: int
    resident: frozenset[str]
    loading: frozenset[str] = frozenset()
    evicting: frozenset[str] = frozenset()  # victims another placement is evicting now
    draining: bool = False
    in_flight: int = 0  # requests running or waiting in its vLLM
    busy: frozenset[str] = frozenset()  # its adapters with requests in flight
    pool: str = ""  # the tenant whose dedicated pool it is in; "": shared
    cached: frozenset[str] = frozenset()  # adapters on its node's disk cache, not loaded (no fetch to load)

    @property
    def used(self) -> int:
        return len(self.resident | self.loading)


class LoadBudget:
    """At most `per_second` loads on one worker in any second, so that thrash (more hot
    adapters than slots) cannot starve serving: `delay` says how long the next load must wait."""

    def __init__(self, per_second: int) -> None:
        self._per_second = per_second
        self._recent: deque[float] = deque()

    def delay(self, now: float) -> float:
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) < self._per_second:
            return 0.0
        return 1.0 - (now - self._recent[0])

    def spend(self, now: float) -> None:
        self._recent.append(now)


@dataclass(frozen=True)
class Placement:
    """Where an adapter is now resident, on this replica's worker or another's."""

    worker_id: str
    already_loaded: bool  # it was resident before: nothing was loaded
    load_ms: int = 0  # how long the load took; 0 when none was needed or it is not known


@dataclass(frozen=True)
class Decision:
    worker_id: str
    already_loaded: bool
    evict: str | None = None


def decide(
    workers: Sequence[WorkerView],
    base_model: str,
    adapter_id: str,
    last_used: Mapping[str, float],
    busy: frozenset[str] = frozenset(),
    avoid: frozenset[str] = frozenset(),
    replicate: bool = False,
    pool: str = "",
    pinned: frozenset[str] = frozenset(),
) -> Decision | None:
    """Where an adapter should be, fastest first: resident > a free slot on a worker whose node
    cache holds its bytes (no fetch) > a free slot on the least used worker > evict, on the least
    loaded worker (one whose cache holds it first), its least recently used idle adapter. On a
    worker with a host-memory tier (more adapters loaded than GPU slots) the least recently used
    adapters are those vLLM has most likely moved out of its GPU slots into host memory (it keeps
    its slots by recency too), so eviction goes tier by tier: host memory first, the GPU slots'
    adapters last. Draining workers keep serving
    what they hold but take nothing new. None means no capacity right now.

    Only workers of `pool` are considered: a tenant's dedicated pool (its id), or "" the shared
    workers. `busy` holds adapters with requests in flight and `pinned` those their tenants
    pinned: neither is ever evicted. `avoid`: workers not to use; `replicate` asks for a worker
    that does not hold the adapter yet.
    """
    candidates = [
        w for w in workers if w.healthy and w.base_model == base_model and w.pool == pool and w.id not in avoid
    ]
    if not replicate:
        for w in candidates:
            if adapter_id in w.resident:
                return Decision(w.id, already_loaded=True)
    candidates = [w for w in candidates if not w.draining and adapter_id not in w.resident | w.loading]
    free = [w for w in candidates if w.used < w.max_adapters]
    if free:
        best = min(free, key=lambda w: (adapter_id not in w.cached, w.used, w.in_flight, w.id))
        return Decision(best.id, already_loaded=False)
    options = []
    for w in candidates:
        idle = [a for a in w.resident - w.loading - w.evicting - w.busy if a not in busy and a not in pinned]
        if idle:
            victim = min(idle, key=lambda a: (last_used.get(a, 0.0), a))
            options.append((adapter_id not in w.cached, w.in_flight, last_used.get(victim, 0.0), w.id, victim))
    if not options:
        return None
    *_, worker_id, victim = min(options)
    return Decision(worker_id, already_loaded=False, evict=victim)
