"""The embedded default: the whole stack as child processes on one machine.

Used by `loraplane up` and by the end-to-end tests (with free ports and a temp dir).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplane import tinymodel
from loraplane.catalog import Catalog
from loraplane.operator import Operator

log = logging.getLogger(__name__)
BASE_MODEL = "tiny-llama"


@dataclass(frozen=True)
class WorkerSpec:
    """One more worker (agent + vLLM) beside the first; `env` overrides its settings."""

    vllm_port: int
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    http_port: int = 8080
    grpc_port: int = 50051
    vllm_port: int = 8100
    redis_url: str = ""  # empty: start a private redis-server with AOF under data_dir
    log_dir: Path | None = None
    with_worker: bool = True
    second_grpc_port: int = 0  # > 0: run a second control plane replica there
    second_http_port: int = 0  # > 0: run a second data plane replica there
    extra_env: tuple[tuple[str, str], ...] = ()
    extra_workers: tuple[WorkerSpec, ...] = ()  # connected to the second replica when there is one
    extra_models: tuple[tuple[str, str], ...] = ()  # (name, kind) served from the tiny model's files too
    lora_models: tuple[tuple[str, Path], ...] = ()  # (name, model dir): more chat models taking LoRA
    metrics_port: int = 0  # the first control plane's /metrics; agents' follow. 0: free ports


@dataclass
class Stack:
    config: StackConfig
    secrets: dict[str, str] = field(default_factory=dict)
    redis_url: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_urls: dict[str, str] = field(default_factory=dict)  # component -> its /metrics URL
    _specs: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config.http_port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    def operator(self, timeout: float = 10) -> Operator:
        return Operator(self.grpc_addr, self.secrets["operator_token"], timeout)

    def start(self, timeout: float = 600) -> None:
        d = self.config.data_dir.resolve()
        d.mkdir(parents=True, exist_ok=True)
        self.secrets = _secrets(d / "secrets.json")
        model_dir = tinymodel.build(d / "models" / BASE_MODEL)
        extra: list[dict[str, object]] = [
            {"name": name, "kind": kind, "path": str(model_dir)} for name, kind in self.config.extra_models
        ]
        extra += [
            {"name": name, "kind": "chat", "path": str(path), "lora": True} for name, path in self.config.lora_models
        ]
        Catalog.write(
            d / "catalog.json",
            [
                {
                    "name": BASE_MODEL,
                    "kind": "chat",
                    "path": str(model_dir),
                    "lora": True,
                    "max_rank": 64,
                    "max_adapters_per_worker": 8,
                    "tool_parser": "hermes",
                },
                *extra,
            ],
        )
        self.redis_url = self.config.redis_url or self._start_redis(d / "redis")
        env = self.env()
        self._spawn("controlplane", [sys.executable, "-m", "controlplane.server"], env | self._metrics("controlplane"))
        wait_until(lambda: port_open(self.config.grpc_port), 60, "control plane", self.procs["controlplane"])
        dataplane_env = env
        if self.config.second_grpc_port:  # a second replica: the data plane uses it, the agent the first
            second = f"127.0.0.1:{self.config.second_grpc_port}"
            self._spawn(
                "controlplane-2",
                [sys.executable, "-m", "controlplane.server"],
                env | {"LORAPLANE_GRPC_ADDR": second} | self._metrics("controlplane-2"),
            )
            wait_until(
                lambda: port_open(self.config.second_grpc_port), 60, "control plane 2", self.procs["controlplane-2"]
            )
            dataplane_env = env | {"LORAPLANE_CONTROLPLANE_ADDR": second}
        if self.config.with_worker:
            self._spawn("agent", [sys.executable, "-m", "workeragent.agent"], env | self._metrics("agent"))
            for i, spec in enumerate(self.config.extra_workers, start=2):
                name = f"agent-{i}"
                self._spawn(
                    name, [sys.executable, "-m", "workeragent.agent"], self.worker_env(i, spec) | self._metrics(name)
                )
        self._spawn("dataplane", [sys.executable, "-m", "dataplane.app"], dataplane_env)
        wait_until(lambda: http_ok(self.http_url + "/healthz"), 60, "data plane", self.procs["dataplane"])
        if self.config.second_http_port:  # a second data plane replica, on its own port
            port = self.config.second_http_port
            self._spawn("dataplane-2", [sys.executable, "-m", "dataplane.app"],
                        dataplane_env | {"LORAPLANE_HTTP_PORT": str(port)})  # fmt: skip
            wait_until(
                lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "data plane 2", self.procs["dataplane-2"]
            )
        if self.config.with_worker:
            wait_until(self._worker_ready, timeout, "the vLLM workers", self.procs["agent"])

    def _metrics(self, name: str) -> dict[str, str]:
        """Where the component serves /metrics: from `metrics_port` on, or on a free port."""
        port = self.config.metrics_port + len(self.metrics_urls) if self.config.metrics_port else _free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return {"LORAPLANE_METRICS_ADDR": f"127.0.0.1:{port}"}

    def env(self) -> dict[str, str]:
        d = self.config.data_dir.resolve()
        env = dict(os.environ)
        env.update(
            LORAPLANE_REDIS_URL=self.redis_url,
            LORAPLANE_GRPC_ADDR=self.grpc_addr,
            LORAPLANE_CONTROLPLANE_ADDR=self.grpc_addr,
            LORAPLANE_HTTP_PORT=str(self.config.http_port),
            LORAPLANE_VLLM_PORT=str(self.config.vllm_port),
            LORAPLANE_CATALOG=str(d / "catalog.json"),
            LORAPLANE_ARTIFACT_DIR=str(d / "artifacts"),
            LORAPLANE_CACHE_DIR=str(d / "agent-cache"),
            LORAPLANE_OPERATOR_TOKEN=self.secrets["operator_token"],
            LORAPLANE_AGENT_TOKEN=self.secrets["agent_token"],
            LORAPLANE_PEER_TOKEN=self.secrets["peer_token"],
            LORAPLANE_WORKER_API_KEY=self.secrets["worker_api_key"],
            LORAPLANE_WORKER_ID=f"embedded-{BASE_MODEL}",
            LORAPLANE_BASE_MODEL=BASE_MODEL,
        )
        env.update(self.config.extra_env)
        env.setdefault("LORAPLANE_VLLM_ARGS", " ".join(vllm_args()))
        if _vllm_cpu():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            if self.config.extra_workers:
                env.update(CPU_SHARE)
        return env

    def worker_env(self, i: int, spec: WorkerSpec) -> dict[str, str]:
        d = self.config.data_dir.resolve()
        env = self.env() | {
            "LORAPLANE_VLLM_PORT": str(spec.vllm_port),
            "LORAPLANE_CACHE_DIR": str(d / f"agent-cache-{i}"),
            "LORAPLANE_WORKER_ID": f"embedded-{BASE_MODEL}-{i}",
        }
        if self.config.second_grpc_port:
            env["LORAPLANE_CONTROLPLANE_ADDR"] = f"127.0.0.1:{self.config.second_grpc_port}"
        if _vllm_cpu():
            env.update(CPU_SHARE)
        return env | dict(spec.env)

    def workers(self) -> list[tuple[str, str]]:
        """Each worker's id and the URL of its vLLM, the first worker first (once started)."""
        envs = [self.env(), *(self.worker_env(i, spec) for i, spec in enumerate(self.config.extra_workers, start=2))]
        local = "http://127.0.0.1:{}"  # a vLLM its agent starts
        return [
            (e["LORAPLANE_WORKER_ID"], e.get("LORAPLANE_VLLM_URL") or local.format(e["LORAPLANE_VLLM_PORT"]))
            for e in envs
        ]

    @property
    def agents(self) -> list[str]:
        return ["agent"] + [f"agent-{i}" for i in range(2, len(self.config.extra_workers) + 2)]

    def _worker_ready(self) -> bool:
        """Whether the data plane's /readyz counts every worker: what `loraplane up` waits for
        before it says "up" (a worker counts once its engine serves)."""
        try:
            with urllib.request.urlopen(self.http_url + "/readyz", timeout=2) as r:
                workers = json.loads(r.read()).get("workers", 0)
        except (OSError, ValueError):
            return False
        return bool(workers >= len(self.agents))

    def _start_redis(self, d: Path) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (apt-get install redis-server), and LORAPLANE_REDIS_URL is not set"
            )
        d.mkdir(parents=True, exist_ok=True)
        sock = d / "redis.sock"
        sock.unlink(missing_ok=True)
        self._spawn(
            "redis",
            [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir", str(d),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            dict(os.environ),
        )  # fmt: skip
        wait_until(sock.exists, 30, "redis-server", self.procs["redis"])
        return f"unix://{sock}"

    def restart(self, name: str) -> None:
        """Start a component again, as it was started (after a test killed it)."""
        args, env = self._specs[name]
        self._spawn(name, args, env)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self._specs[name] = (args, env)
        if self.config.log_dir is None:
            self.procs[name] = subprocess.Popen(args, env=env, start_new_session=True)
            return
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.config.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own copy
            self.procs[name] = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        for name in ["dataplane", "dataplane-2", *self.agents, "controlplane-2", "controlplane", "redis"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def vllm_args() -> list[str]:
    args = ["--dtype", "float32", "--max-model-len", "1024"]
    if _vllm_cpu():
        args += ["--gpu-memory-utilization", "0.2"]
    return args


# Several vLLMs (CPU build) on one machine: vLLM binds each engine to the same first core, and on
# a busy core a restarting vLLM was seen stalled for minutes in sched_setaffinity. So no binding,
# and one OpenMP thread each: the scheduler shares the cores.
CPU_SHARE = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def _vllm_cpu() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _secrets(path: Path) -> dict[str, str]:
    """The stack's secrets, each generated once; one a newer version needs is added to an older file."""
    values: dict[str, str] = dict(json.loads(path.read_text())) if path.exists() else {}
    missing = [k for k in ("operator_token", "agent_token", "worker_api_key", "peer_token") if k not in values]
    if not missing:
        return values
    values |= {k: secrets.token_urlsafe(32) for k in missing}
    staged = path.with_name(path.name + ".tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(values, f)
    os.replace(staged, path)
    return values


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(0.25)
