"""Cold first token by adapter size and by tier (issue 19, "Measure"): request -> first token through
the data plane for adapters of ~1, 50, 200 and 500 MB whose shapes are real for a production
catalog model (Llama 3.1 8B Instruct, its architecture from deploy/catalog.json), side by side in
one run, for an adapter that is

  - `store`: in the artifact store only, the node cache empty (the first request pays placement,
    the full fetch from the control plane's artifact stream, sha256, the adapter directory, the
    engine's load, the routing update),
  - `node_disk`: on the node's disk, not loaded (after a `ForceEvictAdapter`, as after an eviction;
    a prefetch leaves it in the same state): placement and the engine's load, no fetch,
  - `resident`: loaded in the engine (the baseline: routing and proxying only).

The worker is the vLLM simulator (`tests/vllmsim.py`) started by the agent as its engine
(LORAPLANE_VLLM_COMMAND): vLLM's CPU build here cannot hold an 8B base model, and the simulator
never reads the weights. Its load time is synthetic (`--sim-load-ms-per-mb`, default 0, plus its
fixed 5 ms), so these numbers measure loraplane's path — upload, fetch, verify, node cache,
commands, placement, routing, proxy — and not vLLM's weight loading. The GPU-slot and host-memory
tiers on a real vLLM are measured by bench/hosttier.py.

Adapters are uploaded through the data plane's `POST /v1/adapters/upload` (the real upload path),
each a valid PEFT safetensors file for the model, float32 (PEFT's dtype for adapters trained with
fp32 master weights); the control plane validates every shape against the architecture. Automatic
prefetch is off (LORAPLANE_PREFETCH_WORKERS=0), so an upload leaves the node cache empty. Each
timed request's stretch of the control plane's and the agent's logs is read afterwards: the load
command's time (agent: fetch + verify + link + engine load) and the fetch's, and a check that the
request hit the tier it was meant to (a fetch for `store`, a load without fetch for `node_disk`,
no load for `resident`).

This machine is a VM whose host takes free memory back: writing a fresh page cache page here is
~10x slower than reusing one just freed, so the bench touches and frees the memory a store request's
fetch will write just before it (`preback`); `--no-preback` measures without (the 500 MB fetch then
takes ~2x as long once the run has written ~1 GB).

    .venv/bin/python bench/coldsize.py [--n 12] [--n-500 8] [--repeat 20] [--sim-load-ms-per-mb 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hotload import summary  # noqa: E402

from loraplane.catalog import Architecture  # noqa: E402
from loraplane.controlplane.v1 import tenant_pb2  # noqa: E402
from loraplane.operator import Operator  # noqa: E402
from loraplane.stack import Stack, StackConfig  # noqa: E402
from tests.support import free_port  # noqa: E402

MODEL = "llama-3.1-8b-instruct"
WORKER = f"sim-{MODEL}"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE, DTYPE_BYTES = "F32", 4
TIERS = ("store", "node_disk", "resident")
TARGET_S = 2.0  # issue 19: a hot-load in under 2 s at every size


@dataclass(frozen=True)
class Size:
    label: str
    rank: int
    modules: tuple[str, ...]

    def tensors(self, arch: Architecture) -> list[tuple[str, tuple[int, int]]]:
        """PEFT's tensors for this rank and these modules on every decoder layer: (name, shape)."""
        out = []
        layers = arch.layer_modules()
        for layer in range(arch.num_hidden_layers):
            for m in self.modules:
                parent, fan_in, fan_out = layers[m]
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
                out.append((f"{prefix}.lora_A.weight", (self.rank, fan_in)))
                out.append((f"{prefix}.lora_B.weight", (fan_out, self.rank)))
        return out

    def weight_bytes(self, arch: Architecture) -> int:
        return sum(math.prod(shape) * DTYPE_BYTES for _, shape in self.tensors(arch))

    def shapes(self, arch: Architecture) -> dict[str, dict[str, list[int]]]:
        layers = arch.layer_modules()
        return {m: {"lora_A": [self.rank, layers[m][1]], "lora_B": [layers[m][2], self.rank]} for m in self.modules}


