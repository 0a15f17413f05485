"""Tiers that mean capacity (issue 18), end to end, side by side in one run on one stack: Redis,
a control plane, a data plane with the fair queue on, a second data plane with it off (no worker
capacity known: requests go straight to the engines, which queue them first come first served),
and three agents attached to vLLM simulators (`tests/vllmsim.py --max-num-seqs`, so each engine
runs at most that many requests and queues the rest as vLLM's scheduler does). No tier has rate
limits. Streamed chat completions, timed to their first token. Measures:
  1. noisy neighbour: tenant A (shared tier) floods the base model at `--flood` times the fleet's
     capacity while tenant B sends at `--light` of it (open loops, Poisson arrivals; A's client
     keeps at most A_BOUND requests in flight). B's time to first token alone and with A, B's
     errors, A's completions against the capacity left to it, A's 429s and 503s. Variants: the
     fair queue off ("before"); B shared; B reserved; B dedicated (one worker its pool: A has the
     other two). The fleet's capacity is measured first: completions a second with twice its
     slots requested at once (closed loop).
  2. reserved residency: an eviction storm (shared tenants, many adapters, Zipf requests, few
     LoRA slots) while a reserved tenant uses two pinned adapters and two unpinned ones. Cold
     loads of the pinned ones counted from the control plane's log ("loaded <id> on <worker>")
     and the routing table sampled; first-token times pinned vs unpinned.
  3. dedicated isolation: shared tenants and one dedicated tenant (a pool of one worker of three,
     no spill-over) with random requests, uploads and deletes. Placements on the wrong side of
     the pool counted from the control plane's log, the routing table (sampled), and the requests
     each simulator received (its `/sim/state`, each request known by its message).
  4. with `--real-vllm`: part 1's B-shared case on two real vLLM workers (CPU build) of tiny-llama
     with --max-num-seqs 4: the fair queue at that concurrency per worker, at twice it, and off
     (the agents report their vLLM's --max-num-seqs, so "off" is a data plane told a concurrency no
     request waits for). Messages are screened first: the tiny model's greedy answer to some is all
     tokens that decode to "", of which vLLM streams nothing, so no client could time them.

A's flood runs in a process of its own (bench/loadgen.py); B, the measurements and everything
else in one event loop. All of it, the stack and the simulators share this machine's cores: each
phase reports the CPU each part used and what processes outside the run took.

    .venv/bin/python bench/tiers.py [--seconds 25] [--real-vllm] [--logs DIR] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import (  # noqa: E402
    Answer,
    answers_from,
    chat_body,
    closed_loop,
    pct,
    poisson,
    stream_chat,
    ttft_ms,
)
from tierfleet import (  # noqa: E402
    A_BOUND,
    B_BOUND,
    EVICTED,
    NO_QUEUE,
    OVERCOMMIT,
    QUEUE_TIMEOUT_S,
    SEQS,
    SLOTS,
    TOKENS,
    TOKENS_PER_S,
    WORKERS,
    Fleet,
    Sightings,
    TableSamples,
    Tenant,
    assign,
    close_clients,
    copies,
    delete,
    drained,
    loads_in,
    occupancy,
    open_clients,
    pin,
    queue_waits,
    spill_over,
    start_fleet,
    start_real,
    stop_fleet,
    table,
    tenant,
    unassign,
    upload,
    waited,
)

from loraplane.stack import BASE_MODEL  # noqa: E402

# 1. noisy neighbour


@dataclass(frozen=True)
class Rates:
    a: float
    b: float


async def capacity(fleet: Fleet, t: Tenant, seconds: float) -> dict[str, Any]:
    """Completions a second with twice the fleet's slots requested at once, through the fair queue."""
    marker = itertools.count()

    async def fire() -> Answer:
        body = chat_body(BASE_MODEL, fleet.content("cal-", next(marker)), TOKENS, **fleet.extra)
        return await stream_chat(fleet.sessions["b"], fleet.url, t.headers, body)

    slots = SEQS * len(fleet.workers)
    await closed_loop(slots * 2, min(2.0, seconds), fire)  # warm up
    answers = await closed_loop(slots * 2, seconds, fire)
    await drained(fleet)
    ok = [a for a in answers if a.ok]
    span = max(a.ended for a in ok) - min(a.started for a in ok)
    return {"slots": slots, "in_flight": slots * 2, "completed": len(ok), "errors": len(answers) - len(ok),
            "outcomes": dict(Counter(a.outcome for a in answers)),
            "req_per_s": round(len(ok) / span, 2),
            "service_ms_p50": round(pct([(a.ended - a.started) * 1000 for a in ok], 0.5) / 2, 1)}  # fmt: skip


