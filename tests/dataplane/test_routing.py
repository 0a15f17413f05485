from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import redis.asyncio as redis

from controlplane.store import Store
from dataplane.routing import RoutingTable, Worker, candidates, is_hot, least_loaded
from loraplane.state.records import WorkerRecord
from tests.support import RedisServer


def w(wid: str, resident: set[str], healthy: bool = True, base: str = "m") -> Worker:
    return Worker(wid, base, f"http://{wid}", frozenset(resident), healthy)


def test_an_adapter_goes_to_its_least_loaded_holder() -> None:
    workers = [w("a", {"x"}), w("b", {"x"}), w("c", set()), w("d", {"x"}, healthy=False)]
    pool = candidates(workers, "m", "x")
    assert [v.id for v in pool] == ["a", "b"]
    assert least_loaded(pool, Counter({"a": 3, "b": 1})) == workers[1]
    assert [v.id for v in candidates(workers, "m", None)] == ["a", "b", "c"]
    assert candidates(workers, "other", None) == []


@pytest.mark.parametrize(
    ("in_flight", "holders", "hot"),
    [(4, 1, False), (5, 1, True), (8, 2, False), (9, 2, True), (100, 0, False)],
)
def test_an_adapter_is_hot_past_the_threshold_per_holder(in_flight: int, holders: int, hot: bool) -> None:
    assert is_hot(in_flight, holders, threshold=4) is hot


def test_a_suspect_worker_is_skipped_for_a_while() -> None:
    table = RoutingTable(client=None)  # type: ignore[arg-type]
    workers = [w("a", set()), w("b", set())]
    table.suspect("a", for_s=60)
    table.suspect("b", for_s=-1)  # already over
    assert table.usable(workers) == [workers[1]]


async def test_a_suspect_worker_reported_down_then_serving_is_used_at_once(redis_server: RedisServer) -> None:
    """Its agent restarted the engine: the record went unhealthy, then healthy (the new engine
    serves); the table need not wait out the suspicion."""
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/10", decode_responses=True)
    await r.flushdb()
    store, table = Store(r), RoutingTable(r)
    records = [WorkerRecord(wid, "m", f"http://{wid}", 8) for wid in ("a", "b")]
    for rec in records:
        await store.put_worker(rec)
    await table.refresh()
    table.suspect("a", for_s=60)
    table.suspect("b", for_s=60)
    await store.put_worker(replace(records[0], healthy=False))
    await table.refresh()
    await store.put_worker(records[0])
    await table.refresh()
    assert [x.id for x in table.usable(table.workers)] == ["a"]  # b never went down: still suspect
    await r.aclose()
