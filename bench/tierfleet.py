"""The stack `bench/tiers.py` measures, and what it does with it: three simulated workers (or two
real vLLM workers) behind the embedded stack, more data planes beside its own, operator and tenant
verbs, and the evidence taken outside the data plane (the control plane's log, the routing table,
the requests each simulator received, the engines' and the fair queue's metrics)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from loadgen import CpuMeter

from loraplane import tinymodel
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import admin_pb2, admin_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from loraplane.limits import RATE_VARS
from loraplane.stack import BASE_MODEL, Stack, StackConfig, WorkerSpec, http_ok, vllm_args, wait_until
from tests.support import free_port, lora_tensors, safetensors_bytes, start_simulator, with_metadata

ROOT = Path(__file__).resolve().parent.parent

WORKERS = (f"embedded-{BASE_MODEL}", f"embedded-{BASE_MODEL}-2", f"embedded-{BASE_MODEL}-3")
SEQS = 4  # each engine's --max-num-seqs, and what the fair queue's data plane is told a worker takes
SLOTS = 4  # LoRA slots a simulator holds (--max-loras), and the catalog's max_adapters_per_worker
TOKENS = 16  # a request's completion tokens
TOKENS_PER_S = 64.0  # the simulators' generation speed: a request takes TOKENS / this = 250 ms
A_BOUND = 400  # A's client: most requests in flight; an arrival beyond it is not sent
B_BOUND = 64
QUEUE_TIMEOUT_S = 5.0  # LORAPLANE_QUEUE_TIMEOUT_S here (default 30 s): A's overflow is refused within a phase
TIERS = {"shared": tenant_pb2.TIER_SHARED, "reserved": tenant_pb2.TIER_RESERVED,
         "dedicated": tenant_pb2.TIER_DEDICATED}  # fmt: skip
LOADED = re.compile(r"loaded (\S+) on (\S+) in (\d+) ms")
EVICTED = re.compile(r"evicted (\S+) from (\S+)")
UNLIMITED = tuple((name, "0") for name in RATE_VARS)
NO_QUEUE = 1_000_000  # a worker concurrency no request waits for: the fair queue off where agents report one
OVERCOMMIT = 2  # real vLLM: a data plane that lets each worker have this many times --max-num-seqs in flight


@dataclass(frozen=True)
class Tenant:
    name: str
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Fleet:
    """A started stack and what drives it; `engines[i]` is worker `workers[i]`'s engine."""

    stack: Stack
    workers: list[str]
    engines: list[str]
    sims: list[subprocess.Popen[bytes]]
    planes: dict[str, tuple[subprocess.Popen[bytes], str]] = field(default_factory=dict)  # more data planes: URL
    prompts: list[str] = field(default_factory=list)  # real vLLM: the messages sent (else each its own marker)
    extra: dict[str, object] = field(default_factory=dict)  # in every request's body
    channel: grpc.aio.Channel | None = None
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.stack.http_url

    @property
    def operator(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.stack.secrets['operator_token']}"),)

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    def tenant_service(self) -> tenant_pb2_grpc.TenantServiceStub:
        return tenant_pb2_grpc.TenantServiceStub(self.channel)

    def meter(self) -> CpuMeter:
        procs = self.stack.procs
        groups = {
            "dataplane": [procs["dataplane"].pid],
            "controlplane": [procs["controlplane"].pid],
            "agents_and_engines": [procs[a].pid for a in self.stack.agents],  # real vLLM: the agents' children
            "simulators": [s.pid for s in self.sims],
            "redis": [procs["redis"].pid] if "redis" in procs else [],
            "load_generator": [os.getpid()],
        }
        for name, (proc, _) in self.planes.items():
            groups[f"dataplane_{name}"] = [proc.pid]
        return CpuMeter(groups, alone=frozenset({"load_generator"}))  # its children are the others

    def content(self, marker: str, n: int) -> str:
        """Request n's message: its marker and number, or one of `prompts`."""
        return self.prompts[n % len(self.prompts)] if self.prompts else f"{marker}{n}"

    def log_size(self) -> int:
        return self._cp_log().stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self._cp_log(), "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _cp_log(self) -> Path:
        assert self.stack.config.log_dir is not None
        return self.stack.config.log_dir / "controlplane.log"


# the stack


