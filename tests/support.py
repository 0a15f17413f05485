"""Helpers the tests share: free ports, hand-made safetensors, a private redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loraplane import tinymodel
from loraplane.catalog import Architecture
from loraplane.limits import DTYPE_BYTES
from workeragent.vllm import MEASURING

# The long reliability suite (`make reliability`): every fault longer and repeated more.
LONG = os.environ.get("LORAPLANE_RELIABILITY_LONG") == "1"
ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m tests.…` runs from here
TINY = Architecture.from_model_config(tinymodel.DIMENSIONS)


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768+ here), so that no
    outgoing connection takes it between now and when a server (vLLM binds late) listens."""
    for _ in range(100):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], fill: bytes = b"\0") -> bytes:
    """A safetensors file with the given tensors (dtype, shape), contiguous, zero-filled."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + fill * offset


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The same tensors with other `__metadata__`: other bytes, same weights."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def lora_tensors(
    rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2, arch: Architecture = TINY
) -> dict[str, tuple[str, list[int]]]:
    out: dict[str, tuple[str, list[int]]] = {}
    for layer in range(layers):
        for m in modules:
            parent, fan_in, fan_out = arch.layer_modules()[m]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            out[f"{prefix}.lora_A.weight"] = ("F32", [rank, fan_in])
            out[f"{prefix}.lora_B.weight"] = ("F32", [fan_out, rank])
    return out


class RedisServer:
    """A private redis-server on a free loopback port, in a temp dir, optionally with AOF. The
    fault tests kill it (`kill`), freeze it (`signal`) and start it again on the same port."""

    def __init__(self, directory: Path, aof: bool = False) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required (apt-get install redis-server)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""]
        self._args += ["--appendonly", "yes" if aof else "no"]
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, "redis-server did not start", every_s=0.05)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


FIGURES: list[tuple[str, str]] = []


def figure(name: str, value: object) -> None:
    """A number the reliability suite reports: printed at the end of the test run (and written
    to $LORAPLANE_FIGURES as JSON lines when set)."""
    FIGURES.append((name, str(value)))
    path = os.environ.get("LORAPLANE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"figure": name, "value": str(value)}) + "\n")


def unmeasured_env() -> dict[str, str]:
    """The environment for the tests' own servers (simulator, moto): coverage measures loraplane's
    components, and would only slow these down."""
    return {k: v for k, v in os.environ.items() if k not in MEASURING}


def start_simulator(model: str, *args: str, port: int = 0) -> tuple[subprocess.Popen[bytes], str, int]:
    """A vLLM simulator for `model` on `port` (else a free one): (process, URL, port)."""
    from loraplane.stack import http_ok, wait_until

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    sim = subprocess.Popen(
        [sys.executable, "-m", "tests.vllmsim", "--port", str(port), "--model", model, *args],
        cwd=ROOT,
        env=unmeasured_env(),
    )
    wait_until(lambda: http_ok(url + "/health"), 30, "the simulator", sim)
    return sim, url, port


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A /metrics page as {(name, labels): value}."""
    out = {}
    # Prometheus's own parser: a label value may hold commas (vLLM's `running_lora_adapters="a,b"`)
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def metric(pages: list[dict[tuple[str, frozenset[tuple[str, str]]], float]], name: str, **labels: str) -> float:
    """A series summed over the pages (components) and over the labels not named."""
    want = set(labels.items())
    return sum(v for page in pages for (n, ls), v in page.items() if n == name and want <= ls)


def wait_for(done: Callable[[], bool], within_s: float, what: str = "did not recover", every_s: float = 0.1) -> float:
    """Seconds until `done()` is true (an HTTP error counts as not yet), polled every `every_s`:
    the one way tests wait for a condition."""
    started = time.monotonic()
    while True:
        try:
            if done():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        assert time.monotonic() - started < within_s, what
        time.sleep(every_s)


@contextlib.asynccontextmanager
async def health_server() -> AsyncIterator[str]:
    """A gRPC server on a free loopback port that answers `grpc.health.v1` (as a live control
    plane replica does): its address."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