# On Llama 3.1 8B (hidden 4096, intermediate 14336, 32 layers, 8 KV heads of 128), float32: rank r
# on every linear layer is 10 MiB (10.49 MB) per unit of rank; rank 1 on q_proj alone is 1 MiB.
SIZES = (
    Size("1MB", 1, ("q_proj",)),
    Size("50MB", 5, ALL_LINEAR),
    Size("200MB", 19, ALL_LINEAR),
    Size("500MB", 47, ALL_LINEAR),  # 492.8 MB: the largest rank under the 500 MB (500e6 bytes) limit
)


def arch_config() -> dict[str, Any]:
    """The catalog's architecture of MODEL, as its config.json would say."""
    models = json.loads((ROOT / "deploy" / "catalog.json").read_text())["models"]
    entry = next(m for m in models if m["name"] == MODEL)
    return dict(entry["architecture"])


POOL = (np.random.default_rng(0).standard_normal(1 << 21) * 0.01).astype(np.float32).tobytes()  # 8 MiB


def write_adapter(path: Path, arch: Architecture, size: Size, seed: int) -> tuple[int, str]:
    """A valid PEFT safetensors file (the weights: small normal floats, from a pool at a
    seed-dependent offset), written in pieces; its bytes and sha256."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "bench": f"coldsize {size.label} {seed}"}}
    offset = 0
    for name, shape in size.tensors(arch):
        n = math.prod(shape) * DTYPE_BYTES
        header[name] = {"dtype": DTYPE, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data
    digest = hashlib.sha256()
    start = (seed * 4099 * DTYPE_BYTES) % len(POOL)
    with open(path, "wb") as f:
        for piece in (struct.pack("<Q", len(raw)), raw):
            f.write(piece)
            digest.update(piece)
        left = offset
        while left:
            piece = POOL[start : start + left]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
            start = 0
    return 8 + len(raw) + offset, digest.hexdigest()


def first_token_s(client: httpx.Client, model: str) -> float:
    """Request -> the first streamed event carrying generated text."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: no token")


LOADED = re.compile(r"loaded (\S+) on \S+ in (\d+) ms")
FETCHED = re.compile(r"fetched artifact ([0-9a-f]{64}): (\d+) bytes in ([0-9.]+)s")


class Logs:
    """What the control plane and the agent logged during each timed request."""

    def __init__(self, log_dir: Path) -> None:
        self.files = [log_dir / "controlplane.log", log_dir / "agent.log"]

    def mark(self) -> list[int]:
        return [f.stat().st_size if f.exists() else 0 for f in self.files]

    def since(self, marks: list[int], until: list[int] | None = None) -> str:
        text = []
        for i, f in enumerate(self.files):
            with open(f, "rb") as fh:
                fh.seek(marks[i])
                end = until[i] if until else None
                text.append(fh.read(None if end is None else end - marks[i]).decode(errors="replace"))
        return "\n".join(text)


@dataclass
class Sample:
    size: str
    tier: str
    adapter_id: str
    sha256: str
    seconds: float
    marks: list[int]
    cpu_s: dict[str, float]  # CPU seconds each component used during the request
    load_ms: float | None = None  # the load command (agent: fetch + verify + link + engine load)
    fetch_s: float | None = None  # the fetch from the control plane into the node cache (+ sha256)
    tier_ok: bool = True


@dataclass
class Adapter:
    size: Size
    index: int
    id: str
    model: str
    sha256: str
    bytes: int


def cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}


def timed(
    client: httpx.Client, logs: Logs, a: Adapter, tier: str, samples: list[Sample], procs: dict[str, psutil.Process]
) -> None:
    marks, before = logs.mark(), cpu_s(procs)
    took = first_token_s(client, a.model)
    used = {name: round(t - before[name], 3) for name, t in cpu_s(procs).items()}
    samples.append(Sample(a.size.label, tier, a.id, a.sha256, took, marks, used))


PREBACK = (
    "before each store request the bench touched and freed 1.25x the adapter's bytes of memory, so the agent's page "
    "cache writes run at the rate of a node whose RAM is its own (this VM's host takes free memory back: see preback)"
)