def start_fleet(tmp: Path) -> Fleet:
    """Three simulated workers, the stack with its fair-queue data plane, and a second data plane
    with the fair queue off. The catalog says what the simulators hold (SLOTS LoRA slots)."""
    model_dir = tinymodel.build(tmp / "data" / "models" / BASE_MODEL)
    catalog = tmp / "catalog.json"
    Catalog.write(catalog, [{"name": BASE_MODEL, "kind": "chat", "path": str(model_dir), "lora": True,
                             "max_rank": 64, "max_adapters_per_worker": SLOTS}])  # fmt: skip
    sims, ports = [], []
    fleet: Fleet | None = None
    try:
        for _ in WORKERS:
            sim, _, port = start_simulator(BASE_MODEL, "--max-loras", str(SLOTS), "--max-num-seqs", str(SEQS),
                                           "--tokens-per-s", str(TOKENS_PER_S))  # fmt: skip
            sims.append(sim)
            ports.append(port)
        engines = [f"http://127.0.0.1:{p}" for p in ports]
        extra = tuple(
            WorkerSpec(p, env=(("LORAPLANE_VLLM_URL", u),)) for p, u in zip(ports[1:], engines[1:], strict=True)
        )
        env = (*UNLIMITED, ("LORAPLANE_VLLM_URL", engines[0]), ("LORAPLANE_CATALOG", str(catalog)),
               ("LORAPLANE_WORKER_CONCURRENCY", str(SEQS)), ("LORAPLANE_DATAPLANE_REPLICAS", "1"),
               ("LORAPLANE_QUEUE_TIMEOUT_S", str(QUEUE_TIMEOUT_S)))  # fmt: skip
        config = StackConfig(data_dir=tmp / "data", http_port=free_port(), grpc_port=free_port(), vllm_port=ports[0],
                             log_dir=tmp / "logs", extra_env=env, extra_workers=extra)  # fmt: skip
        stack = Stack(config)
        fleet = Fleet(stack, list(WORKERS), engines, sims)
        stack.start()
        start_plane(fleet, tmp, "fifo", 0)  # no capacity known: the agents report none here
        return fleet
    except BaseException:
        if fleet is not None:
            stop_fleet(fleet)
        for sim in sims:
            sim.kill()
            sim.wait()
        raise


def start_plane(fleet: Fleet, tmp: Path, name: str, concurrency: int) -> None:
    """One more data plane on the same stack, told each worker's concurrency (0: the agents' own;
    NO_QUEUE: one so large that no request ever waits). Used one at a time, each told it is alone."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = fleet.stack.env() | {"LORAPLANE_HTTP_PORT": str(port), "LORAPLANE_WORKER_CONCURRENCY": str(concurrency)}
    with open(tmp / "logs" / f"dataplane-{name}.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane.app"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    fleet.planes[name] = (proc, url)
    wait_until(lambda: http_ok(url + "/readyz"), 60, f"data plane {name}", proc)


def stop_fleet(fleet: Fleet) -> None:
    for proc, _ in fleet.planes.values():
        if proc.poll() is not None:
            continue
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    fleet.stack.stop()
    for sim in fleet.sims:
        if sim.poll() is None:
            sim.kill()
            sim.wait()


def start_real(tmp: Path) -> Fleet:
    """Two real vLLM workers (the embedded stack's own, CPU build) with --max-num-seqs SEQS."""
    args = " ".join([*vllm_args(), "--max-num-seqs", str(SEQS)])
    second = WorkerSpec(free_port())
    env = (*UNLIMITED, ("LORAPLANE_VLLM_ARGS", args), ("VLLM_CPU_KVCACHE_SPACE", "1"),
           ("LORAPLANE_WORKER_CONCURRENCY", str(SEQS)), ("LORAPLANE_DATAPLANE_REPLICAS", "1"),
           ("LORAPLANE_QUEUE_TIMEOUT_S", str(QUEUE_TIMEOUT_S)))  # fmt: skip
    config = StackConfig(data_dir=tmp / "data", http_port=free_port(), grpc_port=free_port(), vllm_port=free_port(),
                         log_dir=tmp / "logs", extra_env=env, extra_workers=(second,))  # fmt: skip
    stack = Stack(config)
    fleet = Fleet(stack, list(WORKERS[:2]), [f"http://127.0.0.1:{p}" for p in (config.vllm_port, second.vllm_port)],
                  [], extra={"ignore_eos": True})  # fmt: skip
    try:
        stack.start(timeout=900)
        start_plane(fleet, tmp, "fifo", NO_QUEUE)  # the agents report their vLLM's --max-num-seqs
        start_plane(fleet, tmp, "overcommit", OVERCOMMIT * SEQS)
    except BaseException:
        stop_fleet(fleet)
        raise
    return fleet


async def open_clients(fleet: Fleet) -> None:
    """Separate connection pools per side, so that A's requests never queue B's in the client."""
    fleet.channel = grpc.aio.insecure_channel(fleet.stack.grpc_addr)
    timeout = aiohttp.ClientTimeout(total=180)
    for name, limit in (("a", A_BOUND + 16), ("b", B_BOUND + 16), ("ops", 64)):
        # Idle connections dropped before the data plane's (uvicorn's 5 s): else one it closes may be reused.
        connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=3)
        fleet.sessions[name] = aiohttp.ClientSession(connector=connector, timeout=timeout)


