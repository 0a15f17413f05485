"""The data plane's fair queue (`dataplane/fairshare.py`) on its own: slots, queues, weights."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
import redis.asyncio as redis

from dataplane import fairshare
from dataplane.errors import ApiError
from dataplane.fairshare import Gate, QueueFull, QueueTimeout, Slot
from dataplane.metrics import Metrics
from dataplane.routing import Worker, least_loaded
from loraplane.state import keys
from tests.support import RedisServer

WEIGHTS = {"shared": 1, "reserved": 4}


def workers(n: int, capacity: int) -> list[Worker]:
    return [Worker(f"w{i}", "m", f"http://w{i}", frozenset(), True, "", capacity) for i in range(n)]


class Fleet:
    """A gate over a fixed set of workers, and the requests holding slots."""

    def __init__(self, n: int = 2, capacity: int = 4, timeout_s: float = 5.0, max_queued: int = 100) -> None:
        self.in_flight: Counter[str] = Counter()
        self.metrics = Metrics()
        self.gate = Gate(self.in_flight, self.metrics, WEIGHTS, timeout_s, max_queued)
        self.workers = workers(n, capacity)
        self.held: dict[str, list[Slot]] = {}

    def pick(self) -> Worker | None:
        return least_loaded([w for w in self.workers if self.gate.has_room(w)], self.in_flight)

    async def enter(self, tenant: str, tier: str = "shared") -> Slot:
        scope = self.gate.scope("m", "", lambda: self.workers)
        slot = await self.gate.enter(scope, tenant, tier, self.pick, "m")
        self.held.setdefault(tenant, []).append(slot)
        return slot

    def start(self, tenant: str, n: int, tier: str = "shared") -> list[asyncio.Task[Slot]]:
        return [asyncio.create_task(self.enter(tenant, tier)) for _ in range(n)]

    def release(self, tenant: str, n: int = 1) -> None:
        for _ in range(n):
            self.held[tenant].pop(0).release()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_tenant_alone_takes_every_slot_and_waits_only_beyond_them() -> None:
    fleet = Fleet(n=2, capacity=4)
    tasks = fleet.start("a", 10)
    await settle()
    assert sum(t.done() for t in tasks) == 8  # work-conserving: no slot kept idle for nobody
    assert sum(fleet.in_flight.values()) == 8
    fleet.release("a", 2)
    await settle()
    assert all(t.done() for t in tasks)
    assert max(fleet.in_flight.values()) == 4  # no worker past its capacity


async def test_a_worker_of_unknown_capacity_never_queues() -> None:
    fleet = Fleet(n=1, capacity=0)
    tasks = fleet.start("a", 50)
    await settle()
    assert all(t.done() for t in tasks)


async def test_a_light_tenant_does_not_wait_behind_a_flood() -> None:
    fleet = Fleet(n=2, capacity=4)
    await fleet.enter("b")  # b was active a moment ago: one request, done
    fleet.release("b")
    flood = fleet.start("a", 40)
    await settle()
    assert sum(t.done() for t in flood) == 6  # two slots kept for b: its peak (1) + 1
    light = await asyncio.wait_for(fleet.enter("b"), 0.5)  # at once, not after a's 34 waiting
    assert light.worker is not None
    await asyncio.wait_for(fleet.enter("b"), 0.5)
    third = asyncio.create_task(fleet.enter("b"))  # past what was kept: waits, but first in line
    await settle()
    assert not third.done()
    fleet.release("a")
    await settle()
    assert third.done()
    assert sum(t.done() for t in flood) == 6  # the freed slot went to b, not to a's queue


async def test_a_tenant_that_went_quiet_gives_its_kept_slots_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fairshare, "ACTIVE_S", 0.05)
    fleet = Fleet(n=1, capacity=4)
    await fleet.enter("b")
    fleet.release("b")
    flood = fleet.start("a", 10)
    await settle()
    assert sum(t.done() for t in flood) == 2
    await asyncio.sleep(0.15)  # two windows without b
    fleet.release("a")  # a slot frees: the queue is looked at again, b forgotten
    await settle()
    assert fleet.in_flight["w0"] == 4


async def test_waiting_requests_are_served_by_weight() -> None:
    fleet = Fleet(n=1, capacity=1)
    await fleet.enter("x")  # the one slot is taken: both floods queue
    floods = fleet.start("s", 60) + fleet.start("r", 60, tier="reserved")
    await settle()
    holder, served = "x", Counter[str]()
    for _ in range(50):  # the slot frees, and goes to the next in virtual finish order
        fleet.release(holder)
        await settle()
        holder = next(t for t in ("s", "r") if fleet.held.get(t))
        served[holder] += 1
    for task in floods:
        task.cancel()
    await asyncio.gather(*floods, return_exceptions=True)
    assert served["r"] == 40 and served["s"] == 10  # weights 4 : 1


async def test_a_request_that_waits_too_long_is_a_503_with_retry_after() -> None:
    fleet = Fleet(n=1, capacity=1, timeout_s=0.2)
    await fleet.enter("a")
    with pytest.raises(QueueTimeout) as err:
        await fleet.enter("a")
    assert err.value.status == 503 and err.value.headers["Retry-After"]
    assert fleet.metrics.queue_depth.values == {("m", "shared"): 0.0}
    assert fleet.in_flight["w0"] == 1


async def test_too_many_of_one_tenants_requests_waiting_is_a_429() -> None:
    fleet = Fleet(n=1, capacity=1, max_queued=3)
    await fleet.enter("a")
    waiting = fleet.start("a", 3)
    await settle()
    with pytest.raises(QueueFull) as err:
        await fleet.enter("a")
    assert isinstance(err.value, ApiError) and err.value.status == 429
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_request_cancelled_while_waiting_leaves_no_trace() -> None:
    fleet = Fleet(n=1, capacity=1)
    await fleet.enter("a")
    waiting = asyncio.create_task(fleet.enter("b"))
    await settle()
    waiting.cancel()
    fleet.release("a")  # the slot frees as the waiter leaves: nobody may keep it
    await asyncio.gather(waiting, return_exceptions=True)
    await settle()
    assert fleet.in_flight["w0"] == 0
    assert fleet.metrics.queue_depth.values == {("m", "shared"): 0.0}
    assert (await fleet.enter("c")).worker.id == "w0"


async def test_replicas_counted_in_redis_share_each_workers_concurrency(redis_server: RedisServer) -> None:
    """Two data plane replicas beat into Redis: each keeps a worker of 8 to 4 of its own; one
    that stops beating is forgotten and the other takes the whole worker again."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.delete(keys.DATA_PLANES)
    gates = [Fleet(n=1, capacity=8).gate for _ in range(2)]
    beats = [
        asyncio.create_task(fairshare.follow_replicas(client, g, f"r{i}", every_s=0.05)) for i, g in enumerate(gates)
    ]
    try:
        worker = workers(1, 8)[0]
        await wait_until(lambda: all(g.capacity(worker) == 4 for g in gates))
        beats[1].cancel()
        await wait_until(lambda: gates[0].capacity(worker) == 8)
    finally:
        for beat in beats:
            beat.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        await client.aclose()


async def wait_until(done: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.02)