class Flood:
    """A's open loop in a process of its own (bench/loadgen.py), so that its answers never delay
    the event loop that times B's; stopped by closing its stdin."""

    def __init__(self, fleet: Fleet, url: str, a: Tenant, rate: float, seed: int) -> None:
        self.config = {"url": url, "headers": a.headers, "model": BASE_MODEL, "tokens": TOKENS, "extra": fleet.extra,
                       "marker": f"{a.name}-", "prompts": fleet.prompts, "rate": rate, "bound": A_BOUND,
                       "seed": seed}  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        script = str(Path(__file__).resolve().parent / "loadgen.py")
        pipe = asyncio.subprocess.PIPE
        self.proc = await asyncio.create_subprocess_exec(sys.executable, script, json.dumps(self.config), stdin=pipe,
                                                         stdout=pipe)  # fmt: skip
        return self.proc.pid

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = await self.proc.stdout.read()
        if await self.proc.wait():
            raise RuntimeError(f"the flood exited with {self.proc.returncode}")
        result: dict[str, Any] = json.loads(out)
        return result


async def contest(fleet: Fleet, url: str, b: Tenant, a: Tenant | None, rates: Rates, seconds: float, warmup: float,
                  seed: int, sightings: Sightings | None = None) -> dict[str, Any]:  # fmt: skip
    """B's open loop for `seconds`, alone or while A floods (A started `warmup` seconds before)."""
    marker = itertools.count()

    async def fire_b() -> Answer:
        body = chat_body(BASE_MODEL, fleet.content(f"{b.name}-", next(marker)), TOKENS, **fleet.extra)
        return await stream_chat(fleet.sessions["b"], url, b.headers, body)

    stop_b, stop_watch = asyncio.Event(), asyncio.Event()
    watcher = asyncio.create_task(sightings.watch(stop_watch)) if sightings else None
    flood = Flood(fleet, url, a, rates.a, seed) if a is not None else None
    meter = fleet.meter()
    if flood is not None:
        meter.add("flood_client", await flood.start())
        await asyncio.sleep(warmup)
    waits = await queue_waits(fleet, url)
    meter.start()
    t0 = time.monotonic()
    asyncio.get_running_loop().call_later(seconds, stop_b.set)
    sampling = asyncio.create_task(occupancy(fleet, stop_b))
    b_flow = await poisson(rates.b, fire_b, B_BOUND, stop_b, random.Random(seed + 1))
    t1 = time.monotonic()
    engines = await sampling
    await b_flow.finish()  # B's last requests answered while A still floods
    cpu = meter.stop()
    queued = waited(waits, await queue_waits(fleet, url))
    flooded = await flood.stop() if flood is not None else None
    await drained(fleet)
    stop_watch.set()
    if watcher is not None:
        await watcher
    span = t1 - t0
    bs = b_flow.answers()
    out: dict[str, Any] = {
        "window_s": round(span, 1),
        "b": {"offered_per_s": round(rates.b, 2), "sent": len(bs), "ttft": ttft_ms(bs),
              "errors": sum(not x.ok for x in bs), "outcomes": dict(Counter(x.outcome for x in bs)),
              "duration_ms_p50": round(pct([(x.ended - x.started) * 1000 for x in bs if x.ok] or [0.0], 0.5), 1),
              "first_token_split": split(bs)},
        "cpu": cpu,
        "engines": engines,
        "fair_queue_waits_by_tier": queued,
    }  # fmt: skip
    if flooded is not None:
        everything = answers_from(flooded["answers"])
        window = [x for x in everything if t0 <= x.ended < t1]
        outcomes = Counter(x.outcome for x in window)
        out["a"] = {
            "offered_per_s": round(rates.a, 1),
            "sent_per_s": round(sum(t0 <= x.started < t1 for x in everything) / span, 1),
            "not_sent_per_s": round(sum(t0 <= x < t1 for x in flooded["not_sent"]) / span, 1),
            "completed_per_s": round(outcomes["ok"] / span, 2),
            "status_429": sum(n for k, n in outcomes.items() if k.startswith("429")),
            "status_503": sum(n for k, n in outcomes.items() if k.startswith("503")),
            "outcomes": dict(outcomes),
            "ttft": ttft_ms(window),
            "in_flight_cut_at_the_end": flooded["cut"],
        }
        out["b"]["slowest"] = slowest(bs, everything)
    return out


def split(answers: list[Answer]) -> dict[str, dict[str, float]]:
    """A simulator's first token: until it sent it (the time stamp it puts on it; waits in the
    data plane included), and from then to the client (relayed by the data plane), p50 / p99 ms."""
    timed = [x for x in answers if x.ok and x.engine_s >= 0]
    if not timed:
        return {}
    parts = {"until_the_simulator_sent_it": [x.engine_s for x in timed],
             "relayed_to_the_client": [x.ttft - x.engine_s for x in timed]}  # fmt: skip
    return {
        k: {"p50_ms": round(pct(v, 0.5) * 1000, 1), "p99_ms": round(pct(v, 0.99) * 1000, 1)} for k, v in parts.items()
    }