async def close_clients(fleet: Fleet) -> None:
    for session in fleet.sessions.values():
        await session.close()
    if fleet.channel is not None:
        await fleet.channel.close()


# operator and tenant verbs


async def tenant(fleet: Fleet, name: str, tier: str) -> Tenant:
    created = await asyncio.to_thread(fleet.stack.operator().create_tenant, name, TIERS[tier])
    return Tenant(name, created.tenant.id, created.api_key)


async def upload(fleet: Fleet, t: Tenant, name: str) -> str:
    data = with_metadata(safetensors_bytes(lora_tensors(rank=8)), {"bench": f"{t.name}/{name}"})
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("base_model", BASE_MODEL)
    form.add_field("file", data, filename="adapter_model.safetensors")
    async with fleet.sessions["ops"].post(fleet.url + "/v1/adapters/upload", data=form, headers=t.headers) as r:
        body = await r.json()
        if r.status not in (200, 201):
            raise RuntimeError(f"upload {t.name}/{name}: {r.status} {body}")
        adapter_id: str = body["id"]
        return adapter_id


async def delete(fleet: Fleet, t: Tenant, adapter_id: str) -> int:
    async with fleet.sessions["ops"].delete(f"{fleet.url}/v1/adapters/{adapter_id}", headers=t.headers) as r:
        await r.read()
        return r.status


async def pin(fleet: Fleet, t: Tenant, adapter_id: str, on: bool = True) -> dict[str, Any]:
    method = fleet.sessions["ops"].post if on else fleet.sessions["ops"].delete
    async with method(f"{fleet.url}/v1/adapters/{adapter_id}/pin", headers=t.headers) as r:
        body: dict[str, Any] = await r.json()
        if r.status != 200:
            raise RuntimeError(f"pin {adapter_id}: {r.status} {body}")
        return body


async def assign(fleet: Fleet, worker_id: str, t: Tenant) -> list[str]:
    request = admin_pb2.AssignWorkerRequest(worker_id=worker_id, tenant_id=t.id)
    resp = await fleet.admin().AssignWorker(request, metadata=fleet.operator, timeout=60)
    await routed(fleet, worker_id, t.id)
    return list(resp.evicted_adapter_ids)


async def unassign(fleet: Fleet, worker_id: str) -> None:
    request = admin_pb2.UnassignWorkerRequest(worker_id=worker_id)
    await fleet.admin().UnassignWorker(request, metadata=fleet.operator, timeout=60)
    await routed(fleet, worker_id, "")


async def table(fleet: Fleet) -> admin_pb2.GetRoutingTableResponse:
    resp: admin_pb2.GetRoutingTableResponse = await fleet.admin().GetRoutingTable(
        admin_pb2.GetRoutingTableRequest(), metadata=fleet.operator, timeout=10
    )
    return resp


