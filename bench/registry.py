"""Registry and control plane at scale, in one run against a private Redis:

- 100,000 adapters across 10,000 tenants, written through the control plane's own store code:
  Redis memory per adapter (tenants and keys included), and a tenant's list latency, both from
  the store and through the control plane's gRPC `ListAdapters` (the difference is the gRPC
  call's overhead);
- a routing table of 1,000 workers (8 adapters each): time from a worker's change to a data
  plane's in-process table having it (publish, pub/sub, re-read), and that table's memory;
- a placement decision over 1,000 workers: `decide` alone, and with reading the workers.

  .venv/bin/python bench/registry.py [--tenants 10000] [--adapters-per-tenant 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.keys import key_hash, key_prefix, new_api_key, new_id  # noqa: E402
from controlplane.placement import WorkerView, decide  # noqa: E402
from controlplane.store import Store  # noqa: E402
from dataplane import events  # noqa: E402
from dataplane.routing import RoutingTable  # noqa: E402
from loraplane import tinymodel  # noqa: E402
from loraplane.catalog import Catalog  # noqa: E402
from loraplane.controlplane.v1 import adapter_pb2 as apb  # noqa: E402
from loraplane.controlplane.v1 import adapter_pb2_grpc  # noqa: E402
from loraplane.stack import port_open, wait_until  # noqa: E402
from loraplane.state import queries  # noqa: E402
from loraplane.state.records import AdapterRecord, Tenant, WorkerRecord  # noqa: E402
from tests.support import RedisServer, free_port  # noqa: E402

WORKERS = 1000


def ms(xs: list[float]) -> dict[str, float]:
    s = sorted(x * 1000 for x in xs)
    return {"n": len(s), "p50_ms": round(statistics.median(s), 3), "p99_ms": round(s[int(0.99 * (len(s) - 1))], 3)}


async def fill(store: Store, tenants: int, per_tenant: int) -> list[tuple[str, str]]:
    """Tenants with one key each and their adapters; returns (tenant id, api key) pairs."""
    out = []
    sem = asyncio.Semaphore(64)

    async def tenant(i: int) -> None:
        async with sem:
            key = new_api_key()
            t = Tenant(new_id("ten"), f"tenant-{i}", "shared", time.time())
            await store.tenants.create(t, key_hash(key), key_prefix(key))
            out.append((t.id, key))
            for j in range(per_tenant):
                aid = new_id("adp")
                rec = AdapterRecord(
                    id=aid, tenant_id=t.id, name=f"adapter-{j}", base_model="tiny-llama", status="ready",
                    status_reason="", source={"kind": "upload"}, rank=8, target_modules=["q_proj", "v_proj"],
                    lora_alpha=8.0, size_bytes=524_288, sha256=os.urandom(32).hex(), created_at=time.time(),
                    adapter_config='{"r":8,"lora_alpha":8.0,"target_modules":["q_proj","v_proj"],"peft_type":"LORA"}',
                )  # fmt: skip
                await store.create_adapter(rec, max_adapters=1000)

    await asyncio.gather(*(tenant(i) for i in range(tenants)))
    return out


async def routing_change(client: redis.Redis, store: Store, url: str) -> tuple[dict[str, float], float, int]:
    """Publish → applied in another client's RoutingTable, over 1,000 workers; and its memory."""
    for i in range(WORKERS):
        await store.put_worker(_worker(i, 0))
    dp_client = redis.Redis.from_url(url, decode_responses=True)
    table = RoutingTable(dp_client)
    follower = asyncio.create_task(events.follow(dp_client, table, [], refresh_s=5.0))
    while table.version < 0:
        await asyncio.sleep(0.01)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fresh = RoutingTable(dp_client)
    await fresh.refresh()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    table_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))
    took = []
    for n in range(1, 51):
        target = await queries.routing_version(client) + 1
        started = time.perf_counter()
        await store.put_worker(_worker(random.randrange(WORKERS), n))
        while table.version < target:
            await asyncio.sleep(0)
        took.append(time.perf_counter() - started)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    await dp_client.aclose()
    return ms(took), table_bytes / 1e6, len(fresh.workers)


def _worker(i: int, n: int) -> WorkerRecord:
    resident = [f"adp_{i:06d}{k:02d}{n:016d}" for k in range(8)]
    return WorkerRecord(f"worker-{i:04d}", "tiny-llama", f"http://10.0.{i // 250}.{i % 250}:8000", 8, resident,
                        True, time.time(), owner="cp-1:50051")  # fmt: skip


