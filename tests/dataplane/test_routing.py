from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import redis.asyncio as redis

from controlplane.store import Store
from dataplane.cpclient import answering
from dataplane.routing import RoutingTable, Worker, candidates, is_hot, least_loaded
from loraplane.state.records import WorkerRecord
from tests.support import RedisServer, free_port, health_server


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


async def test_at_its_first_read_a_worker_no_replica_answers_for_waits_for_its_record_to_change(
    redis_server: RedisServer,
) -> None:
    """Everything restarted and this data plane came up first: a record left healthy by the
    previous run (its owner replica is gone) does not count until a control plane rewrites it."""
    async with health_server() as live:
        await _first_read(redis_server, live)


async def _first_read(redis_server: RedisServer, live: str) -> None:
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/10", decode_responses=True)
    await r.flushdb()
    store = Store(r)
    gone = WorkerRecord("gone", "m", "http://gone", 8, owner=f"127.0.0.1:{free_port()}", updated_at=1.0)
    held = WorkerRecord("held", "m", "http://held", 8, owner=live, updated_at=1.0)
    for rec in (gone, held):
        await store.put_worker(rec)
    table = RoutingTable(r, answering)
    await table.refresh()
    assert {x.id: x.healthy for x in table.workers} == {"gone": False, "held": True}
    await store.put_worker(replace(held, resident=["adp_x"], updated_at=2.0))  # another change: still not vouched
    await table.refresh()
    assert {x.id: x.healthy for x in table.workers} == {"gone": False, "held": True}
    await store.put_worker(replace(gone, owner=live, updated_at=3.0))  # its agent registered again
    await table.refresh()
    assert {x.id: x.healthy for x in table.workers} == {"gone": True, "held": True}
    await r.aclose()


async def test_a_placements_word_holds_until_the_workers_record_is_rewritten(redis_server: RedisServer) -> None:
    """A cold adapter was placed on `a` but its agent's report has not reached the table (Redis
    went away, say): the next request goes to `a` all the same; a newer record is the word."""
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/10", decode_responses=True)
    await r.flushdb()
    store, table = Store(r), RoutingTable(r)
    record = WorkerRecord("a", "m", "http://a", 8, updated_at=1.0)
    await store.put_worker(record)
    await table.refresh()
    assert candidates(table.workers, "m", "x") == []
    placed = table.placed("a", "x")
    assert placed is not None and "x" in placed.resident
    await store.put_worker(replace(record, resident=["y"]))  # read again, not rewritten: still `a`
    await table.refresh()
    assert [v.id for v in candidates(table.workers, "m", "x")] == ["a"]
    await store.put_worker(replace(record, resident=["y"], updated_at=2.0))  # its agent reported since
    await table.refresh()
    assert candidates(table.workers, "m", "x") == [] and candidates(table.workers, "m", "y") != []
    await r.aclose()


async def test_a_tenants_pool_holds_the_base_models_it_serves_only(redis_server: RedisServer) -> None:
    """A tenant whose pool has workers of model m only: its m requests go to its pool (and, when it
    may spill over, the shared workers after), its requests for other models to the shared ones."""
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/10", decode_responses=True)
    await r.flushdb()
    store, table = Store(r), RoutingTable(r)
    pooled = WorkerRecord("p", "m", "http://p", 8)
    for rec in (pooled, WorkerRecord("s", "m", "http://s", 8), WorkerRecord("o", "other", "http://o", 8)):
        await store.put_worker(rec)
    await store.set_pool(pooled, "t1")
    await table.refresh()
    assert table.pools("t1", "m", spill=False) == ("t1",)
    assert table.pools("t1", "m", spill=True) == ("t1", "")
    assert table.pools("t1", "other", spill=False) == ("",)
    assert table.pools("t2", "m", spill=False) == ("",)
    assert [w.id for w in candidates(table.workers, "m", None, "t1")] == ["p"]
    assert [w.id for w in candidates(table.workers, "m", None, "")] == ["s"]
    await r.aclose()