def preback(n: int) -> None:
    """Touch `n` bytes of memory and free them, just before a store request. This machine is a VM
    whose free memory the host takes back (free page reporting): the kernel then fills a fresh
    page cache page at ~350 MB/s where it fills a page it freed a moment ago at ~4 GB/s
    (measured here writing 500 MB files), and the agent's writes of a fetched blob into the node
    cache ran 2x slower once the run had written ~1 GB — a property of this VM, not of the path.
    A node whose RAM is its own fills page cache at the fast rate; `--no-preback` shows the other."""
    scratch = np.ones(n, np.uint8)
    del scratch


def attribute(samples: list[Sample], logs: Logs) -> None:
    """Each sample's load and fetch times from the logs written until the next sample began
    (evictions and untimed requests between them load nothing they could be mistaken for)."""
    for i, s in enumerate(samples):
        text = logs.since(s.marks, samples[i + 1].marks if i + 1 < len(samples) else None)
        loads = [int(m.group(2)) for m in LOADED.finditer(text) if m.group(1) == s.adapter_id]
        fetches = [float(m.group(3)) for m in FETCHED.finditer(text) if m.group(1) == s.sha256]
        s.load_ms = float(loads[0]) if loads else None
        s.fetch_s = fetches[0] if fetches else None
        s.tier_ok = {"store": bool(loads and fetches), "node_disk": bool(loads and not fetches),
                     "resident": not loads and not fetches}[s.tier]  # fmt: skip


