"""Adapter affinity under realistic popularity: loraplane's placement vs round-robin vs pure
consistent hashing, through one discrete-event harness, seeded and reproducible.

The harness models a fleet of workers (8 LoRA slots each): Poisson arrivals, each request for an
adapter drawn from a popularity distribution, generation times drawn from an exponential
distribution, a load time when the chosen worker does not hold the adapter, and a time to first
token that grows with the worker's requests in flight. The policies are the code that runs in
production, called as it is called there: loraplane's is `dataplane.routing` (holders first,
then requests in flight; hot adapters replicated) and `controlplane.placement.decide` (free slot,
else the least recently used idle adapter on the least loaded worker). The offline best is a
static partition (adapters spread over workers by popularity, heaviest first) with Belady's
optimal eviction on each worker, knowing the future.

    .venv/bin/python bench/affinity.py [--quick]
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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.placement import WorkerView, decide  # noqa: E402
from dataplane.routing import Worker as RouteWorker  # noqa: E402
from dataplane.routing import candidates, is_hot, least_loaded  # noqa: E402

SLOTS = 8
LOAD_S = 0.06  # a hot-load, as bench/hotload.py measures it (p50, warm node cache, CPU build)
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
    resident: dict[str, float] = field(default_factory=dict)  # adapter -> last used
    in_flight: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def idle(self) -> list[str]:
        return [a for a in self.resident if not self.in_flight[a]]


class Fleet:
    def __init__(self, n: int) -> None:
        self.workers = [SimWorker(f"w{i:03d}") for i in range(n)]
        self.by_id = {w.id: w for w in self.workers}
        self.loads = 0
        self.forced = 0  # no idle slot anywhere: a busy adapter had to go (vLLM would queue instead)
        self.adapter_in_flight: Counter[str] = Counter()

    def load(self, w: SimWorker, adapter: str, evict: str | None, now: float) -> None:
        if adapter in w.resident:
            return
        if len(w.resident) >= SLOTS:
            victim = evict or min(w.idle() or list(w.resident), key=lambda a: w.resident[a])
            if w.in_flight[victim]:
                self.forced += 1
            del w.resident[victim]
        w.resident[adapter] = now
        self.loads += 1


Policy = Callable[[Fleet, str, float], tuple[SimWorker, bool]]  # -> worker, whether it had to load


def loraplane(fleet: Fleet, adapter: str, now: float) -> tuple[SimWorker, bool]:
    route = [RouteWorker(w.id, "m", "", frozenset(w.resident), True) for w in fleet.workers]
    in_flight = Counter({w.id: w.total for w in fleet.workers})
    holders = candidates(route, "m", adapter)
    chosen = least_loaded(holders, in_flight)
    if chosen is not None:
        if is_hot(fleet.adapter_in_flight[adapter] + 1, len(holders), REPLICATE_AT) and len(holders) < len(route):
            d = decide(_views(fleet), "m", adapter, _last_used(fleet), replicate=True)
            if d is not None:
                fleet.load(fleet.by_id[d.worker_id], adapter, d.evict, now)
        return fleet.by_id[chosen.id], False
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
            SLOTS,
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


def run(wl: Workload, policy: Policy, trace: Sequence[tuple[float, str, float]]) -> dict[str, float]:
    fleet = Fleet(wl.workers)
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
        ttft.append((LOAD_S if loaded else 0.0) + TTFT_BASE_S + TTFT_PER_IN_FLIGHT_S * w.total)
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
    return {
        "loads_per_1000": round(fleet.loads / len(trace) * 1000, 2),
        "forced_busy_evictions": fleet.forced,
        "worst_to_average_in_flight_p99": round(imbalance[int(0.99 * (len(imbalance) - 1))], 3),
        "ttft_p50_ms": round(ttft[len(ttft) // 2] * 1000, 1),
        "ttft_p99_ms": round(ttft[int(0.99 * (len(ttft) - 1))] * 1000, 1),
    }


def offline_best(wl: Workload, trace: Sequence[tuple[float, str, float]]) -> float:
    """Loads per 1,000 requests of the best static partition: adapters assigned to workers by
    measured popularity, heaviest first onto the least loaded worker; each worker evicting with
    Belady's rule (the adapter needed furthest in the future)."""
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
                if len(cache) >= SLOTS:
                    del cache[max(cache, key=lambda x: cache[x])]
            cache[a] = next_use[i]
    return round(loads / len(trace) * 1000, 2)


def workloads(quick: bool) -> list[Workload]:
    k = 10 if quick else 1
    return [
        Workload("W1", 15, 4, skewed_15(), rate=12.0, requests=20_000 // k),
        *(Workload(f"W2 alpha={a}", 100, 8, zipf(100, a), rate=30.0, requests=60_000 // k) for a in (0.8, 1.0, 1.2)),
        Workload("W3", 1000, 8, zipf(1000, 1.1), rate=30.0, requests=100_000 // k, reshuffle_at=0.5),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tenth of the requests")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    for wl in workloads(args.quick):
        trace = arrivals(wl, args.seed)
        best = offline_best(wl, trace)
        policies: dict[str, Policy] = {
            "loraplane": loraplane,
            "round_robin": round_robin(),
            "consistent_hashing": consistent_hashing(wl.workers),
        }
        row: dict[str, Any] = {"workload": wl.name, "adapters": wl.adapters, "workers": wl.workers,
                               "requests": wl.requests, "offline_best_loads_per_1000": best}  # fmt: skip
        for name, policy in policies.items():
            r: dict[str, Any] = run(wl, policy, trace)
            r["loads_vs_offline_best"] = round(r["loads_per_1000"] / best, 2) if best else None
            row[name] = r
        results.append(row)
        print(f"{wl.name:14} offline best {best:7.2f} loads/1000")
        for name in policies:
            r = row[name]
            print(f"  {name:19} loads/1000 {r['loads_per_1000']:7.2f} ({r['loads_vs_offline_best']}x best)"
                  f"  worst/avg in flight p99 {r['worst_to_average_in_flight_p99']:5.2f}"
                  f"  TTFT p50 {r['ttft_p50_ms']:6.1f} ms p99 {r['ttft_p99_ms']:6.1f} ms")  # fmt: skip
    w2 = next(r for r in results if r["workload"] == "W2 alpha=1.0")["loraplane"]
    met = (w2["loads_vs_offline_best"] or 0) <= 1.6 and w2["worst_to_average_in_flight_p99"] <= 1.5
    target = {"loads_vs_offline_best_max": 1.6, "worst_to_average_max": 1.5, "met": met}
    out = {
        "benchmark": "affinity",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (a simulation: the machine sets only its speed)",
        "side_by_side": True,
        "model": {
            "slots_per_worker": SLOTS,
            "load_s": LOAD_S,
            "ttft_base_s": TTFT_BASE_S,
            "ttft_per_in_flight_s": TTFT_PER_IN_FLIGHT_S,
            "mean_generation_s": MEAN_GENERATION_S,
            "replicate_at_in_flight": REPLICATE_AT,
            "seed": args.seed,
        },  # fmt: skip
        "target_w2_alpha_1": target,
        "results": results,
    }
    path = ROOT / "bench" / "results" / "affinity.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"target on W2 alpha=1.0 (loads <= 1.6x best, worst/avg <= 1.5): {'met' if target['met'] else 'missed'}")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
