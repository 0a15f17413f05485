"""Moving adapter bytes, in one run on real processes (Redis, control plane, data plane):

- the artifact path alone, side by side: a worker's node cache filling from the control plane
  (`WorkerService/FetchArtifact`) until the adapter directory is ready to load, for 50, 200 and
  500 MB blobs — the previous path (one whole-blob stream, each chunk hashed and written in turn,
  then fsync, from a control plane reading every message in a thread: `PREVIOUS_SERVER`) next to
  today's (`workeragent.cache`: byte ranges fetched 4 at a time, written at their offsets into a
  preallocated file, hashed as they arrive, no fsync; the control plane reading what the page
  cache holds on its event loop), and today's with glibc's malloc thresholds pinned in both
  processes (`MALLOC_PINNED`). Three control planes run side by side; each fetch runs in a fresh
  process, as an agent's would; the runs alternate; the CPU seconds of the fetching process and
  of the control plane are reported next to the wall time;
- an upload of a ~500 MB adapter (rank 50 on a 7B-shaped base model, every projection) through
  data plane -> control plane -> artifact store with curl, in MB/s, and the peak RSS of the data
  plane and control plane processes, sampled every 20 ms (it must stay flat, far below the
  file's size).

  .venv/bin/python bench/artifacts.py
  .venv/bin/python bench/artifacts.py fetch ADDR ROOT SHA256 SIZE before|after  # one fetch
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.artifacts import ARTIFACT_MESSAGE, FileArtifactStore  # noqa: E402
from loraplane.controlplane.v1 import tenant_pb2, worker_pb2_grpc  # noqa: E402
from loraplane.controlplane.v1 import worker_pb2 as wpb  # noqa: E402
from loraplane.operator import Operator  # noqa: E402
from loraplane.stack import http_ok, port_open, wait_until  # noqa: E402
from tests.support import RedisServer, free_port  # noqa: E402
from workeragent.cache import SEGMENT, STREAMS, ArtifactCache, IntegrityError  # noqa: E402

SIZES_MB = (50, 200, 500)
RUNS = 5
# glibc otherwise moves its mmap threshold with each freed block and gives memory back to the
# kernel at once: megabyte-sized messages then cost fresh pages (page faults) every time.
MALLOC_PINNED = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}
TARGET_S = {200: 0.6, 500: 1.5}
# A control plane that reads each message in a thread, as FetchArtifact did before.
PREVIOUS_SERVER = (
    "import controlplane.artifacts as a; a.FileRange.read_cached = lambda self, size: None; "
    "from controlplane.server import main; main()"
)
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


class SequentialCache(ArtifactCache):
    """The previous artifact path: one whole-blob stream, each chunk hashed and written in turn,
    then fsync (kept here to measure against)."""

    async def _download(self, sha256: str, size: int, path: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=self._tmp)
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in self._fetch(sha256, 0, 0):
                    n += len(chunk)
                    if n > size:
                        raise IntegrityError(f"artifact {sha256} is larger than {size} bytes")
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(f.flush)
                await asyncio.to_thread(os.fsync, f.fileno())
            if h.hexdigest() != sha256 or n != size:
                raise IntegrityError(f"artifact {sha256} failed verification")
            os.replace(name, path)
            self._touch(sha256, path)
            return path
        finally:
            Path(name).unlink(missing_ok=True)


async def time_to_ready(addr: str, cache_root: Path, sha: str, size: int, path: type[ArtifactCache]) -> float:
    """Seconds from nothing on the node to an adapter directory vLLM can load."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)

        async def fetch(sha256: str, offset: int, length: int) -> AsyncGenerator[bytes]:  # as the agent's
            request = wpb.FetchArtifactRequest(sha256=sha256, offset=offset, length=length)
            call = stub.FetchArtifact(request, metadata=(("authorization", f"Bearer {AGENT_TOKEN}"),), timeout=600)
            try:
                async for msg in call:
                    yield msg.chunk
            finally:
                call.cancel()

        cache = path(cache_root, fetch)
        started = time.perf_counter()
        d = await cache.adapter_dir("adp_bench", sha, size, b"{}")
        took = time.perf_counter() - started
    assert (d / "adapter_model.safetensors").stat().st_size == size
    shutil.rmtree(cache_root)  # its pages need not reach the disk while the next run goes
    return took


PATHS: dict[str, type[ArtifactCache]] = {"before": SequentialCache, "after": ArtifactCache}


