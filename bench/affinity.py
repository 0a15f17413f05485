"""Adapter affinity under realistic popularity: loraplane's placement vs round-robin vs pure
consistent hashing, through one discrete-event harness, seeded and reproducible.

The harness models a fleet of workers (8 LoRA slots each): Poisson arrivals, each request for an
adapter drawn from a popularity distribution, generation times drawn from an exponential
distribution, a load time when the chosen worker does not hold the adapter, and a time to first
token that grows with the worker's requests in flight. The policies are the code that runs in
production, called as it is called there: loraplane's is `dataplane.routing` (holders first,
then requests in flight; `wants_copy` asks for another copy) and `controlplane.placement.decide`
(free place, else the least recently used idle adapter on the least loaded worker); beside it the
same with today's replication rule (`is_hot` alone: 16 requests in flight per holder). The offline
best is a static partition (adapters spread over workers by popularity, heaviest first) with
Belady's optimal eviction on each worker's 8 slots, knowing the future.

A workload "with host tier" runs the same arrivals on workers with vLLM's CPU LoRA cache: 32
adapters loaded (`max_cpu_loras`, as deploy/k8s/config.yaml), of which the 8 most recently used
are in the GPU slots. A load (from the node's disk, `LOAD_S`) is needed only for an adapter not
loaded on the worker; one loaded but in host memory is swapped into a slot (`SWAP_S`), pushing the
least recently used out. Routing prefers a holder whose slots hold the adapter (`least_loaded`'s
credit, with the data plane's estimate of the slots, which for a single data plane is exact).
There, besides loads, swap-ins are counted, and "slot entries" (adapters entering a GPU slot:
swap-ins, and loads a request used at once; a copy is loaded into host memory) are set against
the offline best, which has the same 8 slots. "Routing floor" is every adapter loaded on every
worker: no replication rule balances better than that under the same routing.

    .venv/bin/python bench/affinity.py [--quick]
    .venv/bin/python bench/affinity.py --hot-credit 2 --out /tmp/affinity-credit2.json  # a what-if

`--hot-credit` sets the routing's credit for a holder whose GPU slots hold the adapter
(`dataplane.routing.HOT_CREDIT`) for this run only: what balance another value would buy, and at
how many more swap-ins; not what production does.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import json
import os
import platform
import random
import statistics
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.placement import WorkerView, decide  # noqa: E402
from dataplane import routing  # noqa: E402
from dataplane.routing import COPY_MIN_IN_FLIGHT, candidates, is_hot, least_loaded, wants_copy  # noqa: E402
from dataplane.routing import Worker as RouteWorker  # noqa: E402

SLOTS = 8
HOST_PLACES = 32  # adapters loaded per worker with a host-memory tier (deploy/k8s/config.yaml's max_cpu_loras)
LOAD_S = 0.06  # a hot-load, as bench/hotload.py measures it (p50, warm node cache, CPU build)
SWAP_S = 0.001  # host memory -> GPU slot, as bench/hosttier.py measures it (p50, CPU build)
TTFT_BASE_S = 0.02
TTFT_PER_IN_FLIGHT_S = 0.002
MEAN_GENERATION_S = 2.0
REPLICATE_AT = 16


@dataclass(frozen=True)
class Workload:
    name: str
    adapters: int
    workers: int
    shares: tuple[float, ...]  # popularity of adapter i
    rate: float  # requests per second
    requests: int
    reshuffle_at: float | None = None  # fraction of the run after which popularity is permuted
    places: int = SLOTS  # adapters loaded per worker: more than SLOTS is a host-memory tier

    @property
    def tiered(self) -> bool:
        return self.places > SLOTS


def zipf(n: int, alpha: float) -> tuple[float, ...]:
    w = [(i + 1) ** -alpha for i in range(n)]
    total = sum(w)
    return tuple(x / total for x in w)


def skewed_15() -> tuple[float, ...]:
    """15 adapters, "12/6/2 %" style: three tiers of popularity."""
    raw = [12.0] * 5 + [6.0] * 5 + [2.0] * 5
    total = sum(raw)
    return tuple(x / total for x in raw)


@dataclass
class SimWorker:
    id: str
    resident: dict[str, float] = field(default_factory=dict)  # adapter -> last used (loaded: slot or host)
    in_flight: Counter[str] = field(default_factory=Counter)
    total: int = 0
    gpu: OrderedDict[str, None] = field(default_factory=OrderedDict)  # with a host tier: in a slot, LRU first

    def idle(self) -> list[str]:
        return [a for a in self.resident if not self.in_flight[a]]


class Fleet:
    def __init__(self, n: int, places: int = SLOTS) -> None:
        self.workers = [SimWorker(f"w{i:03d}") for i in range(n)]
        self.by_id = {w.id: w for w in self.workers}
        self.places = places
        self.loads = 0
        self.swap_ins = 0
        self.slot_entries = 0  # adapters entering a GPU slot: swap-ins, and loads a request used at once
        self.forced = 0  # no idle place anywhere: a busy adapter had to go (vLLM would queue instead)
        self.busy_swap_outs = 0  # out of a GPU slot with requests in flight (vLLM would hold them back)
        self.adapter_in_flight: Counter[str] = Counter()

    @property
    def tiered(self) -> bool:
        return self.places > SLOTS

    def load(self, w: SimWorker, adapter: str, evict: str | None, now: float) -> None:
        if adapter in w.resident:
            return
        if len(w.resident) >= self.places:
            victim = evict or min(w.idle() or list(w.resident), key=lambda a: w.resident[a])
            if w.in_flight[victim]:
                self.forced += 1
            del w.resident[victim]
            w.gpu.pop(victim, None)
        w.resident[adapter] = now
        self.loads += 1

    def use(self, w: SimWorker, adapter: str) -> bool:
        """A request for the adapter runs on the worker: with a host tier, vLLM keeps the most
        recently used in its slots. Whether it had to enter a slot."""
        if not self.tiered:
            return False
        if adapter in w.gpu:
            w.gpu.move_to_end(adapter)
            return False
        w.gpu[adapter] = None
        self.slot_entries += 1
        if len(w.gpu) > SLOTS:
            out, _ = w.gpu.popitem(last=False)
            if w.in_flight[out]:
                self.busy_swap_outs += 1
        return True


Policy = Callable[[Fleet, str, float], tuple[SimWorker, bool]]  # -> worker, whether it had to load


def loraplane(today: bool = False) -> Policy:
    """The data plane's choice (`dataplane.inference.worker_for`): the least loaded holder (one
    whose GPU slots hold the adapter first), another copy asked for when the rule says so (in the
    background: this request goes to a holder), a cold adapter placed. `today`: the replication
    rule before the fleet-relative one (`is_hot` alone)."""

    def policy(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
        gpu_slots = SLOTS if fleet.tiered else 0
        route = [RouteWorker(w.id, "m", "", frozenset(w.resident), True, gpu_slots=gpu_slots) for w in fleet.workers]
        in_flight = Counter({w.id: w.total for w in fleet.workers})
        in_gpu = {w.id: w.gpu for w in fleet.workers} if fleet.tiered else None
        holders = candidates(route, "m", adapter)
        chosen = least_loaded(holders, in_flight, adapter, in_gpu)
        if chosen is not None:
            a = fleet.adapter_in_flight[adapter] + 1
            if today:
                hot = is_hot(a, len(holders), REPLICATE_AT)
            else:
                hot = wants_copy(a, holders, in_flight, lambda: route, REPLICATE_AT)
            if hot and len(holders) < len(route):
                d = decide(_views(fleet), "m", adapter, _last_used(fleet), replicate=True)
                if d is not None:
                    fleet.load(fleet.by_id[d.worker_id], adapter, d.evict, now)
            return fleet.by_id[chosen.id], False
        return _place(fleet, adapter, now)

    return policy


def routing_floor(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
    """Every adapter on every worker (the fleet given room for all): the balance that production
    routing reaches when any worker can take any request, the best any replication rule can."""
    route = [RouteWorker(w.id, "m", "", frozenset(w.resident), True, gpu_slots=SLOTS) for w in fleet.workers]
    in_flight = Counter({w.id: w.total for w in fleet.workers})
    chosen = least_loaded(route, in_flight, adapter, {w.id: w.gpu for w in fleet.workers})
    assert chosen is not None
    w = fleet.by_id[chosen.id]
    had = adapter in w.resident
    fleet.load(w, adapter, None, now)
    return w, not had


def _place(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
    d = decide(_views(fleet), "m", adapter, _last_used(fleet))
    if d is None:  # no idle slot anywhere: the least loaded worker's least recently used goes
        w = min(fleet.workers, key=lambda x: (x.total, x.id))
        fleet.load(w, adapter, None, now)
        return w, True
    w = fleet.by_id[d.worker_id]
    fleet.load(w, adapter, d.evict, now)
    return w, True


def _views(fleet: Fleet) -> list[WorkerView]:
    return [
        WorkerView(
            w.id,
            "m",
            True,
            fleet.places,
            frozenset(w.resident),
            in_flight=w.total,
            busy=frozenset(a for a, c in w.in_flight.items() if c),
        )  # fmt: skip
        for w in fleet.workers
    ]


def _last_used(fleet: Fleet) -> dict[str, float]:
    out: dict[str, float] = {}
    for w in fleet.workers:
        for a, t in w.resident.items():
            out[a] = max(t, out.get(a, 0.0))
    return out


def round_robin() -> Policy:
    turn = [0]

    def policy(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
        w = fleet.workers[turn[0] % len(fleet.workers)]
        turn[0] += 1
        had = adapter in w.resident
        fleet.load(w, adapter, None, now)
        return w, not had

    return policy


def consistent_hashing(workers: int, vnodes: int = 100) -> Policy:
    ring = sorted(
        (int(hashlib.sha256(f"w{i:03d}#{v}".encode()).hexdigest()[:16], 16), f"w{i:03d}")
        for i in range(workers)
        for v in range(vnodes)
    )
    keys = [k for k, _ in ring]

    def policy(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
        h = int(hashlib.sha256(adapter.encode()).hexdigest()[:16], 16)
        w = fleet.by_id[ring[bisect.bisect(keys, h) % len(ring)][1]]
        had = adapter in w.resident
        fleet.load(w, adapter, None, now)
        return w, not had

    return policy


def arrivals(wl: Workload, seed: int) -> list[tuple[float, str, float]]:
    """(time, adapter, generation seconds) for every request."""
    rng = random.Random(seed)
    names = [f"a{i:04d}" for i in range(wl.adapters)]
    order = list(names)
    out, t = [], 0.0
    reshuffle = int(wl.requests * wl.reshuffle_at) if wl.reshuffle_at else -1
    for i in range(wl.requests):
        if i == reshuffle:
            rng.shuffle(order)
        t += rng.expovariate(wl.rate)
        adapter = rng.choices(order, weights=wl.shares)[0]
        out.append((t, adapter, rng.expovariate(1 / MEAN_GENERATION_S)))
    return out


def run(
    wl: Workload, policy: Policy, trace: Sequence[tuple[float, str, float]], places: int | None = None
) -> dict[str, float]:
    fleet = Fleet(wl.workers, places or wl.places)
    finishing: list[tuple[float, int, str, str]] = []
    ttft, imbalance = [], []
    for i, (now, adapter, gen) in enumerate(trace):
        while finishing and finishing[0][0] <= now:
            _, _, wid, a = heapq.heappop(finishing)
            w = fleet.by_id[wid]
            w.in_flight[a] -= 1
            w.total -= 1
            fleet.adapter_in_flight[a] -= 1
        w, loaded = policy(fleet, adapter, now)
        w.resident[adapter] = now
        swapped = fleet.use(w, adapter) and not loaded
        fleet.swap_ins += swapped
        ttft.append((LOAD_S if loaded else SWAP_S if swapped else 0.0) + TTFT_BASE_S + TTFT_PER_IN_FLIGHT_S * w.total)
        w.in_flight[adapter] += 1
        w.total += 1
        fleet.adapter_in_flight[adapter] += 1
        heapq.heappush(finishing, (now + gen, i, w.id, adapter))
        if i % 10 == 0:
            totals = [x.total for x in fleet.workers]
            mean = statistics.fmean(totals)
            if mean > 0:
                imbalance.append(max(totals) / mean)
    ttft.sort()
    imbalance.sort()
    out: dict[str, float] = {
        "loads_per_1000": round(fleet.loads / len(trace) * 1000, 2),
        "forced_busy_evictions": fleet.forced,
        "worst_to_average_in_flight_p99": round(imbalance[int(0.99 * (len(imbalance) - 1))], 3),
        "ttft_p50_ms": round(ttft[len(ttft) // 2] * 1000, 1),
        "ttft_p99_ms": round(ttft[int(0.99 * (len(ttft) - 1))] * 1000, 1),
    }
    if fleet.tiered:
        out["swap_ins_per_1000"] = round(fleet.swap_ins / len(trace) * 1000, 2)
        out["slot_entries_per_1000"] = round(fleet.slot_entries / len(trace) * 1000, 2)
        out["busy_swap_outs"] = fleet.busy_swap_outs
    return out


def offline_best(wl: Workload, trace: Sequence[tuple[float, str, float]], slots: int = SLOTS) -> float:
    """Loads per 1,000 requests of the best static partition: adapters assigned to workers by
    measured popularity, heaviest first onto the least loaded worker; each worker evicting with
    Belady's rule (the adapter needed furthest in the future) out of `slots` places."""
    counts = Counter(a for _, a, _ in trace)
    load = [0] * wl.workers
    home: dict[str, int] = {}
    for a, n in counts.most_common():
        i = min(range(wl.workers), key=lambda k: load[k])
        home[a] = i
        load[i] += n
    per_worker: list[list[str]] = [[] for _ in range(wl.workers)]
    for _, a, _ in trace:
        per_worker[home[a]].append(a)
    loads = 0
    for seq in per_worker:
        next_use: list[int] = [0] * len(seq)
        last: dict[str, int] = {}
        for i in range(len(seq) - 1, -1, -1):
            next_use[i] = last.get(seq[i], len(seq) + 1)
            last[seq[i]] = i
        cache: dict[str, int] = {}
        for i, a in enumerate(seq):
            if a not in cache:
                loads += 1
                if len(cache) >= slots:
                    del cache[max(cache, key=lambda x: cache[x])]
            cache[a] = next_use[i]
    return round(loads / len(trace) * 1000, 2)


