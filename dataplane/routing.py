"""The routing table: a versioned in-process snapshot of the workers, kept fresh
from Redis by pub/sub; and worker choice as small pure functions over it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis

log = logging.getLogger(__name__)
CHANNEL = "lp:routing"


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


class RoutingTable:
    def __init__(self, client: redis.Redis, refresh_s: float) -> None:
        self._r = client
        self._refresh_s = refresh_s
        self.version = -1
        self.workers: tuple[Worker, ...] = ()
        self.in_flight: Counter[str] = Counter()
        self._changed = asyncio.Event()

    def get(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    async def refresh(self) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.get("lp:routing:version")
            pipe.smembers("lp:workers")
            raw_version, ids = await pipe.execute()
        version = int(raw_version or 0)
        if version == self.version:
            return
        ids = sorted(str(i) for i in ids)
        raws = await self._r.mget([f"lp:worker:{i}" for i in ids]) if ids else []
        workers = []
        for raw in raws:
            if raw:
                w = json.loads(raw)
                workers.append(Worker(w["id"], w["base_model"], w["endpoint"], frozenset(w["resident"]), w["healthy"]))
        self.workers, self.version = tuple(workers), version
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def follow(self) -> None:
        """Apply every published change; re-read periodically in case one was missed.
        While Redis is down, the last snapshot keeps serving."""
        while True:
            try:
                async with self._r.pubsub() as ps:
                    await ps.subscribe(CHANNEL)
                    await self.refresh()
                    while True:
                        # a message, or a timeout: either way, re-read (refresh skips same versions)
                        await ps.get_message(ignore_subscribe_messages=True, timeout=self._refresh_s)
                        await self.refresh()
            except asyncio.CancelledError:
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
                log.warning("routing table refresh failed (%s); serving version %d", err, self.version)
                await asyncio.sleep(self._refresh_s)
