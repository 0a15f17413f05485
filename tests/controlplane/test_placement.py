from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.placement import Decision, LoadBudget, WorkerView, decide


def w(
    wid: str, resident: set[str], max_adapters: int = 2, healthy: bool = True, base: str = "m", in_flight: int = 0
) -> WorkerView:
    return WorkerView(wid, base, healthy, max_adapters, frozenset(resident), in_flight=in_flight)


@pytest.mark.parametrize(
    ("intent", "workers", "last_used", "busy", "expected"),
    [
        ("resident wins over a free slot", [w("a", set()), w("b", {"x"})], {}, set(), Decision("b", True)),
        ("free slot on the least used worker", [w("a", {"p"}), w("b", set())], {}, set(), Decision("b", False)),
        ("unhealthy workers are skipped", [w("a", set(), healthy=False)], {}, set(), None),
        ("other base models are skipped", [w("a", set(), base="other")], {}, set(), None),
        (
            "full: evict the least recently used",
            [w("a", {"p", "q"})],
            {"p": 2.0, "q": 1.0},
            set(),
            Decision("a", False, evict="q"),
        ),
        (
            "never evict an adapter with requests in flight",
            [w("a", {"p", "q"})],
            {"p": 2.0, "q": 1.0},
            {"q"},
            Decision("a", False, evict="p"),
        ),
        ("everything busy: no capacity", [w("a", {"p", "q"})], {}, {"p", "q"}, None),
        (
            "evict on the least loaded worker, even if another holds an older adapter",
            [w("a", {"p", "q"}, in_flight=5), w("b", {"r", "s"}, in_flight=1)],
            {"p": 1.0, "q": 2.0, "r": 3.0, "s": 4.0},
            set(),
            Decision("b", False, evict="r"),
        ),
        (
            "equally loaded: the oldest idle adapter anywhere",
            [w("a", {"p", "q"}, in_flight=1), w("b", {"r", "s"}, in_flight=1)],
            {"p": 3.0, "q": 4.0, "r": 2.0, "s": 1.0},
            {"s"},
            Decision("b", False, evict="r"),
        ),
    ],
)
def test_decide(
    intent: str,
    workers: list[WorkerView],
    last_used: dict[str, float],
    busy: set[str],
    expected: Decision | None,
) -> None:
    assert decide(workers, "m", "x", last_used, frozenset(busy)) == expected, intent


def test_avoided_workers_are_not_used_even_when_they_hold_the_adapter() -> None:
    workers = [w("a", {"x"}), w("b", {"p"})]
    assert decide(workers, "m", "x", {}, avoid=frozenset({"a"})) == Decision("b", False)
    assert decide(workers, "m", "x", {}, avoid=frozenset({"a", "b"})) is None


def test_a_replica_goes_to_a_worker_that_does_not_hold_the_adapter() -> None:
    workers = [w("a", {"x"}), w("b", {"p", "q"}), w("c", {"r"})]
    assert decide(workers, "m", "x", {}, replicate=True) == Decision("c", False)
    assert decide([w("a", {"x"})], "m", "x", {}, replicate=True) is None


def test_the_load_budget_allows_n_loads_in_any_second() -> None:
    budget = LoadBudget(per_second=3)
    for t in (0.0, 0.1, 0.2):
        assert budget.delay(t) == 0.0
        budget.spend(t)
    assert budget.delay(0.5) == pytest.approx(0.5)  # the 4th waits until the 1st is a second old
    assert budget.delay(1.0) == 0.0
    budget.spend(1.0)
    assert budget.delay(1.05) == pytest.approx(0.05)


def test_a_victim_being_evicted_is_not_chosen_again() -> None:
    full = WorkerView("a", "m", True, 2, frozenset({"p", "q"}), loading=frozenset({"y"}), evicting=frozenset({"q"}))
    assert decide([full], "m", "x", {"p": 2.0, "q": 1.0}) == Decision("a", False, evict="p")
    assert decide([replace(full, evicting=frozenset({"p", "q"}))], "m", "x", {}) is None
