"""Moving adapter bytes, in one run on real processes (Redis, control plane, data plane):

- the artifact path alone: a worker's node cache filling from the control plane
  (`WorkerService/FetchArtifact` stream, sha256 verified, written, fsynced), for 50, 200 and
  500 MB blobs, in MB/s;
- an upload of a ~500 MB adapter (rank 50 on a 7B-shaped base model, every projection) through
  data plane -> control plane -> artifact store with curl, in MB/s, and the peak RSS of the data
  plane and control plane processes, sampled every 20 ms (it must stay flat, far below the
  file's size).

  .venv/bin/python bench/artifacts.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.artifacts import FileArtifactStore  # noqa: E402
from loraplane.controlplane.v1 import tenant_pb2, worker_pb2_grpc  # noqa: E402
from loraplane.controlplane.v1 import worker_pb2 as wpb  # noqa: E402
from loraplane.operator import Operator  # noqa: E402
from loraplane.stack import http_ok, wait_until  # noqa: E402
from tests.support import RedisServer, free_port  # noqa: E402
from workeragent.cache import ArtifactCache  # noqa: E402

SIZES_MB = (50, 200, 500)
AGENT_TOKEN, OPERATOR_TOKEN = "a" * 32, "o" * 32
BIG = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 32, "head_dim": 128}  # fmt: skip
MODULES = {"self_attn": [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
                         ("o_proj", 4096, 4096)],
           "mlp": [("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)]}  # fmt: skip
RANK = 50


def write_big_adapter(path: Path) -> int:
    """A valid LoRA safetensors file for the 7B shape, written in pieces (random bytes)."""
    header: dict[str, Any] = {}
    offset = 0
    shapes = []
    for layer in range(BIG["num_hidden_layers"]):
        for parent, modules in MODULES.items():
            for name, fan_in, fan_out in modules:
                for ab, shape in (("A", [RANK, fan_in]), ("B", [fan_out, RANK])):
                    size = shape[0] * shape[1] * 4
                    key = f"base_model.model.model.layers.{layer}.{parent}.{name}.lora_{ab}.weight"
                    header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
                    shapes.append(size)
                    offset += size
    raw = json.dumps(header).encode()
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for size in shapes:
            while size:
                n = min(size, len(chunk))
                f.write(chunk[:n])
                size -= n
    return path.stat().st_size


async def fetch_rate(addr: str, cache_root: Path, sha: str, size: int) -> float:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)

        async def fetch(sha256: str) -> AsyncIterator[bytes]:
            call = stub.FetchArtifact(wpb.FetchArtifactRequest(sha256=sha256),
                                      metadata=(("authorization", f"Bearer {AGENT_TOKEN}"),))  # fmt: skip
            async for msg in call:
                yield msg.chunk

        cache = ArtifactCache(cache_root, fetch)
        started = time.perf_counter()
        await cache.blob(sha, size)
        return size / 1e6 / (time.perf_counter() - started)


def peak_rss(pids: dict[str, int], stop: threading.Event, out: dict[str, float]) -> None:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not stop.is_set():
        for name, p in procs.items():
            out[name] = max(out.get(name, 0.0), p.memory_info().rss / 1e6)
        time.sleep(0.02)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis")
        catalog = tmp / "catalog.json"
        catalog.write_text(json.dumps({"models": [{"name": "bench-7b", "kind": "chat", "path": str(tmp),
                                                   "max_rank": 64, "architecture": BIG}]}))  # fmt: skip
        grpc_port, http_port = free_port(), free_port()
        env = dict(os.environ, LORAPLANE_REDIS_URL=redis_server.url, LORAPLANE_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
                   LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{grpc_port}", LORAPLANE_HTTP_PORT=str(http_port),
                   LORAPLANE_CATALOG=str(catalog), LORAPLANE_ARTIFACT_DIR=str(tmp / "artifacts"),
                   LORAPLANE_OPERATOR_TOKEN=OPERATOR_TOKEN, LORAPLANE_AGENT_TOKEN=AGENT_TOKEN,
                   LORAPLANE_PEER_TOKEN="p" * 32,
                   LORAPLANE_LOG_LEVEL="WARNING", LORAPLANE_METRICS_ADDR="")  # fmt: skip
        cp = subprocess.Popen([sys.executable, "-m", "controlplane.server"], env=env)
        dp = subprocess.Popen([sys.executable, "-m", "dataplane.app"], env=env)
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_until(lambda: http_ok(url + "/healthz"), 60, "data plane", dp)
            store = FileArtifactStore(tmp / "artifacts")
            rates: dict[str, Any] = {}
            for mb in SIZES_MB:
                data = os.urandom(mb * 1000 * 1000)
                sha = hashlib.sha256(data).hexdigest()
                store.path(sha).parent.mkdir(parents=True, exist_ok=True)
                store.path(sha).write_bytes(data)
                runs = [asyncio.run(fetch_rate(f"127.0.0.1:{grpc_port}", tmp / f"cache-{mb}-{i}", sha, len(data)))
                        for i in range(3)]  # fmt: skip
                rates[f"{mb}_MB"] = {"runs": 3, "median_MB_per_s": round(statistics.median(runs), 1),
                                     "seconds": round(mb / statistics.median(runs), 2)}  # fmt: skip
                del data
            key = (
                Operator(f"127.0.0.1:{grpc_port}", OPERATOR_TOKEN)
                .create_tenant("bench", tenant_pb2.TIER_RESERVED)
                .api_key
            )
            big = tmp / "adapter_model.safetensors"
            size = write_big_adapter(big)
            pids = {"dataplane": dp.pid, "controlplane": cp.pid}
            baseline = {n: psutil.Process(p).memory_info().rss / 1e6 for n, p in pids.items()}
            peaks: dict[str, float] = {}
            stop = threading.Event()
            sampler = threading.Thread(target=peak_rss, args=(pids, stop, peaks))
            sampler.start()
            started = time.perf_counter()
            out = subprocess.run(
                ["curl", "-s", "-X", "POST", f"{url}/v1/adapters/upload", "-H", f"Authorization: Bearer {key}",
                 "-F", "name=big", "-F", "base_model=bench-7b", "-F", f"file=@{big}"],
                capture_output=True, check=True, timeout=600,
            ).stdout  # fmt: skip
            took = time.perf_counter() - started
            stop.set()
            sampler.join()
            answer = json.loads(out)
            assert answer.get("status") == "ready", answer
        finally:
            for proc in (dp, cp):
                proc.terminate()
                proc.wait()
            redis_server.stop()
    result = {
        "benchmark": "artifacts",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, local disk; every process on this machine",
        "side_by_side": False,
        "artifact_path_fetch_verify_write": rates,
        "upload": {
            "bytes": size,
            "rank": RANK,
            "seconds": round(took, 2),
            "MB_per_s": round(size / 1e6 / took, 1),
            "rss_baseline_MB": {k: round(v, 1) for k, v in baseline.items()},
            "rss_peak_MB": {k: round(v, 1) for k, v in peaks.items()},
        },
    }
    path = ROOT / "bench" / "results" / "artifacts.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
