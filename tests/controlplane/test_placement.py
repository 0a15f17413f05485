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


def pooled(wid: str, resident: set[str], pool: str, max_adapters: int = 2) -> WorkerView:
    return replace(w(wid, resident, max_adapters), pool=pool)


@pytest.mark.parametrize(
    ("intent", "workers", "pool", "expected"),
    [
        ("a shared adapter never goes to a dedicated worker", [pooled("a", set(), "t1"), w("b", {"p"})], "",
         Decision("b", False)),
        ("nor is it served from one that holds it", [pooled("a", {"x"}, "t1"), w("b", set())], "",
         Decision("b", False)),
        ("shared workers full: evict there, never take the empty pool",
         [pooled("a", set(), "t1"), w("b", {"p", "q"})], "", Decision("b", False, evict="p")),
        ("a pooled adapter goes only to its pool", [w("a", set()), pooled("b", {"p"}, "t1")], "t1",
         Decision("b", False)),
        ("another tenant's pool is not its pool", [pooled("a", set(), "t2"), pooled("b", {"p"}, "t1")], "t1",
         Decision("b", False)),
        ("held by a shared worker, it is loaded in its pool", [w("a", {"x"}), pooled("b", set(), "t1")], "t1",
         Decision("b", False)),
        ("its pool full: evict in the pool, though shared workers are free",
         [w("a", set()), pooled("b", {"p", "q"}, "t1")], "t1", Decision("b", False, evict="p")),
        ("its pool down: no capacity, not a shared worker", [w("a", set()), replace(pooled("b", set(), "t1"),
         healthy=False)], "t1", None),
        ("no pool of its own: no capacity", [w("a", set()), pooled("b", set(), "t2")], "t1", None),
    ],
)  # fmt: skip
def test_decide_keeps_to_the_pool(intent: str, workers: list[WorkerView], pool: str, expected: Decision | None) -> None:
    assert decide(workers, "m", "x", {}, pool=pool) == expected, intent


@pytest.mark.parametrize(
    ("intent", "workers", "last_used", "pinned", "expected"),
    [
        ("the least recently used adapter is pinned: the next one goes", [w("a", {"p", "q"})],
         {"p": 1.0, "q": 2.0}, {"p"}, Decision("a", False, evict="q")),
        ("everything pinned: no capacity", [w("a", {"p", "q"})], {}, {"p", "q"}, None),
        ("a worker full of pins is passed over for one with an idle adapter",
         [w("a", {"p", "q"}), w("b", {"r", "s"}, in_flight=3)], {"p": 1.0, "q": 1.0, "r": 5.0, "s": 6.0},
         {"p", "q"}, Decision("b", False, evict="r")),
        ("a pin does not take a free slot from anyone", [w("a", {"p"}), w("b", {"q", "r"})], {}, {"p", "q", "r"},
         Decision("a", False)),
        ("a pinned adapter is still found where it is", [w("a", {"p", "x"})], {}, {"x"}, Decision("a", True)),
    ],
)  # fmt: skip
def test_decide_never_evicts_a_pinned_adapter(
    intent: str,
    workers: list[WorkerView],
    last_used: dict[str, float],
    pinned: set[str],
    expected: Decision | None,
) -> None:
    assert decide(workers, "m", "x", last_used, pinned=frozenset(pinned)) == expected, intent


def test_pins_busy_adapters_and_victims_under_way_together_leave_no_room() -> None:
    full = WorkerView("a", "m", True, 3, frozenset({"p", "q", "r"}), evicting=frozenset({"r"}))
    assert decide([full], "m", "x", {}, busy=frozenset({"q"}), pinned=frozenset({"p"})) is None
    assert decide([full], "m", "x", {}, busy=frozenset({"q"})) == Decision("a", False, evict="p")


def test_a_pooled_tenants_pins_are_kept_in_its_pool_and_the_shared_workers_untouched() -> None:
    workers = [pooled("a", {"p", "q"}, "t1"), w("b", {"r", "s"})]
    assert decide(workers, "m", "x", {}, pool="t1", pinned=frozenset({"p", "q"})) is None
    assert decide(workers, "m", "x", {}, pool="", pinned=frozenset({"p", "q"})) == Decision("b", False, evict="r")