def fetch_once(addr: str, root: str, sha: str, size: str, path: str) -> None:
    """One fetch in this process: prints [wall s, this process's CPU s during it]."""
    cpu = time.process_time()
    wall = asyncio.run(time_to_ready(addr, Path(root), sha, int(size), PATHS[path]))
    print(json.dumps([wall, time.process_time() - cpu]))


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def measured(plane: tuple[str, int], root: Path, sha: str, size: int, path: str, env: dict[str, str]) -> list[float]:
    """[wall s, CPU s of the fetching process (the agent's part), CPU s of the control plane]."""
    addr, pid = plane
    cp = cpu_s(pid)
    out = subprocess.run(
        [sys.executable, __file__, "fetch", addr, str(root), sha, str(size), path],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    ).stdout  # fmt: skip
    wall, agent = json.loads(out.splitlines()[-1])
    return [wall, agent, cpu_s(pid) - cp]


def summary(runs: list[list[float]], mb: int) -> dict[str, Any]:
    median = statistics.median(r[0] for r in runs)
    return {
        "runs_s": [round(r[0], 3) for r in runs],
        "median_s": round(median, 3),
        "MB_per_s": round(mb / median, 1),
        "agent_cpu_s": round(statistics.median(r[1] for r in runs), 3),
        "controlplane_cpu_s": round(statistics.median(r[2] for r in runs), 3),
    }


def artifact_path(planes: dict[str, tuple[str, int]], store: FileArtifactStore, tmp: Path) -> dict[str, Any]:
    env = dict(os.environ)
    paths = {"before": ("previous", "before", env), "after": ("default", "after", env),
             "after_malloc_pinned": ("malloc_pinned", "after", env | MALLOC_PINNED)}  # fmt: skip
    rows: dict[str, Any] = {}
    for mb in SIZES_MB:
        data = os.urandom(mb * 1000 * 1000)
        sha = hashlib.sha256(data).hexdigest()
        store.path(sha).parent.mkdir(parents=True, exist_ok=True)
        store.path(sha).write_bytes(data)
        del data
        runs: dict[str, list[list[float]]] = {name: [] for name in paths}
        for i in range(RUNS):  # alternating, so each sees the same machine
            for name, (plane, path, agent_env) in paths.items():
                root = tmp / f"{name}-{mb}-{i}"
                runs[name].append(measured(planes[plane], root, sha, mb * 10**6, path, agent_env))
        rows[f"{mb}_MB"] = {name: summary(r, mb) for name, r in runs.items()}
        if mb in TARGET_S:
            rows[f"{mb}_MB"]["target_s"] = TARGET_S[mb]
        print(mb, "MB:", rows[f"{mb}_MB"], flush=True)
        store.delete(sha)
    return rows


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
        pinned_port, previous_port = free_port(), free_port()
        pinned_env = env | MALLOC_PINNED | {"LORAPLANE_GRPC_ADDR": f"127.0.0.1:{pinned_port}"}
        pinned = subprocess.Popen([sys.executable, "-m", "controlplane.server"], env=pinned_env)
        previous_env = env | {"LORAPLANE_GRPC_ADDR": f"127.0.0.1:{previous_port}"}
        previous = subprocess.Popen([sys.executable, "-c", PREVIOUS_SERVER], env=previous_env, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_until(lambda: http_ok(url + "/healthz"), 60, "data plane", dp)
            wait_until(lambda: port_open(pinned_port), 60, "second control plane", pinned)
            wait_until(lambda: port_open(previous_port), 60, "third control plane", previous)
            store = FileArtifactStore(tmp / "artifacts")
            load_before = os.getloadavg()
            planes = {
                "previous": (f"127.0.0.1:{previous_port}", previous.pid),
                "default": (f"127.0.0.1:{grpc_port}", cp.pid),
                "malloc_pinned": (f"127.0.0.1:{pinned_port}", pinned.pid),
            }
            rates = artifact_path(planes, store, tmp)
            load_after = os.getloadavg()
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
            for proc in (dp, cp, pinned, previous):
                proc.terminate()
                proc.wait()
            redis_server.stop()
    result = {
        "benchmark": "artifacts",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, local disk; every process on this machine",
        "side_by_side": True,
        "artifact_path_to_ready": {
            "what": "fetch from the control plane + sha256 + write + hard-linked adapter directory, "
            f"median of {RUNS} runs, the paths alternating",
            "before": "one whole-blob stream, 1 chunk at a time hashed then written, fsync; the control "
            "plane reading each message in a thread",
            "after": f"{STREAMS} byte ranges of {SEGMENT >> 20} MiB in flight, pwrite at offsets into a "
            "preallocated file, sha256 over the written prefix while it grows, no fsync; the control "
            "plane reading cached bytes on its event loop",
            "after_malloc_pinned": "after, both processes started with " + json.dumps(MALLOC_PINNED),
            "message_bytes": ARTIFACT_MESSAGE,
            "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "sizes": rates,
        },
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
    if sys.argv[1:2] == ["fetch"]:
        fetch_once(*sys.argv[2:])
    else:
        main()