def workloads(quick: bool) -> list[Workload]:
    k = 10 if quick else 1
    w2 = [Workload(f"W2 alpha={a}", 100, 8, zipf(100, a), rate=30.0, requests=60_000 // k) for a in (0.8, 1.0, 1.2)]
    w3 = Workload("W3", 1000, 8, zipf(1000, 1.1), rate=30.0, requests=100_000 // k, reshuffle_at=0.5)
    return [
        Workload("W1", 15, 4, skewed_15(), rate=12.0, requests=20_000 // k),
        *w2,
        w3,
        *(replace(wl, name=f"{wl.name}, host tier", places=HOST_PLACES) for wl in (*w2, w3)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tenth of the requests")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--hot-credit", type=int, default=None, help="what-if: the routing's GPU-slot credit")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "affinity.json")
    args = ap.parse_args()
    if args.hot_credit is not None:
        routing.HOT_CREDIT = args.hot_credit
    results: list[dict[str, Any]] = []
    for wl in workloads(args.quick):
        trace = arrivals(wl, args.seed)
        best = offline_best(wl, trace)
        policies: dict[str, Policy] = {
            "loraplane": loraplane(),
            "loraplane_today": loraplane(today=True),
            "round_robin": round_robin(),
            "consistent_hashing": consistent_hashing(wl.workers),
        }
        if wl.tiered:
            policies["routing_floor"] = routing_floor
        row: dict[str, Any] = {"workload": wl.name, "adapters": wl.adapters, "workers": wl.workers,
                               "places_per_worker": wl.places, "requests": wl.requests,
                               "offline_best_loads_per_1000": best}  # fmt: skip
        same = offline_best(wl, trace, wl.places) if wl.tiered else best
        if wl.tiered:
            row["offline_best_same_places_loads_per_1000"] = same
        for name, policy in policies.items():
            r: dict[str, Any] = run(wl, policy, trace, wl.adapters if policy is routing_floor else None)
            r["loads_vs_offline_best"] = round(r["loads_per_1000"] / best, 2) if best else None
            if wl.tiered:
                r["loads_vs_offline_best_same_places"] = round(r["loads_per_1000"] / same, 2) if same else None
                r["slot_entries_vs_offline_best"] = round(r["slot_entries_per_1000"] / best, 2) if best else None
            row[name] = r
        results.append(row)
        print(
            f"{wl.name:24} offline best {best:7.2f} loads/1000"
            + (f" ({same:.2f} with {wl.places} places)" if wl.tiered else "")
        )
        for name in policies:
            r = row[name]
            swaps = ""
            if wl.tiered:
                entries = r["slot_entries_vs_offline_best"]
                swaps = f"  swap-ins/1000 {r['swap_ins_per_1000']:7.2f} (slot entries {entries}x best)"
            print(f"  {name:19} loads/1000 {r['loads_per_1000']:7.2f} ({r['loads_vs_offline_best']}x best){swaps}"
                  f"  worst/avg in flight p99 {r['worst_to_average_in_flight_p99']:5.2f}"
                  f"  TTFT p50 {r['ttft_p50_ms']:6.1f} ms p99 {r['ttft_p99_ms']:6.1f} ms")  # fmt: skip
    by_name = {r["workload"]: r for r in results}
    targets = {}
    for key, name in (
        ("target_w2_alpha_1", "W2 alpha=1.0"),
        ("target_w2_alpha_1_host_tier", "W2 alpha=1.0, host tier"),
    ):
        row = by_name[name]
        new, today = row["loraplane"], row["loraplane_today"]
        target: dict[str, Any] = {
            "loads_vs_offline_best_max": 1.6,
            "worst_to_average_max": 1.5,
            "loads_vs_offline_best": new["loads_vs_offline_best"],
            "worst_to_average": new["worst_to_average_in_flight_p99"],
            "met": (new["loads_vs_offline_best"] or 0) <= 1.6 and new["worst_to_average_in_flight_p99"] <= 1.5,
            "today_rule": {"loads_vs_offline_best": today["loads_vs_offline_best"],
                           "worst_to_average": today["worst_to_average_in_flight_p99"]},
        }  # fmt: skip
        if "routing_floor" in row:
            entries = new["slot_entries_vs_offline_best"]
            target["slot_entries_vs_offline_best"] = entries
            target["met_counting_swap_ins_as_loads"] = (entries or 0) <= 1.6 and target["worst_to_average"] <= 1.5
            target["today_rule"]["slot_entries_vs_offline_best"] = today["slot_entries_vs_offline_best"]
            target["routing_floor_worst_to_average"] = row["routing_floor"]["worst_to_average_in_flight_p99"]
        targets[key] = target
    out = {
        "benchmark": "affinity",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (a simulation: the machine sets only its speed)",
        "side_by_side": True,
        "model": {
            "slots_per_worker": SLOTS,
            "host_tier_places_per_worker": HOST_PLACES,
            "load_s": LOAD_S,
            "swap_in_s": SWAP_S,
            "ttft_base_s": TTFT_BASE_S,
            "ttft_per_in_flight_s": TTFT_PER_IN_FLIGHT_S,
            "mean_generation_s": MEAN_GENERATION_S,
            "replicate_at_in_flight": REPLICATE_AT,
            "copy_min_in_flight": COPY_MIN_IN_FLIGHT,
            "hot_credit": routing.HOT_CREDIT,
            "hot_credit_what_if": args.hot_credit is not None,
            "seed": args.seed,
        },  # fmt: skip
        **targets,
        "results": results,
    }
    path: Path = args.out
    path.write_text(json.dumps(out, indent=2) + "\n")
    for key, t in targets.items():
        extra = ""
        if "routing_floor_worst_to_average" in t:
            floor = t["routing_floor_worst_to_average"]
            extra = f", slot entries {t['slot_entries_vs_offline_best']}x best, routing floor {floor}"
        print(
            f"{key} (loads <= 1.6x best, worst/avg <= 1.5): {'met' if t['met'] else 'missed'}"
            f" (loads {t['loads_vs_offline_best']}x best, worst/avg {t['worst_to_average']}{extra})"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