async def routed(fleet: Fleet, worker_id: str, pool: str) -> None:
    """Until the routing table shows the worker in `pool`, and a moment for data planes to apply it."""
    deadline = time.monotonic() + 30
    while not any(w.worker_id == worker_id and w.pool_tenant_id == pool for w in (await table(fleet)).workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{worker_id} is not in pool {pool!r} in the routing table")
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


async def spill_over(fleet: Fleet, t: Tenant) -> bool:
    resp = await fleet.tenant_service().ListTenants(tenant_pb2.ListTenantsRequest(), metadata=fleet.operator,
                                                    timeout=10)  # fmt: skip
    return bool(next(x for x in resp.tenants if x.id == t.id).spill_over)


async def engine_load(fleet: Fleet) -> tuple[float, float]:
    """Requests running and waiting on all engines (vLLM's and the simulators' /metrics)."""
    running = waiting = 0.0
    for url in fleet.engines:
        async with fleet.sessions["ops"].get(url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("vllm:num_requests_running"):
                    running += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:num_requests_waiting"):
                    waiting += float(line.rsplit(" ", 1)[1])
    return running, waiting


async def drained(fleet: Fleet, within_s: float = 60) -> None:
    """Until no engine has a request running or waiting."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if sum(await engine_load(fleet)) == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the engines still have requests after {within_s:.0f}s")


async def occupancy(fleet: Fleet, stop: asyncio.Event, every_s: float = 0.2) -> dict[str, float]:
    """The engines' requests running and waiting, sampled until `stop`: means, and the slots."""
    samples = []
    while not stop.is_set():
        samples.append(await engine_load(fleet))
        await asyncio.sleep(every_s)
    n = max(1, len(samples))
    return {"slots": SEQS * len(fleet.engines), "running_mean": round(sum(r for r, _ in samples) / n, 2),
            "waiting_in_engines_mean": round(sum(w for _, w in samples) / n, 2), "samples": len(samples)}  # fmt: skip


async def queue_waits(fleet: Fleet, url: str) -> dict[str, dict[str, float]]:
    """The data plane's loraplane_queue_wait_seconds by tier: count, sum, and its buckets ("le")."""
    out: dict[str, dict[str, float]] = {}
    async with fleet.sessions["ops"].get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if not line.startswith("loraplane_queue_wait_seconds_"):
                continue
            series, _, value = line.rpartition(" ")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
            kind = series.removeprefix("loraplane_queue_wait_seconds_").partition("{")[0]
            key = f"le {labels['le']}" if kind == "bucket" else kind
            out.setdefault(labels.get("tier", ""), {})[key] = float(value)
    return out


def waited(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per tier, between two scrapes: requests that went through the fair queue's waiting path,
    their mean wait, and how many waited longer than 5, 25 and 100 ms."""
    out = {}
    for tier, now in after.items():
        then = before.get(tier, {})
        delta = {k: v - then.get(k, 0) for k, v in now.items()}
        n = delta.get("count", 0)
        if n:
            out[tier] = {"waited": int(n), "mean_wait_ms": round(delta.get("sum", 0) / n * 1000, 1)} | {
                f"over_{ms}ms": int(n - delta.get(f"le {le}", 0))
                for ms, le in ((5, "0.005"), (25, "0.025"), (100, "0.1"))
            }
    return out


# evidence outside the data plane


class Sightings:
    """Which simulator each request reached: each simulator's last request bodies (`/sim/state`)
    polled, a request known by its message (a unique marker)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.where: dict[str, set[str]] = {}  # marker -> workers

    async def watch(self, stop: asyncio.Event, every_s: float = 0.15) -> None:
        session = self.fleet.sessions["ops"]
        while not stop.is_set():
            for worker, url in zip(self.fleet.workers, self.fleet.engines, strict=True):
                async with session.get(url + "/sim/state") as r:
                    state = await r.json()
                for body in state["requests"]:
                    messages = body.get("messages") or [{}]
                    self.where.setdefault(str(messages[0].get("content")), set()).add(worker)
            await asyncio.sleep(every_s)


class TableSamples:
    """The routing table, sampled: each sample's residents and pools by worker."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.samples: list[tuple[dict[str, set[str]], dict[str, str]]] = []

    async def watch(self, stop: asyncio.Event, every_s: float = 0.25) -> None:
        while not stop.is_set():
            t = await table(self.fleet)
            self.samples.append(({w.worker_id: set(w.adapter_ids) for w in t.workers if w.healthy},
                                 {w.worker_id: w.pool_tenant_id for w in t.workers}))  # fmt: skip
            await asyncio.sleep(every_s)


def loads_in(log: str) -> list[tuple[str, str]]:
    """(adapter, worker) of each load the control plane logged."""
    return [(m.group(1), m.group(2)) for m in LOADED.finditer(log)]


def copies(log: str, adapters: list[str], at_start: dict[str, set[str]]) -> dict[str, int]:
    """The adapters' loads and evictions in the control plane's log, in order, from the holders
    they had at its start: loads, cold loads (no copy resident then), evictions of a copy, and
    the fewest copies any of them had."""
    holders = {a: set(at_start.get(a, set())) for a in adapters}
    out = {"loads": 0, "cold_loads": 0, "evictions": 0, "fewest_copies": min(len(h) for h in holders.values())}
    for m in re.finditer(f"{LOADED.pattern}|{EVICTED.pattern}", log):
        loaded, evicted = (m.group(1), m.group(2)), (m.group(4), m.group(5))
        adapter, worker = loaded if loaded[0] else evicted
        if adapter not in holders:
            continue
        if loaded[0]:
            out["loads"] += 1
            out["cold_loads"] += not holders[adapter]
            holders[adapter].add(worker)
        elif worker in holders[adapter]:
            out["evictions"] += 1
            holders[adapter].discard(worker)
            out["fewest_copies"] = min(out["fewest_copies"], len(holders[adapter]))
    return out
