"""Replication relative to the fleet (issue 19, balance without eviction storms): where a copy
takes a place in host memory, an adapter gets another copy when even its least loaded holder is
busier than the fleet's mean and it has at least COPY_MIN_IN_FLIGHT requests per copy; without a
host tier only the absolute threshold asks for one, as before."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from dataplane.inference import worker_for
from dataplane.routing import COPY_MIN_IN_FLIGHT, RoutingTable, Worker, is_hot, wants_copy
from tests.dataplane.test_single_flight import TARGET, TENANT, CountingControlPlane, state

THRESHOLD = 16  # LORAPLANE_REPLICATE_AT_IN_FLIGHT's default: far from every case below


def w(wid: str, resident: set[str], gpu_slots: int = 8) -> Worker:
    return Worker(wid, "m", f"http://{wid}", frozenset(resident), True, gpu_slots=gpu_slots)


def fleet(n: int, holding: int, gpu_slots: int = 8) -> list[Worker]:
    """n workers, the first `holding` of which hold adapter x."""
    return [w(f"w{i}", {"x"} if i < holding else set(), gpu_slots) for i in range(n)]


def asks(adapter_in_flight: int, workers: Sequence[Worker], in_flight: dict[str, int]) -> bool:
    holders = [v for v in workers if "x" in v.resident]
    return wants_copy(adapter_in_flight, holders, Counter(in_flight), lambda: workers, THRESHOLD)


@pytest.mark.parametrize(
    ("in_flight", "copy"),
    [
        ({"w0": 3, "w1": 1, "w2": 1, "w3": 1}, True),  # 4 with this one > the mean 7/4
        ({"w0": 2, "w1": 2, "w2": 2, "w3": 2}, True),  # 3 > 9/4: even balanced, this one tips it
        ({"w0": 1, "w1": 2, "w2": 2, "w3": 2}, False),  # 2 with this one = the mean 8/4: not busier
        ({"w0": 0, "w1": 5, "w2": 5, "w3": 5}, False),  # its holder is the idle one
    ],
)
def test_a_copy_when_its_holder_is_busier_than_the_fleets_mean(in_flight: dict[str, int], copy: bool) -> None:
    workers = fleet(4, holding=1)
    assert not is_hot(3, 1, THRESHOLD)  # far below the absolute threshold: the fleet decides
    assert asks(3, workers, in_flight) is copy


def test_every_holder_must_be_busier_than_the_mean() -> None:
    """The least loaded holder counts: one copy on a quiet worker is enough, whatever the other."""
    workers = fleet(4, holding=2)
    assert asks(6, workers, {"w0": 9, "w1": 4, "w2": 1, "w3": 1})  # 5 > 16/4
    assert not asks(6, workers, {"w0": 9, "w1": 1, "w2": 3, "w3": 3})  # 2 <= 17/4


def test_not_for_fewer_than_the_minimum_per_copy() -> None:
    """A lone request on a busy worker is not split by a copy: the copy would only churn places."""
    workers = fleet(4, holding=1)
    busy = {"w0": 9, "w1": 0, "w2": 0, "w3": 0}
    assert COPY_MIN_IN_FLIGHT == 2
    assert not asks(1, workers, busy)
    assert asks(2, workers, busy)
    two = fleet(4, holding=2)
    assert not asks(3, two, {"w0": 9, "w1": 9, "w2": 0, "w3": 0})  # 3 requests, 2 copies
    assert asks(4, two, {"w0": 9, "w1": 9, "w2": 0, "w3": 0})


def test_without_a_host_tier_only_the_threshold_asks() -> None:
    """A copy there evicts an adapter from a GPU slot: the fleet-relative rule cost more loads than
    it saved imbalance (bench/affinity.py), so today's rule stands."""
    busy = {"w0": 9, "w1": 0, "w2": 0, "w3": 0}
    assert not asks(3, fleet(4, holding=1, gpu_slots=0), busy)
    mixed = fleet(4, holding=2)
    mixed[1] = w("w1", {"x"}, gpu_slots=0)
    assert not asks(6, mixed, {"w0": 9, "w1": 9, "w2": 0, "w3": 0})
    assert asks(THRESHOLD + 1, fleet(4, holding=1, gpu_slots=0), busy)  # past the threshold, as before


def test_the_threshold_still_asks_on_a_host_tier() -> None:
    workers = fleet(4, holding=1)
    assert asks(THRESHOLD + 1, workers, {"w0": 0, "w1": 9, "w2": 9, "w3": 9})


def test_not_when_every_worker_holds_it() -> None:
    workers = fleet(2, holding=2)
    assert not asks(8, workers, {"w0": 9, "w1": 9})


def test_the_fleet_is_not_counted_unless_the_cheap_tests_pass() -> None:
    """Summing the fleet's requests costs a pass over its workers: not on every request."""
    calls = []

    def workers() -> list[Worker]:
        calls.append(1)
        return fleet(4, holding=1)

    holders = [w("w0", {"x"})]
    assert not wants_copy(1, holders, Counter({"w0": 9}), workers, THRESHOLD)  # one request
    assert not wants_copy(3, [w("w0", {"x"}, gpu_slots=0)], Counter({"w0": 9}), workers, THRESHOLD)
    assert calls == []
    assert wants_copy(3, holders, Counter({"w0": 9}), workers, THRESHOLD)
    assert calls == [1]


async def test_the_data_plane_asks_for_a_copy_when_its_holder_is_busier_than_the_fleet() -> None:
    """Through the data plane's worker choice: the adapter's one holder has more requests in
    flight than the mean of the model's workers, and the adapter two in flight there: the request
    goes to the holder, and a replica placement is asked for in the background. The same with
    the other worker as busy as the holder with this request: none; the same without a host tier:
    none (the threshold, 16)."""
    adapter = TARGET.adapter_id
    assert adapter is not None
    for gpu_slots, busy_elsewhere, replica in ((8, 0, True), (8, 6, False), (0, 0, False)):
        routing = RoutingTable(client=None)  # type: ignore[arg-type]
        routing.workers = (w("w1", {adapter}, gpu_slots), w("w2", {"adp_2"}, gpu_slots))
        routing.in_flight.update({"w1": 5, "w2": busy_elsewhere})
        routing.adapter_in_flight[adapter] = 2
        cp = CountingControlPlane(routing)
        st = state(routing, cp)
        slot = await worker_for(st, TARGET, "key", TENANT)
        await asyncio.sleep(0)  # the background placement starts
        assert slot.worker.id == "w1"
        assert cp.calls == ([(adapter, True)] if replica else []), (gpu_slots, busy_elsewhere)
        slot.release()
        for task in st.placing.values():
            await task