class Busy:
    """The machine's CPU seconds over a stretch, split: this run's processes, kernel threads (the
    writeback of this run's files among them), other processes (this machine is shared), and what
    no living process accounts for (interrupts, processes that came and went)."""

    def __init__(self, ours: list[psutil.Process]) -> None:
        self.ours = {p.pid for p in ours}
        self.started, self.load = time.monotonic(), os.getloadavg()[0]
        self.machine, self.procs = self._machine(), self._procs()

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))

    @staticmethod
    def _procs() -> dict[int, tuple[str, float]]:
        out = {}
        for p in psutil.process_iter(["ppid", "cpu_times"]):
            c = p.info["cpu_times"]
            if c is not None:
                kernel = p.pid == 2 or p.info["ppid"] == 2
                out[p.pid] = ("kernel" if kernel else "process", float(c.user + c.system))
        return out

    def done(self) -> dict[str, object]:
        wall = time.monotonic() - self.started
        machine, now = self._machine() - self.machine, self._procs()
        split = {"this_run": 0.0, "kernel_threads": 0.0, "other_processes": 0.0}
        for pid, (kind, cpu) in now.items():
            used = cpu - self.procs.get(pid, (kind, 0.0))[1]
            who = "this_run" if pid in self.ours else "kernel_threads" if kind == "kernel" else "other_processes"
            split[who] += used
        rest = machine - sum(split.values())
        return {"wall_s": round(wall, 1), "cores": float(psutil.cpu_count() or 0), "machine_cpu_s": round(machine, 1),
                **{f"{k}_cpu_s": round(v, 1) for k, v in split.items()}, "unaccounted_cpu_s": round(rest, 1),
                "load_average_1m_before_after": [round(self.load, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip


def evict(op: Operator, a: Adapter) -> None:
    """Out of the engine, its bytes left on the node; then the routing table's change has reached
    the data plane (it follows Redis pub/sub: milliseconds)."""
    op.force_evict(a.id)
    deadline = time.monotonic() + 10
    while any(a.id in w.adapter_ids for w in op.routing_table().workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{a.id} still resident after its eviction")
        time.sleep(0.02)
    time.sleep(0.2)


def cell(samples: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = dict(summary([s.seconds for s in samples]))
    loads = [s.load_ms for s in samples if s.load_ms is not None]
    fetches = [s.fetch_s for s in samples if s.fetch_s is not None]
    if loads:
        out["load_command_p50_ms"] = round(float(np.median(loads)), 1)
    if fetches:
        out["fetch_p50_ms"] = round(float(np.median(fetches)) * 1000, 1)
    out["meets_2s_target_at_p99"] = out["p99_ms"] < TARGET_S * 1000
    for name in samples[0].cpu_s:
        out[f"cpu_p50_ms_{name}"] = round(float(np.median([s.cpu_s[name] for s in samples])) * 1000, 1)
    out["tier_mismatches"] = sum(not s.tier_ok for s in samples)
    out["runs_ms"] = [round(s.seconds * 1000, 1) for s in samples]  # in the order they ran
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="cold (store) requests per size below 500 MB: that many adapters")
    ap.add_argument("--n-500", type=int, default=8, help="cold (store) requests at 500 MB")
    ap.add_argument("--repeat", type=int, default=20, help="node-disk and resident requests per size")
    ap.add_argument("--no-preback", action="store_true", help="no memory touched before each store request (see "
                    "preback)")  # fmt: skip
    ap.add_argument("--sim-load-ms-per-mb", type=float, default=0.0, help="the simulator's synthetic load time")
    args = ap.parse_args()
    begun = time.monotonic()
    cfg = arch_config()
    arch = Architecture.from_model_config(cfg)
    counts = {s.label: (args.n_500 if s.label == "500MB" else args.n) for s in SIZES}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "models" / MODEL
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(cfg))
        log_dir = tmp / "logs"
        sim = f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'} --load-ms-per-mb {args.sim_load_ms_per_mb}"
        stack = Stack(StackConfig(data_dir=tmp / "stack", http_port=free_port(), grpc_port=free_port(),
                                  vllm_port=free_port(), log_dir=log_dir, lora_models=((MODEL, model_dir),),
                                  extra_env=(("LORAPLANE_VLLM_COMMAND", sim), ("LORAPLANE_BASE_MODEL", MODEL),
                                             ("LORAPLANE_WORKER_ID", WORKER),
                                             # an upload leaves the node cache empty: `store` is cold
                                             ("LORAPLANE_PREFETCH_WORKERS", "0"),
                                             # this back-to-back series is not throttled by the load budget
                                             ("LORAPLANE_MAX_LOADS_PER_S", "1000"))))  # fmt: skip
        stack.start()
        try:
            op = stack.operator()
            key = op.create_tenant("bench", tenant_pb2.TIER_RESERVED).api_key
            client = httpx.Client(base_url=stack.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
            # upload: every adapter through the data plane, its file streamed from disk
            adapters: dict[str, list[Adapter]] = {s.label: [] for s in SIZES}
            uploads: dict[str, list[tuple[int, float]]] = {s.label: [] for s in SIZES}
            warm: list[Adapter] = []
            for size in SIZES:
                for i in range(counts[size.label] + (1 if size.label == "1MB" else 0)):
                    path = tmp / "adapter_model.safetensors"
                    n, sha = write_adapter(path, arch, size, seed=len(warm) + sum(map(len, adapters.values())))
                    started = time.perf_counter()
                    with open(path, "rb") as f:
                        r = client.post("/v1/adapters/upload", data={"name": f"s{size.label}-{i}", "base_model": MODEL},
                                        files={"file": ("adapter_model.safetensors", f)})  # fmt: skip
                    took = time.perf_counter() - started
                    path.unlink()
                    r.raise_for_status()
                    got = r.json()
                    assert got["status"] == "ready" and got["sha256"] == sha and got["size_bytes"] == n, got
                    a = Adapter(size, i, got["id"], got["model"], sha, n)
                    if size.label == "1MB" and i == counts["1MB"]:
                        warm.append(a)  # one more, loaded untimed first: the path's first use
                    else:
                        adapters[size.label].append(a)
                        uploads[size.label].append((n, took))
            uploaded_s = time.monotonic() - begun
            os.sync()  # the uploads' dirty pages written back before anything is timed
            logs = Logs(log_dir)
            procs = {n: psutil.Process(stack.procs[n].pid) for n in ("dataplane", "controlplane", "agent")}
            tops = [psutil.Process(p.pid) for p in stack.procs.values()]
            ours = [psutil.Process(), *tops, *(c for p in tops for c in p.children(recursive=True))]
            busy = Busy(ours)
            first_token_s(client, MODEL)  # the base model: routing warm
            first_token_s(client, warm[0].model)  # one cold load, untimed
            samples: list[Sample] = []
            # store: each adapter's first request; rounds over the sizes, the order rotating
            for r_ in range(max(counts.values())):
                order = [s for s in SIZES if r_ < counts[s.label]]
                for size in order[r_ % len(order) :] + order[: r_ % len(order)]:
                    a = adapters[size.label][r_]
                    if not args.no_preback:
                        preback(int(a.bytes * 1.25))
                    timed(client, logs, a, "store", samples, procs)
            # node disk: evicted (bytes stay in the node cache), then requested
            for r_ in range(args.repeat):
                for size in SIZES:
                    a = adapters[size.label][r_ % counts[size.label]]
                    evict(op, a)
                    timed(client, logs, a, "node_disk", samples, procs)
            # resident: the last ones loaded (4 adapters, 8 slots), requested again
            last = {s.label: adapters[s.label][(args.repeat - 1) % counts[s.label]] for s in SIZES}
            for _ in range(args.repeat):
                for size in SIZES:
                    timed(client, logs, last[size.label], "resident", samples, procs)
            machine = busy.done()
            time.sleep(0.5)  # the last lines into the logs
            attribute(samples, logs)
        finally:
            stack.stop()
    runtime = time.monotonic() - begun
    cells: dict[str, Any] = {}
    for size in SIZES:
        weights = size.weight_bytes(arch)
        file_bytes = adapters[size.label][0].bytes
        mbps = [n / 1e6 / t for n, t in uploads[size.label]]
        cells[size.label] = {
            "file_bytes": file_bytes,
            "file_MB": round(file_bytes / 1e6, 2),
            "rank": size.rank,
            "target_modules": list(size.modules),
            "dtype": "float32",
            "layers": arch.num_hidden_layers,
            "shapes_per_layer": size.shapes(arch),
            "weight_bytes": weights,
            "upload_MB_per_s_p50": round(float(np.median(mbps)), 1),
            **{t: cell([s for s in samples if s.size == size.label and s.tier == t]) for t in TIERS},
        }
    result = {
        "benchmark": "coldsize",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, every process on this machine",
        "side_by_side": True,
        "base_model": {"name": MODEL, "architecture": cfg},
        "engine": f"tests/vllmsim.py as the agent's engine; synthetic load time 5 ms + {args.sim_load_ms_per_mb:g} "
        "ms/MB; it never reads the weights",
        "measures": "request -> first streamed token through the data plane (max_tokens 4); one worker, 8 LoRA "
        "slots; control plane's artifact store on local disk; automatic prefetch off",
        "what_the_tiers_are": {
            "store": "the adapter's first request: placement + fetch from the control plane + sha256 + node cache "
            "+ engine load + routing",
            "node_disk": "after ForceEvictAdapter (bytes left in the node cache): placement + engine load + routing",
            "resident": "loaded in the engine: routing + proxy only",
        },
        "preback": None if args.no_preback else PREBACK,
        "target_s": TARGET_S,
        "n": {"store": counts, "node_disk": args.repeat, "resident": args.repeat},
        "sizes": cells,
        "timed_phases_cpu": machine,
        "setup_and_upload_s": round(uploaded_s, 1),
        "runtime_s": round(runtime, 1),
    }
    out = ROOT / "bench" / "results" / "coldsize.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"request -> first token by size and tier, one run ({result['date']}; {result['engine']}):")
    for label, c in cells.items():
        for t in TIERS:
            s = c[t]
            extra = "".join(f"  {k} {s[k]:7.1f}" for k in ("load_command_p50_ms", "fetch_p50_ms") if k in s)
            print(f"  {label:6} {c['file_MB']:7.1f} MB  {t:9} n={s['n']:2}  p50 {s['p50_ms']:7.1f} ms  "
                  f"p99 {s['p99_ms']:7.1f} ms{extra}  mismatches {s['tier_mismatches']}")  # fmt: skip
    print(f"runtime {runtime:.0f} s; wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
