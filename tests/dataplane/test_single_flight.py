"""Many requests for one cold adapter: one placement call from this data plane; and again for an
adapter evicted while its requests waited for a slot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dataplane.fairshare import Gate
from dataplane.inference import State, worker_for
from dataplane.metrics import Metrics
from dataplane.resolve import Target
from dataplane.routing import RoutingTable, Worker
from dataplane.settings import Settings
from loraplane.catalog import BaseModel
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.state.records import Tenant


class CountingControlPlane:
    """Stands in for the control plane's PlaceAdapter: the unit under test is the data plane's
    single flight, so this only counts calls and makes the placed worker appear."""

    def __init__(self, routing: RoutingTable, capacity: int = 0) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._routing = routing
        self._capacity = capacity

    async def place(self, key: str, adapter_id: str, timeout: float, replicate: bool = False,
                    avoid: list[str] | None = None) -> apb.PlaceAdapterResponse:  # fmt: skip
        self.calls.append((adapter_id, replicate))
        await asyncio.sleep(0.05)
        self._routing.workers = (Worker("w1", "m", "http://w1", frozenset({adapter_id}), True, "", self._capacity),)
        return apb.PlaceAdapterResponse(worker_id="w1")


def state(routing: RoutingTable, cp: CountingControlPlane) -> State:
    settings = Settings("127.0.0.1", 0, "", "", Path("."), "")
    metrics = Metrics()
    gate = Gate(routing.in_flight, metrics, {"shared": 1}, queue_timeout_s=5, max_queued=100)
    return State(settings, None, None, routing, cp, None, {}, {}, metrics, None, None, gate)  # type: ignore[arg-type]


TARGET = Target(BaseModel("m", "chat", "", True, 64, 8), "adp_1")
TENANT = Tenant("ten_1", "t", "shared", 0.0)


async def test_concurrent_requests_for_a_cold_adapter_place_it_once() -> None:
    routing = RoutingTable(client=None)  # type: ignore[arg-type]
    routing.workers = (Worker("w1", "m", "http://w1", frozenset(), True),)
    cp = CountingControlPlane(routing)
    st = state(routing, cp)
    target, tenant = TARGET, TENANT
    slots: list[Any] = await asyncio.gather(*(worker_for(st, target, "key", tenant) for _ in range(20)))
    assert {s.worker.id for s in slots} == {"w1"}
    assert cp.calls == [("adp_1", False)]
    assert not st.placing  # the flight is over


async def test_an_adapter_evicted_while_its_request_waits_is_placed_again() -> None:
    routing = RoutingTable(client=None)  # type: ignore[arg-type]
    routing.workers = (Worker("w1", "m", "http://w1", frozenset({"adp_1"}), True, "", 1),)
    cp = CountingControlPlane(routing, capacity=1)
    st = state(routing, cp)
    first = await worker_for(st, TARGET, "key", TENANT)  # the worker's one slot
    waiting = asyncio.create_task(worker_for(st, TARGET, "key", TENANT))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    routing.workers = (Worker("w1", "m", "http://w1", frozenset(), True, "", 1),)  # evicted meanwhile
    first.release()
    second = await asyncio.wait_for(waiting, 2)  # not after the queue's 5 s: placed again
    assert second.worker.id == "w1" and cp.calls == [("adp_1", False)]
