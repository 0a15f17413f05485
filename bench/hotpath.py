"""The data plane's hot path: the data plane in front of the vLLM simulator vs the simulator
direct, side by side in one run.

Runs Redis, a control plane, an agent attached to the simulator (`tests/vllmsim.py`, no
model) and one data plane process on free ports; one tenant with one adapter, resident. With
`--before REV` (default: the commit before issue 13) a second data plane, that commit's code
(`git archive` into a temp dir, run with PYTHONPATH there), serves the same stack next to the
current one, so that before and after are measured in one run on the same machine. Measures:
  - added latency, concurrency 1, non-streaming: p50/p99 through each data plane minus direct,
    requests interleaved in blocks (their order rotating) so all see the same machine;
  - throughput: closed-loop concurrency sweep, `--rounds` times, the data planes alternating
    which goes first; the most requests/s with p99 <= 10 ms;
  - SSE: per-chunk delay (receipt time minus the simulator's send time), through minus direct;
  - each data plane's CPU time per request.

The load generator shares this machine's cores with everything it measures.

    .venv/bin/python bench/hotpath.py [--requests 3000] [--seconds 3] [--rounds 2] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataplane.upstream import Pool  # noqa: E402
from loraplane.controlplane.v1 import tenant_pb2  # noqa: E402
from loraplane.limits import RATE_VARS  # noqa: E402
from loraplane.stack import Stack, StackConfig, http_ok, wait_until  # noqa: E402
from tests.support import free_port, lora_tensors, safetensors_bytes  # noqa: E402

MODEL = "tiny-llama:hot"
SLO_P99_MS = 10.0
BEFORE = "d4099c6"  # the commit before issue 13 (one path for the cross-cutting concerns)


@dataclass(frozen=True)
class Plane:
    """A data plane under test: "after" (this tree) or "before" (`--before`'s)."""

    name: str
    url: str
    pid: int


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def one(pool: Pool, url: str, model: str) -> float:
    """One non-streaming chat completion; the load generator is the data plane's own lean
    client, so that it takes as little of the shared cores as it can."""
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
    started = time.perf_counter()
    r = await pool.post(url, "/v1/chat/completions", body, 60)
    await r.read(60)
    r.release()
    if r.status != 200:
        raise RuntimeError(f"{url}: {r.status}")
    return time.perf_counter() - started


Call = Callable[[], Awaitable[float]]


def latency_figures(d: list[float], t: list[float]) -> dict[str, float]:
    ms = 1000
    return {
        "n_each": len(d),
        "direct_p50_ms": round(statistics.median(d) * ms, 3),
        "direct_p99_ms": round(pct(d, 0.99) * ms, 3),
        "through_p50_ms": round(statistics.median(t) * ms, 3),
        "through_p99_ms": round(pct(t, 0.99) * ms, 3),
        "added_p50_ms": round((statistics.median(t) - statistics.median(d)) * ms, 3),
        "added_p99_ms": round((pct(t, 0.99) - pct(d, 0.99)) * ms, 3),
    }


async def added_latency(direct: Call, through: dict[str, Call], n: int) -> dict[str, dict[str, float]]:
    """Per data plane; blocks of 100 requests, direct and each data plane in a rotating order."""
    calls = [("direct", direct), *through.items()]
    lat: dict[str, list[float]] = {name: [] for name, _ in calls}
    for block in range(n // 100):
        turn = block % len(calls)
        for name, call in calls[turn:] + calls[:turn]:
            lat[name] += [await call() for _ in range(100)]
    return {name: latency_figures(lat["direct"], lat[name]) for name in through}


async def closed_loop(call: Call, concurrency: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            lat.append(await call())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "rps": round(len(lat) / took),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
    }


async def sse_delays(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 50, "stream": True,
            "sim_tokens_per_s": 200}  # fmt: skip
    delays = []
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                delays.append(time.time() - json.loads(line[6:])["sim_t"])
    return delays


async def sweep(plane: Plane, call: Call, concurrency: int, seconds: float) -> dict[str, float]:
    """A closed loop through `plane`, with its CPU time per request."""
    proc = psutil.Process(plane.pid)
    before = proc.cpu_times()
    run = await closed_loop(call, concurrency, seconds)
    after = proc.cpu_times()
    spent = (after.user + after.system) - (before.user + before.system)
    run["dp_cpu_us_per_request"] = round(spent / run["requests"] * 1e6)
    return run


async def measure(args: argparse.Namespace, sim_url: str, planes: list[Plane], key: str) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        auth = {"Authorization": f"Bearer {key}"}
        async with session.get(planes[0].url + "/v1/adapters", headers=auth) as r:
            adapter_id = (await r.json())["data"][0]["id"]

        plain = Pool({})

        async def direct() -> float:
            return await one(plain, sim_url, adapter_id)

        def through_fn(plane: Plane) -> Call:
            pool = Pool(auth)
            return lambda: one(pool, plane.url, MODEL)

        through = {p.name: through_fn(p) for p in planes}
        for _ in range(200):  # warm up every path (connections, caches, placement: through first)
            for call in through.values():
                await call()
            await direct()
        latency = await added_latency(direct, through, args.requests)

        runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in planes}
        sweep_direct = []
        for round_ in range(args.rounds):
            for c in (1, 2, 4, 8, 16, 32, 64):
                for plane in planes if round_ % 2 == 0 else planes[::-1]:
                    runs[plane.name].append(await sweep(plane, through[plane.name], c, args.seconds))
                if round_ == 0:
                    sweep_direct.append(await closed_loop(direct, c, args.seconds))

        sse: dict[str, list[float]] = {"direct": [], **{p.name: [] for p in planes}}
        for _ in range(10):
            sse["direct"] += await sse_delays(session, sim_url, {}, adapter_id)
            for p in planes:
                sse[p.name] += await sse_delays(session, p.url, auth, MODEL)
    out: dict[str, Any] = {}
    for p in planes:
        first = runs[p.name][:7]  # the first round: the sweep's figures as this benchmark always gave them
        within = [r for r in first if r["p99_ms"] <= SLO_P99_MS]
        d, t = sse["direct"], sse[p.name]
        out[p.name] = {
            "added_latency_concurrency_1": latency[p.name],
            "throughput_through": first,
            "throughput_direct": sweep_direct,
            "max_rps_at_p99_le_10ms": max(within, key=lambda r: r["rps"]) if within else None,
            "sse_per_chunk": {
                "chunks_each": len(d),
                "direct_p50_ms": round(statistics.median(d) * 1000, 3),
                "through_p50_ms": round(statistics.median(t) * 1000, 3),
                "added_p50_ms": round((statistics.median(t) - statistics.median(d)) * 1000, 3),
                "added_p99_ms": round((pct(t, 0.99) - pct(d, 0.99)) * 1000, 3),
            },
            "dp_cpu_us_per_request_median": statistics.median(r["dp_cpu_us_per_request"] for r in runs[p.name]),
            "dp_cpu_us_per_request_all_rounds": [r["dp_cpu_us_per_request"] for r in runs[p.name]],
        }
    return out


def before_tree(rev: str, tmp: Path) -> Path:
    """`rev`'s files (not a checkout: nothing in this repository changes)."""
    tree = tmp / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


# The tenant's rate limits on (leased, checked and settled on every request) but never reached.
LIMITS_ON = tuple((name, "1000000000") for name in RATE_VARS)


def start_before(stack: Stack, tree: Path, log_dir: Path, limits: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """The `before` tree's data plane, on the same stack as the current one (`limits` False: with
    no tier's rate limits, so that the cost of limits is measured side by side)."""
    port = free_port()
    env = stack.env() | {"LORAPLANE_HTTP_PORT": str(port), "PYTHONPATH": str(tree)}
    if not limits:
        env |= dict.fromkeys(RATE_VARS, "0")
    where = subprocess.run([sys.executable, "-c", "import dataplane; print(dataplane.__file__)"], env=env, cwd=tree,
                           check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert where.startswith(str(tree)), f"the before data plane would run {where}"
    with open(log_dir / "dataplane-before.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane.app"], env=env, cwd=tree, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(url + "/healthz"), 60, "the before data plane", proc)
    return proc, url


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The issue 13 figures: after vs before, as a change in per cent (positive: worse)."""
    out: dict[str, Any] = {}
    for name, b, a in (
        ("dp_cpu_us_per_request_median", before["dp_cpu_us_per_request_median"], after["dp_cpu_us_per_request_median"]),
        ("added_p50_ms", before["added_latency_concurrency_1"]["added_p50_ms"],
         after["added_latency_concurrency_1"]["added_p50_ms"]),
        ("added_p99_ms", before["added_latency_concurrency_1"]["added_p99_ms"],
         after["added_latency_concurrency_1"]["added_p99_ms"]),
    ):  # fmt: skip
        out[name] = {"before": b, "after": a, "change_pct": round((a / b - 1) * 100, 1) if b else None}
    return out


def report(name: str, figures: dict[str, Any]) -> None:
    lat = figures["added_latency_concurrency_1"]
    print(f"{name}: concurrency 1: direct p50 {lat['direct_p50_ms']} ms, through p50 {lat['through_p50_ms']} ms")
    print(f"  added by the data plane: p50 {lat['added_p50_ms']} ms, p99 {lat['added_p99_ms']} ms")
    for t, d in zip(figures["throughput_through"], figures["throughput_direct"], strict=True):
        cpu = t["dp_cpu_us_per_request"]
        print(f"  c={t['concurrency']:3}: through {t['rps']:6} req/s p99 {t['p99_ms']:6} ms ({cpu} us CPU/req)"
              f" | direct {d['rps']:6} req/s p99 {d['p99_ms']:6} ms")  # fmt: skip
    print(f"  CPU per request, median of all rounds: {figures['dp_cpu_us_per_request_median']} us")
    print(f"  max req/s at p99 <= {SLO_P99_MS} ms through the data plane: {figures['max_rps_at_p99_le_10ms']}")
    print(f"  SSE per chunk: {figures['sse_per_chunk']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000, help="per path, at concurrency 1")
    ap.add_argument("--seconds", type=float, default=3.0, help="per concurrency level")
    ap.add_argument("--rounds", type=int, default=2, help="concurrency sweeps per data plane")
    ap.add_argument("--before", default=BEFORE, help="a revision whose data plane runs next to this one ('': none)")
    ap.add_argument("--before-without-limits", action="store_true",
                    help="the before data plane without rate limits (--before HEAD: limits on vs off)")  # fmt: skip
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        sim = subprocess.Popen([sys.executable, "-m", "tests.vllmsim", "--port", str(sim_port)], cwd=ROOT)
        wait_until(lambda: http_ok(sim_url + "/health"), 30, "the simulator", sim)
        stack = Stack(StackConfig(data_dir=Path(tmp), http_port=free_port(), grpc_port=free_port(),
                                  vllm_port=sim_port, log_dir=Path(tmp) / "logs",
                                  extra_env=(("LORAPLANE_VLLM_URL", sim_url),
                                             ("LORAPLANE_LOG_LEVEL", "WARNING"), *LIMITS_ON)))  # fmt: skip
        before: subprocess.Popen[bytes] | None = None
        try:
            stack.start()
            planes = [Plane("after", stack.http_url, stack.procs["dataplane"].pid)]
            if args.before:
                tree = before_tree(args.before, Path(tmp))
                before, url = start_before(stack, tree, Path(tmp) / "logs", limits=not args.before_without_limits)
                planes.insert(0, Plane("before", url, before.pid))
            key = stack.operator().create_tenant("bench", tenant_pb2.TIER_RESERVED).api_key
            import httpx

            adapter = safetensors_bytes(lora_tensors(rank=8))
            r = httpx.post(stack.http_url + "/v1/adapters/upload", headers={"Authorization": f"Bearer {key}"},
                           data={"name": "hot", "base_model": "tiny-llama"},
                           files={"file": ("adapter_model.safetensors", adapter)})  # fmt: skip
            r.raise_for_status()
            measured = asyncio.run(measure(args, sim_url, planes, key))
        finally:
            if before is not None:
                before.terminate()
                before.wait()
            stack.stop()
            sim.terminate()
            sim.wait()
    result: dict[str, Any] = {
        "benchmark": "hotpath",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; load generator, simulator and data plane share them",
        "side_by_side": True,
        **measured["after"],  # this tree's figures, where they always were
    }
    if "before" in measured:
        result |= {"before_rev": args.before, "before": measured["before"]}
        result["before_after"] = compare(measured["before"], measured["after"])
    out = ROOT / "bench" / "results" / "hotpath.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"hot path, one run ({result['date']}), {result['machine']}")
    for name, figures in measured.items():
        report(name if name == "after" else f"{name} ({args.before})", figures)
    if "before_after" in result:
        print(f"  before -> after: {result['before_after']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
