"""The host-memory tier in routing: per worker with one, the data plane's estimate of what is in
its GPU slots (the last `gpu_slots` distinct adapters it sent there), and a holder where the
adapter is in a slot preferred over a less loaded one that would swap it in from host memory."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import replace

import redis.asyncio as redis

from controlplane.store import Store
from dataplane.inference import worker_for
from dataplane.routing import HOT_CREDIT, RoutingTable, Worker, least_loaded
from loraplane.state.records import WorkerRecord
from tests.dataplane.test_single_flight import TARGET, TENANT, CountingControlPlane, state
from tests.support import RedisServer


def w(wid: str, resident: set[str], gpu_slots: int = 1) -> Worker:
    return Worker(wid, "m", f"http://{wid}", frozenset(resident), True, gpu_slots=gpu_slots)


def test_a_holder_with_the_adapter_in_a_gpu_slot_wins_within_its_credit() -> None:
    a, b = w("a", {"x"}), w("b", {"x"})
    in_gpu = {"a": OrderedDict.fromkeys(["x"]), "b": OrderedDict.fromkeys(["y"])}
    assert least_loaded([a, b], Counter({"a": 2}), "x", in_gpu) == a
    assert least_loaded([a, b], Counter({"a": HOT_CREDIT}), "x", in_gpu) == a  # a tie: the hot one
    assert least_loaded([a, b], Counter({"a": HOT_CREDIT + 1}), "x", in_gpu) == b  # bounded
    assert least_loaded([a, b], Counter({"a": 2}), "y", in_gpu) == b  # y is hot on b, and b is idle
    assert least_loaded([a, b], Counter({"a": 2}), "x") == b  # no estimate: least loaded as before
    assert least_loaded([a, b], Counter({"a": 2})) == b  # no adapter (the base model)


def test_the_estimate_is_the_last_gpu_slots_distinct_adapters_sent() -> None:
    table = RoutingTable(client=None)  # type: ignore[arg-type]
    worker, no_tier = w("a", {"x", "y", "z"}, gpu_slots=2), w("b", {"x"}, gpu_slots=0)
    for adapter_id in ("x", "y", "x", "z"):  # y is the least recently sent when z comes
        table.routed(worker, adapter_id)
    assert list(table.in_gpu["a"]) == ["x", "z"]
    table.routed(no_tier, "x")
    assert "b" not in table.in_gpu  # no host-memory tier: nothing kept


async def test_a_second_request_goes_where_the_first_swapped_the_adapter_in() -> None:
    """Through the data plane's worker choice: both workers hold the adapter in host memory; the
    first request picks one (and swaps it into a slot there); the next goes to it too, though the
    other is idle; another adapter goes to the idle one. Workers without a host tier: by load."""
    routing = RoutingTable(client=None)  # type: ignore[arg-type]
    adapter = TARGET.adapter_id
    assert adapter is not None
    routing.workers = (w("w1", {adapter, "adp_2"}), w("w2", {adapter, "adp_2"}))
    st = state(routing, CountingControlPlane(routing))
    first = await worker_for(st, TARGET, "key", TENANT)
    assert first.worker.id == "w1" and list(routing.in_gpu["w1"]) == [adapter]
    second = await worker_for(st, TARGET, "key", TENANT)
    assert second.worker.id == "w1"
    other = await worker_for(st, replace(TARGET, adapter_id="adp_2"), "key", TENANT)
    assert other.worker.id == "w2" and list(routing.in_gpu["w2"]) == ["adp_2"]
    for slot in (first, second, other):
        slot.release()

    routing = RoutingTable(client=None)  # type: ignore[arg-type]
    routing.workers = (w("w1", {adapter}, gpu_slots=0), w("w2", {adapter}, gpu_slots=0))
    st = state(routing, CountingControlPlane(routing))
    slots = [await worker_for(st, TARGET, "key", TENANT) for _ in range(2)]
    assert [s.worker.id for s in slots] == ["w1", "w2"] and not routing.in_gpu


async def test_the_table_keeps_estimates_for_host_tiers_only_and_forgets_what_left(redis_server: RedisServer) -> None:
    """From the records: GPU slots count only when fewer than the adapters loaded (an older agent's
    0, or as many slots as adapters, is no host tier); an adapter evicted, or a worker gone or
    without a host tier now, leaves the estimate."""
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/11", decode_responses=True)
    await r.flushdb()
    store, table = Store(r), RoutingTable(r)
    tiered = WorkerRecord("t", "m", "http://t", 8, ["x", "y", "z"], gpu_slots=2, updated_at=1.0)
    records = [
        tiered,
        WorkerRecord("flat", "m", "http://f", 8, ["x"], gpu_slots=8, updated_at=1.0),
        WorkerRecord("old", "m", "http://o", 8, ["x"], updated_at=1.0),
    ]
    for rec in records:
        await store.put_worker(rec)
    await table.refresh()
    assert {v.id: v.gpu_slots for v in table.workers} == {"t": 2, "flat": 0, "old": 0}
    worker = table.get("t")
    assert worker is not None
    table.routed(worker, "x")
    table.routed(worker, "y")
    await store.put_worker(replace(tiered, resident=["x", "z"], updated_at=2.0))  # y evicted
    await table.refresh()
    assert list(table.in_gpu["t"]) == ["x"]
    await store.put_worker(replace(tiered, gpu_slots=0, updated_at=3.0))  # restarted without a host tier
    await table.refresh()
    assert table.in_gpu == {}
    await r.aclose()
