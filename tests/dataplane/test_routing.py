from __future__ import annotations

from collections import Counter

import pytest

from dataplane.routing import RoutingTable, Worker, candidates, is_hot, least_loaded


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