async def placement(client: redis.Redis) -> dict[str, Any]:
    workers = await queries.read_workers(client)
    views = [WorkerView(w.id, w.base_model, w.healthy, w.max_adapters, frozenset(w.resident),
                        in_flight=random.randrange(20)) for w in workers]  # fmt: skip
    last_used = {a: random.random() for v in views for a in v.resident}
    pure, with_read = [], []
    for _ in range(200):
        started = time.perf_counter()
        decide(views, "tiny-llama", "adp_new", last_used)
        pure.append(time.perf_counter() - started)
    for _ in range(50):
        started = time.perf_counter()
        ws = await queries.read_workers(client)
        vs = [WorkerView(w.id, w.base_model, w.healthy, w.max_adapters, frozenset(w.resident)) for w in ws]
        decide(vs, "tiny-llama", "adp_new", last_used)
        with_read.append(time.perf_counter() - started)
    return {"workers": len(views), "decide_only": ms(pure), "read_workers_and_decide": ms(with_read)}


async def lists(store: Store, addr: str, tenants: list[tuple[str, str]]) -> dict[str, Any]:
    sample = random.sample(tenants, 200)
    direct, through = [], []
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = adapter_pb2_grpc.AdapterServiceStub(ch)
        for tid, key in sample:
            started = time.perf_counter()
            await store.list_adapters(tid)
            direct.append(time.perf_counter() - started)
            started = time.perf_counter()
            resp = await stub.ListAdapters(apb.ListAdaptersRequest(), metadata=(("authorization", f"Bearer {key}"),))
            through.append(time.perf_counter() - started)
            assert len(resp.adapters) > 0
    d, t = ms(direct), ms(through)
    return {"store": d, "grpc": t, "grpc_overhead_p50_ms": round(t["p50_ms"] - d["p50_ms"], 3)}


async def measure(args: argparse.Namespace, url: str, cp_addr: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url, decode_responses=True)
    store = Store(client)
    await client.flushall()
    base = int((await client.info("memory"))["used_memory"])
    started = time.perf_counter()
    tenants = await fill(store, args.tenants, args.adapters_per_tenant)
    fill_s = time.perf_counter() - started
    used = int((await client.info("memory"))["used_memory"])
    n = args.tenants * args.adapters_per_tenant
    listing = await lists(store, cp_addr, tenants)
    change, table_mb, table_workers = await routing_change(client, store, url)
    place = await placement(client)
    await client.aclose()
    return {
        "adapters": n,
        "tenants": args.tenants,
        "fill_seconds": round(fill_s, 1),
        "redis_bytes_per_adapter": round((used - base) / n),
        "list_a_tenants_adapters": listing,
        "routing_change_applied": change,
        "routing_table": {"workers": table_workers, "data_plane_mb": round(table_mb, 2)},
        "placement": place,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--adapters-per-tenant", type=int, default=10)
    args = ap.parse_args()
    random.seed(3)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        model = tinymodel.build(Path(tmp) / "models" / "tiny-llama")
        Catalog.write(Path(tmp) / "catalog.json", [{"name": "tiny-llama", "kind": "chat", "path": str(model)}])
        port = free_port()
        env = dict(os.environ, LORAPLANE_REDIS_URL=server.url, LORAPLANE_GRPC_ADDR=f"127.0.0.1:{port}",
                   LORAPLANE_CATALOG=str(Path(tmp) / "catalog.json"), LORAPLANE_ARTIFACT_DIR=str(Path(tmp) / "a"),
                   LORAPLANE_OPERATOR_TOKEN="o" * 32, LORAPLANE_AGENT_TOKEN="a" * 32, LORAPLANE_PEER_TOKEN="p" * 32,
                   LORAPLANE_LOG_LEVEL="WARNING", LORAPLANE_METRICS_ADDR="")  # fmt: skip
        cp = subprocess.Popen([sys.executable, "-m", "controlplane.server"], env=env)
        try:
            wait_until(lambda: port_open(port), 60, "control plane", cp)
            measured = asyncio.run(measure(args, server.url, f"127.0.0.1:{port}"))
        finally:
            cp.terminate()
            cp.wait()
            server.stop()
    result = {
        "benchmark": "registry",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, redis-server {_redis_version()}",
        "side_by_side": "store vs gRPC listing in one run; the rest absolute",
        **measured,
    }
    out = ROOT / "bench" / "results" / "registry.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    main()
