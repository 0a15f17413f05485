"""The affinity benchmark's fleet model (bench/affinity.py) against the running system, once: the
same arrival trace (W2: 100 adapters, Zipf 1.0, 30 requests/s, generations of 2 s on average)
through a real data plane, control plane, Redis and 8 worker agents, each attached to a vLLM
simulator with a host-memory tier (`tests/vllmsim.py --max-loras 8 --max-cpu-loras 32`, the
catalog saying the same), and through the model with loraplane's policy; the loads and the
balance of both, side by side.

Each request is a chat completion for its adapter, not streamed, whose generation lasts what the
trace says (one token at `sim_tokens_per_s` = 1 / its seconds). No rate limits, and no worker
capacity known to the data plane (as in the model: no queueing in the data plane). Measured:
loads, as the control plane logs them ("loaded <adapter> on <worker>", copies included); the
busiest engine's requests (running and waiting, its /metrics) over the engines' mean, sampled at
every 10th arrival as the model samples it, and its p99; swap-ins (the simulators' count). The
model runs the same trace from the same empty fleet. The claim checked: loads and balance within
20% of the model's prediction.

    .venv/bin/python bench/affinity_validate.py [--requests 6000] [--seed 7] [--logs DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from affinity import HOST_PLACES, SLOTS, Workload, arrivals, loraplane, offline_best, run, zipf  # noqa: E402
from tierfleet import (  # noqa: E402
    LOADED,
    NO_QUEUE,
    UNLIMITED,
    Fleet,
    Tenant,
    close_clients,
    open_clients,
    stop_fleet,
    tenant,
    upload,
)

from loraplane import tinymodel  # noqa: E402
from loraplane.catalog import Catalog  # noqa: E402
from loraplane.stack import BASE_MODEL, Stack, StackConfig, WorkerSpec  # noqa: E402
from tests.support import free_port, start_simulator  # noqa: E402

WORKERS = 8
SWAP_IN_MS = 1.0  # the simulators' swap-in (bench/hosttier.py measures ~1 ms on the CPU build)
TOLERANCE = 0.2


def workload(requests: int) -> Workload:
    return Workload("W2 alpha=1.0, host tier", 100, WORKERS, zipf(100, 1.0), rate=30.0, requests=requests,
                    places=HOST_PLACES)  # fmt: skip


def start(tmp: Path) -> Fleet:
    """Eight simulators with a host-memory tier, and the stack's agents attached to them."""
    model_dir = tinymodel.build(tmp / "data" / "models" / BASE_MODEL)
    catalog = tmp / "catalog.json"
    Catalog.write(catalog, [{"name": BASE_MODEL, "kind": "chat", "path": str(model_dir), "lora": True, "max_rank": 64,
                             "max_adapters_per_worker": SLOTS, "max_cpu_loras": HOST_PLACES}])  # fmt: skip
    sims, ports = [], []
    fleet: Fleet | None = None
    try:
        for _ in range(WORKERS):
            sim, _, port = start_simulator(BASE_MODEL, "--max-loras", str(SLOTS), "--max-cpu-loras", str(HOST_PLACES),
                                           "--swap-in-ms", str(SWAP_IN_MS))  # fmt: skip
            sims.append(sim)
            ports.append(port)
        engines = [f"http://127.0.0.1:{p}" for p in ports]
        extra = tuple(
            WorkerSpec(p, env=(("LORAPLANE_VLLM_URL", u),)) for p, u in zip(ports[1:], engines[1:], strict=True)
        )
        env = (*UNLIMITED, ("LORAPLANE_VLLM_URL", engines[0]), ("LORAPLANE_CATALOG", str(catalog)),
               ("LORAPLANE_WORKER_CONCURRENCY", str(NO_QUEUE)), ("LORAPLANE_DATAPLANE_REPLICAS", "1"))  # fmt: skip
        config = StackConfig(data_dir=tmp / "data", http_port=free_port(), grpc_port=free_port(), vllm_port=ports[0],
                             log_dir=tmp / "logs", extra_env=env, extra_workers=extra)  # fmt: skip
        stack = Stack(config)
        workers = [f"embedded-{BASE_MODEL}"] + [f"embedded-{BASE_MODEL}-{i}" for i in range(2, WORKERS + 1)]
        fleet = Fleet(stack, workers, engines, sims)
        stack.start()
        return fleet
    except BaseException:
        if fleet is not None:
            stop_fleet(fleet)
        for sim in sims:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
        raise


async def engine_counts(fleet: Fleet) -> tuple[list[float], float]:
    """Per engine, its requests running and waiting; and the swap-ins of all of them."""

    async def one(url: str) -> tuple[float, float]:
        async with fleet.sessions["ops"].get(url + "/metrics") as r:
            n = swaps = 0.0
            for line in (await r.text()).splitlines():
                if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                    n += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllmsim:lora_swap_ins_total"):
                    swaps = float(line.rsplit(" ", 1)[1])
            return n, swaps

    got = await asyncio.gather(*(one(u) for u in fleet.engines))
    return [n for n, _ in got], sum(s for _, s in got)


