"""Worker supervision with real processes: the agent runs its engine (here the vLLM simulator,
which like vLLM starts an "engine core" child that ignores SIGTERM) and the faults are real
signals. Each test fails without the behaviour it names: no process of a killed engine's group
survives; a stopped engine is found hung and restarted; a crash loop is reported with the
engine's last error line and gets nothing routed; a restarted agent reaps an engine it will
not adopt; after a restart of everything no worker counts before it serves again.

tests/e2e does the kill -9 and the stopped engine core on a real vLLM."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.stack import Stack, port_open
from tests.conftest import running_stack
from tests.support import LONG, ROOT, figure, metric, scrape, wait_for
from workeragent.engine import Group, members

HANG_S = 2
STABLE_S = 3
KILLS = 10 if LONG else 2


@dataclass
class Supervised:
    stack: Stack
    fail_file: Path  # while it exists, the engine fails to start with its text as the error
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return self.stack.config.data_dir / "agent-cache" / "vllm.pid"

    def group(self) -> Group | None:
        try:
            return Group.decode(self.pidfile.read_text())
        except FileNotFoundError:
            return None

    def ready_workers(self) -> int:
        r = httpx.get(self.stack.http_url + "/readyz", timeout=5)
        return int(r.json()["workers"])

    def worker(self) -> pb.Worker:
        (w,) = self.stack.operator().list_workers().workers
        return w

    def serving(self) -> bool:
        return self.ready_workers() == 1 and self.worker().engine_state == "serving"

    def chat(self, timeout: float = 30) -> httpx.Response:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        url = self.stack.http_url + "/v1/chat/completions"
        return httpx.post(url, json=body, headers=self.headers, timeout=timeout)

    def agent_metric(self, name: str, **labels: str) -> float:
        return metric([scrape(self.stack.metrics_urls["agent"])], name, **labels)


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    tmp = tmp_path_factory.mktemp("supervised")
    fail_file = tmp / "fail"
    command = f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'} --engine-child --fail-if {fail_file}"
    env = (
        ("LORAPLANE_VLLM_COMMAND", command),
        ("LORAPLANE_ENGINE_HANG_S", str(HANG_S)),
        ("LORAPLANE_ENGINE_STABLE_S", str(STABLE_S)),
        ("LORAPLANE_ENGINE_BACKOFF_CAP_S", "1"),
        ("LORAPLANE_HEARTBEAT_S", "1"),
    )
    for stack in running_stack(tmp, with_worker=True, env=env):
        s = Supervised(stack, fail_file)
        assert s.ready_workers() == 1  # a started stack (`loraplane up` says "up") is one /readyz counts
        key = stack.operator().create_tenant("supervised", tenant_pb2.TIER_SHARED).api_key
        s.headers = {"Authorization": f"Bearer {key}"}
        wait_for(s.serving, 30, "the supervised engine")
        yield s
        group = s.group()
        stack.stop()
        assert group is None or members(group) == [], "the agent left engine processes behind when it stopped"


class Traffic:
    """Chats to the base model from a thread, each answer counted: 200, 503 with Retry-After
    (no capacity right now, come back), or anything else (a failure)."""

    def __init__(self, sup: Supervised) -> None:
        self._sup = sup
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self._sup.chat(timeout=30)
                kind = "ok" if r.status_code == 200 else f"{r.status_code}"
                if r.status_code == 503 and r.headers.get("retry-after"):
                    kind = "503 with Retry-After"
            except httpx.HTTPError as err:
                kind = type(err).__name__
            self.counts[kind] += 1
            time.sleep(0.05)

    def failed(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind not in ("ok", "503 with Retry-After"))


def _restart_figures(what: str, seconds: list[float], orphans: int, traffic: Traffic) -> None:
    p99 = statistics.quantiles(seconds, n=100)[98] if len(seconds) > 1 else seconds[0]
    figure(f"{what} kill -9 x{len(seconds)}: orphaned processes left", orphans)
    figure(f"{what} kill -9: seconds until serving again p50 / p99", f"{statistics.median(seconds):.2f} / {p99:.2f}")
    figure(
        f"{what} kill -9: requests ok / 503 with Retry-After / failed",
        f"{traffic.counts['ok']} / {traffic.counts['503 with Retry-After']} / {traffic.failed()}",
    )


@pytest.mark.parametrize("target", ["api server", "engine core"])
def test_a_killed_engine_leaves_no_process_and_serves_again(sup: Supervised, target: str) -> None:
    reaped_before = sup.agent_metric("loraplane_worker_engine_processes_reaped_total")
    seconds, orphans = [], 0
    with Traffic(sup) as traffic:
        for _ in range(KILLS):
            old = sup.group()
            assert old is not None
            leader, core = old.pgid, [p for p in members(old) if p != old.pgid]
            assert core, "the engine runs its core in a child, as vLLM does"
            killed = time.monotonic()
            os.kill(leader if target == "api server" else core[0], signal.SIGKILL)
            wait_for(lambda: sup.group() not in (None, old), 30, "a new engine")  # noqa: B023
            orphans += len(members(old))  # counted when the next engine has started
            wait_for(lambda: sup.chat().status_code == 200, 30, "serving again")
            seconds.append(time.monotonic() - killed)
            time.sleep(STABLE_S)  # each kill ends a life that served: not a crash loop
    _restart_figures(f"engine {target}", seconds, orphans, traffic)
    assert orphans == 0
    assert traffic.failed() == 0, traffic.counts
    if target == "api server":  # its engine core outlived it: the agent ended it
        assert sup.agent_metric("loraplane_worker_engine_processes_reaped_total") >= reaped_before + KILLS
    assert sup.worker().engine_restarts >= KILLS


def test_a_stopped_engine_is_found_hung_and_restarted(sup: Supervised) -> None:
    old = sup.group()
    assert old is not None
    hung_before = sup.agent_metric("loraplane_worker_engine_restarts_total", reason="hung")
    with Traffic(sup) as traffic:
        stopped = time.monotonic()
        os.kill(old.pgid, signal.SIGSTOP)
        wait_for(lambda: sup.ready_workers() == 0, 15, "the hung engine out of routing")
        detected = time.monotonic() - stopped
        wait_for(lambda: sup.group() not in (None, old), 30, "a new engine")
        assert members(old) == []  # SIGKILL ends a stopped process too
        wait_for(sup.serving, 30, "serving again")
        serving = time.monotonic() - stopped
    figure("a SIGSTOP'd engine: seconds until detected / until serving again", f"{detected:.1f} / {serving:.1f}")
    figure(
        "a SIGSTOP'd engine: requests ok / 503 with Retry-After / failed",
        f"{traffic.counts['ok']} / {traffic.counts['503 with Retry-After']} / {traffic.failed()}",
    )
    assert detected < HANG_S + 5
    assert traffic.failed() == 0, traffic.counts
    assert sup.agent_metric("loraplane_worker_engine_restarts_total", reason="hung") == hung_before + 1


def test_a_crash_loop_is_reported_with_the_engines_error_and_gets_nothing(sup: Supervised) -> None:
    sup.fail_file.write_text("cannot allocate memory for the KV cache (simulated)")
    try:
        old = sup.group()
        assert old is not None
        os.kill(old.pgid, signal.SIGKILL)
        wait_for(lambda: sup.worker().engine_state == "crash_loop", 30, "the crash loop reported")
        w = sup.worker()
        assert not w.healthy
        assert w.engine_last_error == "RuntimeError: cannot allocate memory for the KV cache (simulated)"
        assert sup.ready_workers() == 0
        assert sup.agent_metric("loraplane_worker_engine_state", state="crash_loop") == 1
        r = sup.chat()
        assert r.status_code == 503 and r.headers.get("retry-after")
    finally:
        sup.fail_file.unlink()
    wait_for(sup.serving, 30 + STABLE_S, "serving after the crash loop")
    assert sup.worker().engine_last_error == ""
    assert sup.chat().status_code == 200


def test_a_restarted_agent_adopts_a_serving_engine_and_reaps_a_hung_one(sup: Supervised) -> None:
    stack = sup.stack
    old = sup.group()
    assert old is not None
    stack.procs["agent"].kill()
    stack.procs["agent"].wait()
    stack.restart("agent")
    wait_for(sup.serving, 30, "the agent back")
    assert sup.group() == old, "an engine that serves is adopted, not restarted"

    stack.procs["agent"].kill()
    stack.procs["agent"].wait()
    os.kill(old.pgid, signal.SIGSTOP)  # an engine that does not answer is not adopted
    stack.restart("agent")
    wait_for(lambda: sup.group() not in (None, old), 30, "a new engine")
    assert members(old) == []
    wait_for(sup.serving, 30, "serving again")


def test_after_a_restart_of_everything_no_worker_counts_before_it_serves(sup: Supervised) -> None:
    stack = sup.stack
    old = sup.group()
    assert old is not None
    for name in ["dataplane", "agent", "controlplane"]:
        stack.procs[name].kill()
        stack.procs[name].wait()
    for pid in members(old):
        os.kill(pid, signal.SIGKILL)
    # The data plane back first, then the control plane, then the agent: each reads the
    # previous run's worker record, left healthy by the kill.
    stack.restart("dataplane")
    wait_for(lambda: _answers(stack.http_url + "/readyz"), 30, "the data plane")
    counted_while_down = _sample(sup, 2.0)
    stack.restart("controlplane")
    wait_for(lambda: port_open(stack.config.grpc_port), 30, "the control plane")
    counted_while_down += _sample(sup, 2.0)
    stack.restart("agent")
    deadline = time.monotonic() + 60
    while sup.ready_workers() == 0:
        assert time.monotonic() < deadline, "the worker never came back"
        time.sleep(0.05)
    first = sup.chat(timeout=10)  # the moment /readyz counts it, it serves
    figure("whole-stack restart: seconds /readyz counted a worker that cannot serve", f"{counted_while_down:.2f}")
    assert counted_while_down == 0
    assert first.status_code == 200, first.text


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


def _sample(sup: Supervised, seconds: float) -> float:
    """Seconds of `seconds` during which /readyz counted a worker (while none can serve)."""
    counted, step, end = 0.0, 0.05, time.monotonic() + seconds
    while time.monotonic() < end:
        if sup.ready_workers() > 0:
            counted += step
        time.sleep(step)
    return counted
