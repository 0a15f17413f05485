"""The routing table: a versioned in-process snapshot of the workers, read from Redis
(see `dataplane/events.py` for what keeps it fresh); and worker choice as small pure
functions over it."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis

from loraplane.state import queries

log = logging.getLogger(__name__)
SUSPECT_S = 5.0


@dataclass(frozen=True)
class Worker:
    id: str
    base_model: str
    endpoint: str
    resident: frozenset[str]
    healthy: bool


def candidates(workers: Sequence[Worker], base_model: str, adapter_id: str | None) -> list[Worker]:
    """Healthy workers of the base model; for an adapter, only those that hold it."""
    ok = [w for w in workers if w.healthy and w.base_model == base_model]
    if adapter_id is None:
        return ok
    return [w for w in ok if adapter_id in w.resident]


def least_loaded(workers: Sequence[Worker], in_flight: Counter[str]) -> Worker | None:
    return min(workers, key=lambda w: (in_flight[w.id], w.id), default=None)


def is_hot(in_flight: int, holders: int, threshold: int) -> bool:
    """An adapter whose requests in flight pass `threshold` per worker holding it wants one more."""
    return holders > 0 and in_flight > threshold * holders


class RoutingTable:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self.version = -1
        self.workers: tuple[Worker, ...] = ()
        self.in_flight: Counter[str] = Counter()  # per worker, from this data plane
        self.adapter_in_flight: Counter[str] = Counter()
        self._suspects: dict[str, float] = {}  # worker id -> until when it is skipped

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

    async def refresh(self) -> None:
        version, records = await queries.routing_table(self._r, self.version)
        if records is None:
            return
        workers = tuple(Worker(w.id, w.base_model, w.endpoint, frozenset(w.resident), w.healthy) for w in records)
        if self._suspects:  # a worker whose agent reported it down and then serving again has proved itself
            was_down = {w.id for w in self.workers if not w.healthy}
            for w in workers:
                if w.healthy and w.id in was_down:
                    self._suspects.pop(w.id, None)
        self.workers, self.version = workers, version