async def replay(fleet: Fleet, t: Tenant, trace: list[tuple[float, str, float]]) -> dict[str, Any]:
    """The trace through the data plane, open loop at its arrival times; the engines sampled at
    every 10th arrival."""
    session = fleet.sessions["a"]
    statuses: dict[int, int] = {}
    late: list[float] = []
    imbalance: list[float] = []

    async def fire(adapter: str, gen: float) -> None:
        body = {"model": f"{BASE_MODEL}:{adapter}", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                "sim_tokens_per_s": 1 / max(gen, 1e-3)}  # fmt: skip
        try:
            async with session.post(fleet.url + "/v1/chat/completions", json=body, headers=t.headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
        except aiohttp.ClientError:
            statuses[0] = statuses.get(0, 0) + 1

    async def sample() -> None:
        counts, _ = await engine_counts(fleet)
        mean = statistics.fmean(counts)
        if mean > 0:
            imbalance.append(max(counts) / mean)

    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    for i, (at, adapter, gen) in enumerate(trace):
        wait = start + at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            late.append(-wait)
        tasks.append(asyncio.create_task(fire(adapter, gen)))
        if i % 10 == 0:
            tasks.append(asyncio.create_task(sample()))
    await asyncio.gather(*tasks)
    imbalance.sort()
    late.sort()
    return {
        "statuses": statuses,
        "worst_to_average_in_flight_p99": round(imbalance[int(0.99 * (len(imbalance) - 1))], 3),
        "samples": len(imbalance),
        "arrivals_late_by_p99_ms": round(late[int(0.99 * (len(late) - 1))] * 1000, 1) if late else 0.0,
        "seconds": round(time.monotonic() - start, 1),
    }


async def measure(fleet: Fleet, trace: list[tuple[float, str, float]]) -> dict[str, Any]:
    await open_clients(fleet)
    try:
        t = await tenant(fleet, "affinity", "reserved")  # 200 adapters allowed
        sem = asyncio.Semaphore(8)

        async def one(name: str) -> None:
            async with sem:
                await upload(fleet, t, name)

        await asyncio.gather(*(one(f"a{i:04d}") for i in range(100)))
        log_from = fleet.log_size()
        _, swaps_before = await engine_counts(fleet)
        out = await replay(fleet, t, trace)
        await asyncio.sleep(1.0)  # the control plane's last log lines
        _, swaps_after = await engine_counts(fleet)
        loads = len(LOADED.findall(fleet.log_since(log_from)))
        n = len(trace)
        out |= {"loads": loads, "loads_per_1000": round(loads / n * 1000, 2),
                "swap_ins_per_1000": round((swaps_after - swaps_before) / n * 1000, 2)}  # fmt: skip
        return out
    finally:
        await close_clients(fleet)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000, help="of the trace (30 a second)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--logs", type=Path, help="keep the stack's logs here")
    args = ap.parse_args()
    wl = workload(args.requests)
    trace = arrivals(wl, args.seed)
    model = run(wl, loraplane(), trace)
    today = run(wl, loraplane(today=True), trace)
    best = offline_best(wl, trace)
    print(f"trace: {len(trace)} requests over {trace[-1][0]:.0f} s, seed {args.seed}; offline best {best} loads/1000")
    tmp = Path(tempfile.mkdtemp(prefix="affinity-validate-"))
    fleet = start(tmp)
    try:
        system = asyncio.run(measure(fleet, trace))
    finally:
        stop_fleet(fleet)
        if args.logs:
            shutil.copytree(tmp / "logs", args.logs, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"system: {system}")
    rows = (("loads / 1,000 requests", "loads_per_1000"), ("swap-ins / 1,000", "swap_ins_per_1000"),
            ("worst/avg in flight p99", "worst_to_average_in_flight_p99"))  # fmt: skip
    print(f"{'':26} {'model':>8} {'system':>8} {'system/model':>13}   (model, today's rule)")
    within = {}
    for label, key in rows:
        m, s = float(model[key]), float(system[key])
        ratio = s / m if m else float("nan")
        if key != "swap_ins_per_1000":
            within[key] = abs(ratio - 1) <= TOLERANCE
        print(f"{label:26} {m:8.2f} {s:8.2f} {ratio:13.2f}   ({today[key]})")
    ok = all(within.values())
    print(f"loads and balance within {TOLERANCE:.0%} of the model: {'yes' if ok else 'no'} {within}")
    print(f"machine: {os.cpu_count()} cores; the stack, the simulators and this client share them")


if __name__ == "__main__":
    main()