def slowest(bs: list[Answer], flood: list[Answer], n: int = 5) -> list[dict[str, float | None]]:
    """B's slowest first tokens, each with A's answers that ended meanwhile (refusals come in waves:
    requests that queued together time out together)."""
    out = []
    for x in sorted((x for x in bs if x.ok), key=lambda x: -x.ttft)[:n]:
        during = [y for y in flood if x.started <= y.ended <= x.started + x.ttft]
        sim_ms = round(x.engine_s * 1000, 1) if x.engine_s >= 0 else None
        out.append({"ttft_ms": round(x.ttft * 1000, 1), "until_the_simulator_sent_it_ms": sim_ms,
                    "a_refused_meanwhile": sum(not y.ok for y in during),
                    "a_completed_meanwhile": sum(y.ok for y in during)})  # fmt: skip
    return out


async def noisy_neighbour(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    reported = {w.worker_id: w.max_concurrency for w in (await table(fleet)).workers}
    if any(reported.values()):  # then the fair queue cannot be off in the "before" data plane
        print(f"  warning: agents report max_concurrency {reported}: 'before' is not without the fair queue")
    cal = await tenant(fleet, "calibration", "shared")
    cap = await capacity(fleet, cal, args.calibrate_s)
    rates = Rates(a=args.flood * cap["req_per_s"], b=args.light * cap["req_per_s"])
    seconds, alone_s, warmup = args.seconds, args.alone_seconds, args.warmup
    variants: dict[str, Any] = {}
    plan = [
        ("before", fleet.planes["fifo"][1], "shared"),
        ("shared", fleet.url, "shared"),
        ("reserved", fleet.url, "reserved"),
    ]
    if args.quick:
        plan.pop()
    for seed, (name, url, tier) in enumerate(plan):
        b = await tenant(fleet, f"b-{name}", tier)
        a = await tenant(fleet, f"a-{name}", "shared")
        alone = await contest(fleet, url, b, None, rates, alone_s, warmup, 10 * seed)
        with_a = await contest(fleet, url, b, a, rates, seconds, warmup, 10 * seed + 5)
        variants[name] = figures(alone, with_a, cap["req_per_s"])
        print(f"  {name}: B p99 {variants[name]['b_ttft_p99_ratio']}x, A {with_a['a']['completed_per_s']} req/s")
    if not args.no_dedicated:
        variants["dedicated"] = await dedicated(fleet, rates, cap["req_per_s"], args)
    return {"capacity": cap, "rates": {"a_per_s": round(rates.a, 1), "b_per_s": round(rates.b, 2)},
            "a_client_bound": A_BOUND, "agents_report_max_concurrency": reported, "variants": variants}  # fmt: skip


async def dedicated(fleet: Fleet, rates: Rates, cap: float, args: argparse.Namespace) -> dict[str, Any]:
    """B dedicated, the last worker its pool; where each request went, from the simulators."""
    b = await tenant(fleet, "b-dedicated", "dedicated")
    a = await tenant(fleet, "a-dedicated", "shared")
    pool = fleet.workers[-1]
    await assign(fleet, pool, b)
    try:
        alone = await contest(fleet, fleet.url, b, None, rates, args.alone_seconds, args.warmup, 40)
        seen = Sightings(fleet)
        with_a = await contest(fleet, fleet.url, b, a, rates, args.seconds, args.warmup, 45, seen)
    finally:
        await unassign(fleet, pool)
    out = figures(alone, with_a, cap * (len(fleet.workers) - 1) / len(fleet.workers), shared_with_b=False)
    b_on = Counter(w for m, ws in seen.where.items() if m.startswith("b-dedicated-") for w in ws)
    a_on = Counter(w for m, ws in seen.where.items() if m.startswith("a-dedicated-") for w in ws)
    out["where"] = {"pool": pool, "b_requests_seen_by_worker": dict(b_on), "a_requests_seen_by_worker": dict(a_on),
                    "b_outside_the_pool": sum(n for w, n in b_on.items() if w != pool),
                    "a_on_the_pool": a_on[pool]}  # fmt: skip
    print(f"  dedicated: B p99 {out['b_ttft_p99_ratio']}x, A {with_a['a']['completed_per_s']} req/s")
    return out


def figures(
    alone: dict[str, Any], with_a: dict[str, Any], a_capacity: float, shared_with_b: bool = True
) -> dict[str, Any]:
    """One variant's headline figures beside its two runs. A's capacity: the fleet's (less what B
    used, when B shares A's workers), or its workers' when B has a pool of its own."""
    left = (
        a_capacity - (with_a["b"]["sent"] - with_a["b"]["errors"]) / with_a["window_s"] if shared_with_b else a_capacity
    )
    b0, b1 = alone["b"]["ttft"], with_a["b"]["ttft"]
    ratio = round(b1["p99_ms"] / b0["p99_ms"], 2) if b0.get("n") and b1.get("n") else None
    service_s = alone["b"]["duration_ms_p50"] / 1000  # a request alone: its time on a worker
    b_done = (with_a["b"]["sent"] - with_a["b"]["errors"]) / with_a["window_s"]
    return {
        "b_ttft_p99_ratio": ratio,
        "slots_busy_on_average": {
            "a": round(with_a["a"]["completed_per_s"] * service_s, 1),
            "b": round(b_done * service_s, 1),
        },  # fmt: skip
        "b_errors": with_a["b"]["errors"] + alone["b"]["errors"],
        "a_capacity_left_per_s": round(left, 2),
        "a_share_of_capacity_left": round(with_a["a"]["completed_per_s"] / left, 3),
        "alone": alone,
        "with_a": with_a,
    }


# 2. reserved residency


async def residency(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    r = await tenant(fleet, "r-reserved", "reserved")
    pinned = [await upload(fleet, r, f"pinned-{i}") for i in (1, 2)]
    unpinned = [await upload(fleet, r, f"unpinned-{i}") for i in (1, 2)]
    storm: list[tuple[Tenant, str]] = []
    for i in range(args.storm_tenants):
        t = await tenant(fleet, f"storm-{i}", "shared")
        storm += [(t, f"s{j}") for j in range(args.storm_adapters)]
        for _, name in storm[-args.storm_adapters :]:
            await upload(fleet, t, name)
    pins = [await pin(fleet, r, p) for p in pinned]
    rng = random.Random(3)
    rng.shuffle(storm)
    weights = [1 / (k + 1) ** args.zipf for k in range(len(storm))]
    names = {p: f"pinned-{i}" for i, p in enumerate(pinned, 1)} | {
        u: f"unpinned-{i}" for i, u in enumerate(unpinned, 1)
    }
    marker = itertools.count()

    def r_fire(ids: list[str]) -> Any:
        async def go() -> Answer:
            model = f"{BASE_MODEL}:{names[rng.choice(ids)]}"
            body = chat_body(model, f"r-{next(marker)}", 4, **fleet.extra)
            return await stream_chat(fleet.sessions["b"], fleet.url, r.headers, body)

        return go

    async def storm_fire() -> Answer:
        t, name = rng.choices(storm, weights)[0]
        body = chat_body(f"{BASE_MODEL}:{name}", f"storm-{next(marker)}", 4, **fleet.extra)
        return await stream_chat(fleet.sessions["a"], fleet.url, t.headers, body)

    for u in unpinned:  # resident when the storm begins, as the pinned ones are
        await stream_chat(fleet.sessions["b"], fleet.url, r.headers, chat_body(f"{BASE_MODEL}:{names[u]}", "warm", 4))
    at_start = await table(fleet)
    offset = fleet.log_size()
    stop = asyncio.Event()
    samples = TableSamples(fleet)
    sampler = asyncio.create_task(samples.watch(stop))
    meter = fleet.meter()
    meter.start()
    asyncio.get_running_loop().call_later(args.storm_seconds, stop.set)
    flows = await asyncio.gather(
        poisson(args.storm_rate, storm_fire, A_BOUND, stop, random.Random(4)),
        poisson(args.reserved_rate / 2, r_fire(pinned), B_BOUND, stop, random.Random(5)),
        poisson(args.reserved_rate / 2, r_fire(unpinned), B_BOUND, stop, random.Random(6)),
    )
    for flow in flows:
        await flow.finish()
    cpu = meter.stop()
    await sampler
    await drained(fleet)
    log = fleet.log_since(offset)
    loads = loads_in(log)
    by_adapter = Counter(a for a, _ in loads)
    storm_answers, pinned_answers, unpinned_answers = (f.answers() for f in flows)
    held = {a: {w.worker_id for w in at_start.workers if a in w.adapter_ids} for a in pinned}
    pinned_log = copies(log, pinned, held)
    absent = sum(
        any(not any(p in res for res in residents.values()) for p in pinned) for residents, _ in samples.samples
    )
    for p in pinned:  # unpinned again, so that the next part starts from a fleet without pins
        await pin(fleet, r, p, on=False)
    return {
        "storm": {"tenants": args.storm_tenants, "adapters": len(storm), "zipf": args.zipf,
                  "rate_per_s": args.storm_rate, "seconds": args.storm_seconds,
                  "outcomes": dict(Counter(a.outcome for a in storm_answers)),
                  "loads": sum(by_adapter.values()) - sum(by_adapter[x] for x in pinned + unpinned),
                  "evictions": len(EVICTED.findall(log)),
                  "loads_per_s": round(len(loads) / args.storm_seconds, 2)},
        "slots": {"workers": len(fleet.workers), "per_worker": SLOTS},
        "pinned_on": sorted({w for p in pinned for w, res in samples.samples[0][0].items() if p in res}),
        "pinned_slots": pins[-1]["pinned_slots"],
        "pinned": {"adapters": pinned, "loads_during_storm": sum(by_adapter[p] for p in pinned),
                   "from_the_log": pinned_log,
                   "table_samples": len(samples.samples), "samples_with_one_not_resident": absent,
                   "ttft": ttft_ms(pinned_answers), "errors": sum(not a.ok for a in pinned_answers),
                   "outcomes": dict(Counter(a.outcome for a in pinned_answers))},
        "unpinned": {"adapters": unpinned, "loads_during_storm": sum(by_adapter[u] for u in unpinned),
                     "ttft": ttft_ms(unpinned_answers), "errors": sum(not a.ok for a in unpinned_answers),
                     "outcomes": dict(Counter(a.outcome for a in unpinned_answers))},
        "reserved_rate_per_s": args.reserved_rate,
        "cpu": cpu,
    }  # fmt: skip


# 3. dedicated isolation


async def isolation(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    d = await tenant(fleet, "iso-dedicated", "dedicated")
    others = [await tenant(fleet, f"iso-shared-{i}", "shared") for i in range(args.iso_tenants)]
    everyone = [d, *others]
    owner: dict[str, str] = {}  # adapter id -> tenant name, every adapter ever uploaded
    live: dict[str, dict[str, str]] = {t.name: {} for t in everyone}  # tenant -> adapter name -> id
    serial = itertools.count()

    async def add(t: Tenant) -> int:
        name = f"a{next(serial)}"
        adapter_id = await upload(fleet, t, name)
        owner[adapter_id] = t.name
        live[t.name][name] = adapter_id
        return 200

    for t in everyone:
        for _ in range(args.iso_adapters):
            await add(t)
    pool = fleet.workers[-1]
    evicted = await assign(fleet, pool, d)
    spill = await spill_over(fleet, d)
    offset = fleet.log_size()
    rng = random.Random(9)
    stop, stop_watch = asyncio.Event(), asyncio.Event()
    seen, samples = Sightings(fleet), TableSamples(fleet)
    watchers = [asyncio.create_task(seen.watch(stop_watch)), asyncio.create_task(samples.watch(stop_watch))]
    ops: Counter[str] = Counter()
    answers: dict[str, list[Answer]] = {t.name: [] for t in everyone}
    markers = itertools.count()

    async def request(t: Tenant) -> Answer:
        names = list(live[t.name])
        model = BASE_MODEL if not names or rng.random() < 0.2 else f"{BASE_MODEL}:{rng.choice(names)}"
        body = chat_body(model, f"{t.name}#{next(markers)}", 4, **fleet.extra)
        answer = await stream_chat(fleet.sessions["b"], fleet.url, t.headers, body)
        answers[t.name].append(answer)
        return answer

    async def remove(t: Tenant) -> int:
        name = rng.choice(list(live[t.name]))
        adapter_id = live[t.name].pop(name)
        return await delete(fleet, t, adapter_id)

    async def op() -> Answer:
        t = rng.choice(everyone)
        roll = rng.random()
        if roll < 0.1 and len(live[t.name]) < 18:
            ops[f"upload {await add(t)}"] += 1
        elif roll < 0.2 and len(live[t.name]) > 2:
            ops[f"delete {await remove(t)}"] += 1
        else:
            ops["request"] += 1
            return await request(t)
        return Answer(0.0, status=200, done=True, ttft=0.0)

    asyncio.get_running_loop().call_later(args.iso_seconds, stop.set)
    flow = await poisson(args.iso_rate, op, B_BOUND, stop, random.Random(10))
    await flow.finish()
    await drained(fleet)
    await asyncio.sleep(0.5)  # the last requests seen by the watcher
    stop_watch.set()
    await asyncio.gather(*watchers)
    log = fleet.log_since(offset)
    loads = [(a, w) for a, w in loads_in(log) if a in owner]
    foreign_loads = sum(w == pool and owner[a] != d.name for a, w in loads)
    own_outside = sum(w != pool and owner[a] == d.name for a, w in loads)
    foreign_resident: set[tuple[str, str]] = set()
    own_resident_outside: set[tuple[str, str]] = set()
    unpooled = sum(pools.get(pool) != d.id for _, pools in samples.samples)
    for residents, _ in samples.samples:
        for w, adapters in residents.items():
            for a in adapters & owner.keys():
                if w == pool and owner[a] != d.name:
                    foreign_resident.add((a, w))
                elif w != pool and owner[a] == d.name:
                    own_resident_outside.add((a, w))
    by_tenant: dict[str, Counter[str]] = {t.name: Counter() for t in everyone}
    for m, ws in seen.where.items():
        name = m.partition("#")[0]
        if name in by_tenant:
            by_tenant[name].update(ws)
    sent = {t.name: len(answers[t.name]) for t in everyone}
    await unassign(fleet, pool)
    return {
        "pool": pool, "spill_over": spill, "evicted_at_assignment": len(evicted),
        "tenants": {"dedicated": 1, "shared": len(others)}, "adapters_at_start_per_tenant": args.iso_adapters,
        "rate_per_s": args.iso_rate, "seconds": args.iso_seconds, "ops": dict(ops),
        "placements": {"total": len(loads), "on_pool": sum(w == pool for _, w in loads),
                       "others_on_pool": foreign_loads, "dedicated_outside_pool": own_outside},
        "table": {"samples": len(samples.samples), "samples_with_the_pool_not_assigned": unpooled,
                  "others_resident_on_pool": len(foreign_resident),
                  "dedicated_resident_outside_pool": len(own_resident_outside)},
        "requests_seen": {"by_tenant_and_worker": {k: dict(v) for k, v in by_tenant.items()},
                          "sent": sent, "seen": {k: sum(v.values()) for k, v in by_tenant.items()},
                          "others_on_pool": sum(v[pool] for k, v in by_tenant.items() if k != d.name),
                          "dedicated_outside_pool": sum(n for w, n in by_tenant[d.name].items() if w != pool)},
        "outcomes": {t.name: dict(Counter(a.outcome for a in answers[t.name])) for t in everyone},
    }  # fmt: skip


# 4. real vLLM


async def real_vllm(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1's B-shared case on real vLLM: the fair queue at --max-num-seqs per worker; at
    OVERCOMMIT times that; and off ("before": a data plane whose worker concurrency is NO_QUEUE,
    as the agents report their vLLM's --max-num-seqs). One "alone" run for all three (alone, B's
    requests never wait)."""
    reported = {w.worker_id: w.max_concurrency for w in (await table(fleet)).workers}
    cal = await tenant(fleet, "calibration", "shared")
    fleet.prompts = await visible_prompts(fleet, cal)
    cap = await capacity(fleet, cal, args.calibrate_s * 2)
    rates = Rates(a=args.flood * cap["req_per_s"], b=args.light * cap["req_per_s"])
    out: dict[str, Any] = {"capacity": cap, "rates": {"a_per_s": round(rates.a, 1), "b_per_s": round(rates.b, 2)},
                           "agents_report_max_concurrency": reported, "prompts": len(fleet.prompts),
                           "worker_concurrency": {"shared": SEQS, "overcommit": OVERCOMMIT * SEQS,
                                                  "before": NO_QUEUE}}  # fmt: skip
    b = await tenant(fleet, "b-alone", "shared")
    alone = await contest(fleet, fleet.url, b, None, rates, args.real_seconds / 2, args.warmup, 60)
    plan = [("shared", fleet.url), ("overcommit", fleet.planes["overcommit"][1]), ("before", fleet.planes["fifo"][1])]
    for seed, (name, url) in enumerate(plan):
        b = await tenant(fleet, f"b-{name}", "shared")
        a = await tenant(fleet, f"a-{name}", "shared")
        with_a = await contest(fleet, url, b, a, rates, args.real_seconds, args.warmup, 65 + 10 * seed)
        out[name] = figures(alone, with_a, cap["req_per_s"])
        print(f"  {name}: B p99 {out[name]['b_ttft_p99_ratio']}x, A {with_a['a']['completed_per_s']} req/s")
    return out


async def visible_prompts(fleet: Fleet, t: Tenant, want: int = 16) -> list[str]:
    """Messages whose answers show every token: vLLM sends no event for a token that decodes to
    "" (the tiny model's greedy answer to some messages is all such tokens), so a client could not
    see their first token. Greedy decoding: a message found good stays good."""
    good: list[str] = []
    for start in range(0, 400, 8):
        batch = [f"Tell me about item {n}." for n in range(start, start + 8)]
        seen = await asyncio.gather(*(tokens_visible(fleet, t, m) for m in batch))
        good += [m for m, ok in zip(batch, seen, strict=True) if ok]
        if len(good) >= want:
            return good[:want]
    raise RuntimeError(f"only {len(good)} of 400 messages have answers whose every token shows")


async def tokens_visible(fleet: Fleet, t: Tenant, message: str) -> bool:
    body = chat_body(BASE_MODEL, message, TOKENS, **fleet.extra)
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    counts = []
    async with fleet.sessions["ops"].post(fleet.url + "/v1/chat/completions", json=body, headers=t.headers) as r:
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                counts.append(event["usage"]["completion_tokens"])
    return counts == list(range(1, TOKENS + 1))


# the run


async def measure(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    await open_clients(fleet)
    try:
        out: dict[str, Any] = {}
        for key, title, part in (("noisy_neighbour", "1. noisy neighbour", noisy_neighbour),
                                 ("residency", "2. reserved residency", residency),
                                 ("isolation", "3. dedicated isolation", isolation)):  # fmt: skip
            started = time.monotonic()
            print(title, flush=True)
            out[key] = await part(fleet, args)
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
        return out
    finally:
        await close_clients(fleet)


async def measure_real(fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    await open_clients(fleet)
    try:
        print("4. real vLLM")
        return await real_vllm(fleet, args)
    finally:
        await close_clients(fleet)


def code_digest() -> dict[str, str]:
    """Which code was measured (the worktree is not committed and others edit it)."""
    files = ("dataplane/fairshare.py", "dataplane/inference.py", "dataplane/routing.py", "controlplane/placer.py",
             "controlplane/placement.py", "controlplane/store.py", "controlplane/reconcile.py",
             "workeragent/agent.py", "tests/vllmsim.py")  # fmt: skip
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"head": rev.stdout.strip()} | {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files}


def keep_logs(run: Path, to: Path | None) -> None:
    if to is not None:
        shutil.copytree(run / "logs", to / run.name, dirs_exist_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=25.0, help="B's window with A flooding, per variant")
    ap.add_argument("--alone-seconds", type=float, default=15.0, help="B's window alone, per variant")
    ap.add_argument("--warmup", type=float, default=5.0, help="A floods this long before B's window")
    ap.add_argument("--calibrate-s", type=float, default=5.0, help="the capacity measurement")
    ap.add_argument("--flood", type=float, default=10.0, help="A's rate, times the fleet's capacity")
    ap.add_argument("--light", type=float, default=0.1, help="B's rate, times the fleet's capacity")
    ap.add_argument("--storm-seconds", type=float, default=40.0)
    ap.add_argument("--storm-rate", type=float, default=25.0, help="the storm's requests a second")
    ap.add_argument("--storm-tenants", type=int, default=4)
    ap.add_argument("--storm-adapters", type=int, default=10, help="per storm tenant")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--reserved-rate", type=float, default=4.0, help="the reserved tenant's requests a second")
    ap.add_argument("--iso-seconds", type=float, default=40.0)
    ap.add_argument("--iso-rate", type=float, default=20.0, help="random operations a second")
    ap.add_argument("--iso-tenants", type=int, default=3, help="shared tenants beside the dedicated one")
    ap.add_argument("--iso-adapters", type=int, default=6, help="each tenant's adapters at the start")
    ap.add_argument("--no-dedicated", action="store_true", help="skip part 1's dedicated variant")
    ap.add_argument("--real-vllm", action="store_true", help="also part 4, on two real vLLM workers")
    ap.add_argument("--real-seconds", type=float, default=60.0, help="part 4's window with A")
    ap.add_argument("--quick", action="store_true", help="a smoke test: every part, seconds each")
    ap.add_argument("--logs", type=Path, help="copy the stacks' logs here (evidence for the counts)")
    args = ap.parse_args()
    if args.quick:  # every part and variant but "reserved" (the same path as "shared", another weight)
        args.seconds, args.alone_seconds, args.warmup, args.calibrate_s = 4.0, 2.0, 1.5, 1.5
        args.storm_seconds, args.iso_seconds, args.storm_tenants, args.storm_adapters = 5.0, 5.0, 2, 8
        args.iso_adapters, args.real_seconds = 3, 20.0
    digest = code_digest()
    load_before = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        fleet = start_fleet(Path(tmp) / "sim")
        print(f"stack up in {time.monotonic() - started:.0f} s", flush=True)
        try:
            measured = asyncio.run(measure(fleet, args))
        finally:
            stop_fleet(fleet)
            keep_logs(Path(tmp) / "sim", args.logs)
        if args.real_vllm:
            real = start_real(Path(tmp) / "vllm")
            try:
                measured["real_vllm"] = asyncio.run(measure_real(real, args))
            finally:
                stop_fleet(real)
                keep_logs(Path(tmp) / "vllm", args.logs)
    after = code_digest()
    result = {
        "benchmark": "tiers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; load generator, simulators and stack share them",
        "load_average_before": [round(x, 2) for x in load_before],
        "run_s": round(time.monotonic() - started),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "code": digest,
        "code_changed_during_the_run": sorted(f for f in digest if after[f] != digest[f]),
        "setup": {"workers": len(WORKERS), "max_num_seqs": SEQS, "lora_slots": SLOTS, "completion_tokens": TOKENS,
                  "sim_tokens_per_s": TOKENS_PER_S, "a_client_bound": A_BOUND, "queue_timeout_s": QUEUE_TIMEOUT_S,
                  "worker_concurrency": "LORAPLANE_WORKER_CONCURRENCY on the fair-queue data plane, 0 on the other"},
        **measured,
    }  # fmt: skip
    out = ROOT / "bench" / "results" / "tiers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {out.relative_to(ROOT)}")


def report(r: dict[str, Any]) -> None:
    s = r["setup"]
    print(f"tiers, one run ({r['date']}), {r['machine']}{' [quick]' if r['args']['quick'] else ''};"
          f" load average before {r['load_average_before']}; {r['run_s']} s")  # fmt: skip
    n = r["noisy_neighbour"]
    print(f"1. noisy neighbour: {s['workers']} simulated workers x --max-num-seqs {s['max_num_seqs']},"
          f" {s['completion_tokens']} tokens at {s['sim_tokens_per_s']:.0f}/s; capacity"
          f" {n['capacity']['req_per_s']} req/s; A offered {n['rates']['a_per_s']}/s (at most {n['a_client_bound']}"
          f" in flight), B {n['rates']['b_per_s']}/s; queue timeout {s['queue_timeout_s']:.0f} s")  # fmt: skip
    contest_table({name: v for name, v in n["variants"].items()})
    if "real_vllm" in r:
        v = r["real_vllm"]
        print(f"4. real vLLM (CPU build), 2 workers x --max-num-seqs {s['max_num_seqs']}: capacity"
              f" {v['capacity']['req_per_s']} req/s; A offered {v['rates']['a_per_s']}/s,"
              f" B {v['rates']['b_per_s']}/s")  # fmt: skip
        contest_table({k: v[k] for k in ("before", "shared", "overcommit") if k in v})
    p = r["residency"]
    st, pi, un = p["storm"], p["pinned"], p["unpinned"]
    print(f"2. reserved residency: {p['slots']['workers']} workers x {p['slots']['per_worker']} LoRA slots; storm of"
          f" {st['adapters']} adapters ({st['tenants']} tenants, Zipf {st['zipf']}) at {st['rate_per_s']}/s for"
          f" {st['seconds']:.0f} s: {st['loads']} loads ({st['loads_per_s']}/s), {st['evictions']} evictions,"
          f" {st['outcomes']}")  # fmt: skip
    lg = pi["from_the_log"]
    print(f"  pinned (on {p['pinned_on']}) during the storm: {lg['loads']} loads, {lg['cold_loads']} of them cold"
          f" (no copy resident); {lg['evictions']} copies evicted, never fewer than {lg['fewest_copies']} resident;"
          f" not resident in {pi['samples_with_one_not_resident']} of {pi['table_samples']} routing-table"
          f" samples")  # fmt: skip
    print(f"  {'':10} {'TTFT n':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'loads':>6} errors")
    for name, x in (("pinned", pi), ("unpinned", un)):
        t = x["ttft"]
        print(f"  {name:10} {t['n']:7} {t.get('p50_ms', '-'):>8} {t.get('p99_ms', '-'):>8} {t.get('max_ms', '-'):>8}"
              f" {x['loads_during_storm']:6} {x['errors']}")  # fmt: skip
    i = r["isolation"]
    pl, tb, rs = i["placements"], i["table"], i["requests_seen"]
    print(f"3. dedicated isolation: pool {i['pool']} (spill-over {i['spill_over']}), {i['tenants']['shared']} shared"
          f" tenants + 1 dedicated, {i['rate_per_s']} ops/s for {i['seconds']:.0f} s: {i['ops']}")  # fmt: skip
    print(f"  placements logged: {pl['total']} ({pl['on_pool']} on the pool); others' on the pool"
          f" {pl['others_on_pool']}, the dedicated tenant's outside it {pl['dedicated_outside_pool']}")  # fmt: skip
    print(f"  routing table, {tb['samples']} samples: others' adapters resident on the pool"
          f" {tb['others_resident_on_pool']}, the dedicated tenant's outside it"
          f" {tb['dedicated_resident_outside_pool']}")  # fmt: skip
    seen, sent = sum(rs["seen"].values()), sum(rs["sent"].values())
    print(f"  requests the simulators saw ({seen} of {sent} sent): others' on the pool {rs['others_on_pool']},"
          f" the dedicated tenant's outside it {rs['dedicated_outside_pool']}")  # fmt: skip
    print(f"  outcomes: {i['outcomes']}")


def contest_table(variants: dict[str, Any]) -> None:
    print(f"  {'B':9} {'B alone p50/p99':>16} {'B with A p50/p99':>17} {'p99 x':>6} {'B err':>5} {'A done/s':>8}"
          f" {'A left/s':>8} {'A share':>7} {'A 429':>6} {'A 503':>6} {'A unsent/s':>10} {'running':>9} {'DP CPU%':>7}"
          f" {'gen CPU%':>8} {'busy%':>5}")  # fmt: skip
    for name, v in variants.items():
        b0, b1 = v["alone"]["b"]["ttft"], v["with_a"]["b"]["ttft"]
        a, cpu = v["with_a"]["a"], v["with_a"]["cpu"]
        plane = {"before": "dataplane_fifo", "overcommit": "dataplane_overcommit"}.get(name, "dataplane")
        dp = cpu.get(f"{plane}_pct_of_a_core")
        gen = round(cpu["load_generator_pct_of_a_core"] + cpu.get("flood_client_pct_of_a_core", 0), 1)
        e = v["with_a"]["engines"]
        busy = f"{e['running_mean']:.1f}/{e['slots']}"
        print(f"  {name:9} {ms(b0):>16} {ms(b1):>17} {v['b_ttft_p99_ratio']!s:>6} {v['b_errors']:5}"
              f" {a['completed_per_s']:8} {v['a_capacity_left_per_s']:8} {v['a_share_of_capacity_left']:7}"
              f" {a['status_429']:6} {a['status_503']:6} {a['not_sent_per_s']:10} {busy:>9} {dp!s:>7}"
              f" {gen:8} {cpu['machine_busy_pct']:5}")  # fmt: skip


def ms(t: dict[str, Any]) -> str:
    return f"{t['p50_ms']:.0f} / {t['p99_ms']:.0f}" if t.get("n") else "-"


if __name__ == "__main__":
    main()
