"""THREATS.md's faults, injected for real: Redis `kill -9`'d, frozen and back empty; the data
plane, the control plane, an agent and a worker's engine `kill -9`'d under load; the quota race;
an upload cut off by a dying control plane. Each test prints its figure (see tests/support.figure).

The tests run in file order on one stack and each leaves it whole again; Redis back empty is
last, since it forgets every tenant.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.state import keys
from loraplane.state.records import AdapterRecord
from tests.reliability.conftest import QUOTA, SLOW_CLIENT_S, FaultStack, logs
from tests.support import LONG, figure, wait_for


class Traffic:
    """Chats from a few threads until stopped: (started, seconds, ok) per request."""

    def __init__(self, fs: FaultStack, headers: dict[str, str], models: list[str], threads: int = 4) -> None:
        self.results: list[tuple[float, float, bool]] = []
        self.failures: list[str] = []  # what the first failed requests got
        self._stop = threading.Event()
        models = models * threads  # each thread starts at another model
        self._threads = [
            threading.Thread(
                target=self._run, args=(fs, headers, models[i % len(models) :] + models[: i % len(models)])
            )
            for i in range(threads)
        ]

    def _run(self, fs: FaultStack, headers: dict[str, str], models: list[str]) -> None:
        i = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                r = fs.chat(headers, models[i % len(models)], timeout=10)
                ok = r.status_code == 200
                if not ok:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as err:
                ok = False
                self.failures.append(repr(err))
            self.results.append((started, time.monotonic() - started, ok))
            i += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        return [r for r in self.results if start <= r[0] < end]


def success_rate(results: list[tuple[float, float, bool]]) -> float:
    assert results, "no requests in this window"
    return sum(ok for _, _, ok in results) / len(results)


def p99_ms(results: list[tuple[float, float, bool]]) -> float:
    took = sorted(s for _, s, _ in results)
    return 1000 * took[min(len(took) - 1, int(len(took) * 0.99))]


def hot(fs: FaultStack, headers: dict[str, str], names: list[str]) -> list[str]:
    """Upload the adapters and chat once through each: every one is resident somewhere."""
    models = []
    for name in names:
        r = fs.upload(headers, name)
        assert r.status_code == 201, r.text
        models.append(f"tiny-llama:{name}")
        assert fs.chat(headers, models[-1]).status_code == 200
    return models


def test_redis_killed_during_uploads_and_deletes_loses_no_acknowledged_adapter(fault_stack: FaultStack) -> None:
    """Random uploads and deletes from three clients while Redis is `kill -9`'d and restarted
    (AOF): every adapter whose upload was acknowledged and not deleted since is there after;
    every acknowledged delete stays deleted."""
    fs = fault_stack
    headers = fs.tenant("workload")
    kills = 6 if LONG else 2
    state: dict[str, bool | None] = {}  # name -> present (its last acknowledged operation); None: unknown
    ids: dict[str, str] = {}
    acknowledged = 0
    stop = threading.Event()
    lock = threading.Lock()

    def find(name: str) -> str | None:
        r = httpx.get(fs.url + "/v1/adapters", headers=headers, timeout=10)
        return next((a["id"] for a in r.json()["data"] if a["name"] == name), None) if r.status_code == 200 else None

    def operate(name: str, rng: random.Random) -> bool | None:
        """One upload or delete of `name`: whether it exists after, if acknowledged."""
        if state.get(name) and rng.random() < 0.5:
            r = httpx.delete(f"{fs.url}/v1/adapters/{ids[name]}", headers=headers, timeout=10)
            if r.status_code in (200, 404):
                return False
        else:
            r = fs.upload(headers, name, variant=str(rng.random()), timeout=10)
            if r.status_code == 201:
                ids[name] = r.json()["id"]
                return True
            if r.status_code == 409 and (found := find(name)):  # an unacknowledged upload did land
                ids[name] = found
                return True
        assert r.status_code in (409, 502, 503, 504), r.text  # Redis is away: fail fast, never a 500
        return None

    def client(names: list[str], seed: int) -> None:
        nonlocal acknowledged
        rng = random.Random(seed)
        while not stop.is_set():
            name = rng.choice(names)
            try:
                outcome = operate(name, rng)
            except httpx.HTTPError:
                outcome = None
            with lock:
                state[name] = outcome  # None: unknown until the next acknowledged operation
                acknowledged += outcome is not None

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, [f"c{c}-a{i}" for i in range(6)], c) for c in range(3)]
        for _ in range(kills):
            time.sleep(1.5)
            fs.redis.stop()  # SIGKILL
            time.sleep(random.uniform(0.2, 1.5))
            fs.redis.start()
        time.sleep(2)
        stop.set()
        for f in futures:
            f.result()

    listed: list[dict[str, Any]] = []

    def lists() -> bool:
        r = httpx.get(fs.url + "/v1/adapters", headers=headers, timeout=10)
        listed[:] = r.json()["data"] if r.status_code == 200 else []
        return r.status_code == 200

    wait_for(lists, 20, "the adapters could not be listed", every_s=0.2)
    present = {a["name"]: a["status"] for a in listed}
    lost = sorted(n for n, s in state.items() if s is True and present.get(n) != "ready")
    resurrected = sorted(n for n, s in state.items() if s is False and n in present)
    figure(
        f"acknowledged adapters lost after Redis kill -9 ({kills} kills, {acknowledged} acknowledged ops)", len(lost)
    )
    assert acknowledged > 10
    assert lost == [] and resurrected == []


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_with_redis_down_resident_adapters_keep_serving_and_writes_fail_fast(
    fault_stack: FaultStack, fault: str
) -> None:
    fs = fault_stack
    headers = fs.tenant(f"redis-{fault.lower()}")
    models = hot(fs, headers, ["r1", "r2"]) + ["tiny-llama"]
    down_s = 15 if LONG else 6
    with Traffic(fs, headers, models) as traffic:
        time.sleep(1)
        down = time.monotonic()
        if fault == "SIGSTOP":
            fs.redis.signal(signal.SIGSTOP)
        else:
            fs.redis.stop()
        try:
            started = time.monotonic()
            r = fs.upload(headers, "during-outage")
            write_s = time.monotonic() - started
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            time.sleep(max(0.0, down_s - (time.monotonic() - down)))
        finally:
            up = time.monotonic()
            if fault == "SIGSTOP":
                fs.redis.signal(signal.SIGCONT)
            else:
                fs.redis.start()
        recovered = wait_for(lambda: fs.upload(headers, "after-outage").status_code == 201, 30)
        time.sleep(1)
    rate = success_rate(traffic.window(down, up))
    figure(f"inference success rate with Redis down ({fault}, {down_s}s, resident adapters)", f"{rate:.1%}")
    figure(f"seconds for a write to fail with Redis down ({fault})", f"{write_s:.2f}")
    figure(f"seconds until writes succeed after Redis is back ({fault})", f"{recovered:.1f}")
    assert rate == 1.0, traffic.failures[:5]
    assert write_s < 8


def test_a_dead_worker_is_avoided_and_load_recovers(fault_stack: FaultStack) -> None:
    """Sustained traffic over several adapters on two workers; one worker (its engine and its
    agent) is `kill -9`'d, then comes back. Success rate and p99 before, during and after."""
    fs = fault_stack
    headers = fs.tenant("load")
    models = hot(fs, headers, [f"l{i}" for i in range(6)])
    holders = {fs.sim_url(i): set(fs.sim_state(i)["adapters"]) for i in range(2)}
    assert all(holders.values()), f"traffic should reach both workers: {holders}"
    phase_s = 10 if LONG else 4
    with Traffic(fs, headers, models, threads=6) as traffic:
        time.sleep(phase_s)
        killed = time.monotonic()
        fs.kill_sim(1)
        fs.stack.procs["agent-2"].kill()
        fs.stack.procs["agent-2"].wait()
        time.sleep(phase_s)
        back = time.monotonic()
        fs.start_sim(1)
        fs.stack.restart("agent-2")
        time.sleep(phase_s)
        end = time.monotonic()
    before, during, after = traffic.window(0, killed), traffic.window(killed, back), traffic.window(back, end)
    failed = [started for started, _, ok in during if not ok]
    avoided_s = (max(failed) - killed) if failed else 0.0
    for label, window in (("before", before), ("during", during), ("after", after)):
        figure(f"worker killed: success rate {label}", f"{success_rate(window):.2%} of {len(window)}")
        figure(f"worker killed: p99 ms {label}", f"{p99_ms(window):.0f}")
    figure("seconds until a dead worker is avoided (last failed request after the kill)", f"{avoided_s:.2f}")
    assert success_rate(before) == 1.0 and success_rate(after) == 1.0
    assert success_rate(during) >= 0.99 and avoided_s < 2.0
    wait_for(lambda: httpx.get(fs.url + "/readyz").json()["workers"] == 2, 30)
    fs.wait_connected()


def test_the_data_plane_killed_under_load_cancels_upstream_and_comes_back(fault_stack: FaultStack) -> None:
    fs = fault_stack
    headers = fs.tenant("dp-kill")
    (model,) = hot(fs, headers, ["d1"])
    body = slow_stream(model)
    streams = [
        httpx.stream("POST", fs.url + "/v1/chat/completions", headers=headers, json=body, timeout=30) for _ in range(4)
    ]
    for s in streams:
        s.__enter__()
    try:
        assert wait_for(lambda: sum(running(fs, i) for i in range(2)) == 4, 10) >= 0
        fs.stack.procs["dataplane"].kill()
        cancelled_s = wait_for(lambda: sum(running(fs, i) for i in range(2)) == 0, 10)
    finally:
        for s in streams:
            with contextlib.suppress(httpx.HTTPError):
                s.__exit__(None, None, None)
    fs.stack.procs["dataplane"].wait()
    fs.stack.restart("dataplane")
    serving_s = fs.wait_serving(headers, model, 30)
    figure("seconds until streams abandoned by a killed data plane are cancelled upstream", f"{cancelled_s:.2f}")
    figure("seconds from data plane restart to serving", f"{serving_s:.2f}")
    assert cancelled_s < 1.5


def slow_stream(model: str) -> dict[str, object]:
    """A streamed chat the simulator answers at 5 tokens a second: 40 s unless cancelled."""
    return {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 200,
            "sim_tokens_per_s": 5}  # fmt: skip


def running(fs: FaultStack, i: int) -> int:
    n = fs.sim_state(i)["running"]
    assert isinstance(n, int)
    return n


@pytest.mark.parametrize("component", ["controlplane", "agent"])
def test_resident_adapters_keep_serving_while_a_control_component_is_dead(
    fault_stack: FaultStack, component: str
) -> None:
    """The control plane or an agent `kill -9`'d under load: the data path does not depend on
    either; after the restart nothing is loaded again needlessly and cold placements work."""
    fs = fault_stack
    fs.wait_connected()  # both agents are back from the faults before
    headers = fs.tenant(f"{component}-kill")
    models = hot(fs, headers, ["k1", "k2", "k3"])
    # The agent's own worker must not load again what its vLLM kept; with the control plane
    # down neither worker may. (While an agent is away its worker looks dead: other workers load.)
    watched = [0] if component == "agent" else [0, 1]
    loads_before = sum(int(fs.sim_state(i)["loads"]) for i in watched)
    # An agent is restarted by its supervisor within the heartbeat timeout (3 s here), or its
    # worker counts as dead (test_a_dead_worker_is_avoided_and_load_recovers).
    down_s = 2 if component == "agent" else 10 if LONG else 4
    with Traffic(fs, headers, models) as traffic:
        time.sleep(0.5)
        down = time.monotonic()
        fs.stack.procs[component].kill()
        fs.stack.procs[component].wait()
        time.sleep(down_s)
        up = time.monotonic()
        fs.stack.restart(component)
        wait_for(lambda: httpx.get(fs.url + "/readyz").json()["workers"] == 2, 30)
        fs.wait_connected()
        time.sleep(1)
    rate = success_rate(traffic.window(down, up))
    reloads = sum(int(fs.sim_state(i)["loads"]) for i in watched) - loads_before
    r = fs.upload(headers, "cold-after")
    assert r.status_code == 201
    cold_s = wait_for(lambda: fs.chat(headers, "tiny-llama:cold-after").status_code == 200, 30)  # agents reconnect
    figure(f"inference success rate with the {component} dead ({down_s}s)", f"{rate:.1%}")
    figure(f"adapters loaded again after the {component} restarted", reloads)
    figure(f"seconds until a cold adapter is placed after the {component} restarted", f"{cold_s:.1f}")
    assert rate == 1.0 and reloads == 0, traffic.failures[:3]


def test_a_worker_that_died_with_the_control_plane_leaves_routing(fault_stack: FaultStack) -> None:
    """A whole worker node (engine and agent) and the control plane `kill -9`'d at once, the
    control plane restarted alone: nobody is left to see the worker's stream break, so its record
    still says healthy. The restarted control plane, which held it, marks it unhealthy as it
    starts (before it accepts agents: the worker registers again or stays out); meanwhile the
    other worker serves and takes cold adapters."""
    fs = fault_stack
    fs.wait_connected()
    headers = fs.tenant("node-lost")
    killed = time.monotonic()
    for component in ("controlplane", "agent-2"):
        fs.stack.procs[component].kill()
        fs.stack.procs[component].wait()
    fs.kill_sim(1)
    fs.stack.restart("controlplane")
    try:
        fs.wait_connected(agents=1)
        assert fs.upload(headers, "after-the-loss").status_code == 201
        wait_for(lambda: fs.chat(headers, "tiny-llama:after-the-loss").status_code == 200, 30)
        wait_for(lambda: httpx.get(fs.url + "/readyz").json()["workers"] == 1, 60)
        gone_s = time.monotonic() - killed
        figure("seconds until a worker that died with the control plane leaves routing", f"{gone_s:.0f}")
        assert gone_s < 15  # the restart and the other agent's reconnection, not an activity record's 30 s
    finally:
        fs.start_sim(1)
        fs.stack.restart("agent-2")
        fs.wait_connected()


def test_quota_races_admit_exactly_the_quota(fault_stack: FaultStack) -> None:
    """Tenants one slot short of their quota; N uploads race for the slot: one wins, the others
    are 429 and leave no bytes behind."""
    fs = fault_stack
    runs = 20 if LONG else 4
    exact = 0
    for run in range(runs):
        headers = fs.tenant(f"quota-{run}", tenant_pb2.TIER_SHARED)
        for i in range(QUOTA - 1):
            assert fs.upload(headers, f"q{i}").status_code == 201
        with ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(fs.upload, [headers] * 6, [f"race{i}" for i in range(6)], [f"{run}-{i}" for i in range(6)])
            )
        statuses = sorted(r.status_code for r in codes)
        listed = httpx.get(fs.url + "/v1/adapters", headers=headers).json()["data"]
        exact += statuses == [201] + [429] * 5 and len(listed) == QUOTA
        losers = {r.json()["error"]["message"] for r in codes if r.status_code == 429}
        assert all("at most" in m for m in losers), losers
    # Losers' bytes go at once; bytes of uploads whose record Redis never took (the kill -9
    # test above) go with the orphan sweep, a few seconds here.
    swept_s = wait_for(lambda: orphan_blobs(fs) == [], 20)
    figure(f"quota races admitting exactly the quota ({runs} runs of 6 uploads for 1 slot)", f"{exact}/{runs}")
    figure("seconds until no orphan blob is left (sweep every 2 s, 3 s grace)", f"{swept_s:.1f}")
    assert exact == runs


def orphan_blobs(fs: FaultStack) -> list[str]:
    """Blobs in the artifact store that no adapter record names."""
    import redis

    client = redis.Redis.from_url(fs.redis.url, decode_responses=True)
    named = {AdapterRecord.from_json(raw).sha256 for k in client.scan_iter(keys.adapter("*")) if (raw := client.get(k))}
    client.close()
    blobs = Path(fs.stack.config.data_dir) / "artifacts" / "blobs"
    return sorted(p.name for p in blobs.rglob("*") if p.is_file() and p.name not in named)


@pytest.mark.parametrize("what", ["headers", "json body", "upload body"])
def test_slow_clients_are_cut_off_on_time(fault_stack: FaultStack, what: str) -> None:
    """A client that trickles its request (one byte a second: never idle) or stops halfway gets
    a 408 and its connection closed, within the data plane's budget for that part."""
    fs = fault_stack
    log = Path(fs.stack.config.log_dir or "") / "dataplane.log"
    logged_before = log.read_text().count(" 408 ")
    key = fs.tenant(f"slow-{what.replace(' ', '-')}")["Authorization"].encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + key + b"\r\n"
    if what == "json body":
        head += b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    elif what == "upload body":
        head = head.replace(b"/v1/chat/completions", b"/v1/adapters/upload")
        head += b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n--B\r\n"
    with socket.create_connection(("127.0.0.1", fs.stack.config.http_port), timeout=30) as s:
        started = time.monotonic()
        s.sendall(head)
        s.setblocking(False)
        answer, answered_s = b"", 0.0
        while time.monotonic() - started < 20:
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
                answered_s = time.monotonic() - started
            except BlockingIOError:
                if what == "headers":
                    with contextlib.suppress(OSError):
                        s.send(b"X")  # one more header byte a second
                time.sleep(1 if what == "headers" else 0.05)
            except ConnectionResetError:
                break
        closed_s = time.monotonic() - started
    figure(
        f"seconds until a client trickling its {what} is answered 408 and cut off", f"{answered_s:.1f}, {closed_s:.1f}"
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert answered_s < SLOW_CLIENT_S + 1.5 and closed_s < SLOW_CLIENT_S + 2
    wait_for(lambda: log.read_text().count(" 408 ") == logged_before + 1, 5)  # its access line


def test_a_client_that_leaves_a_stream_has_it_cancelled_upstream(fault_stack: FaultStack) -> None:
    fs = fault_stack
    headers = fs.tenant("leaver")
    (model,) = hot(fs, headers, ["s1"])
    body = slow_stream(model)
    took = []
    for _ in range(5 if LONG else 2):
        with httpx.stream("POST", fs.url + "/v1/chat/completions", headers=headers, json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            next(line for line in lines if line.startswith("data: {"))
            wait_for(lambda: sum(running(fs, i) for i in range(2)) == 1, 3)
        took.append(wait_for(lambda: sum(running(fs, i) for i in range(2)) == 0, 5))
    figure("seconds until a stream the client left is cancelled upstream (worst)", f"{max(took):.2f}")
    assert max(took) < 1.0


def test_an_upload_cut_off_by_a_dying_control_plane_leaves_nothing(fault_stack: FaultStack) -> None:
    """The control plane `kill -9`'d while an upload streams through it: the client gets an
    error, never a half adapter; after the restart the name and quota are free and the dead
    process's staged bytes are gone."""
    fs = fault_stack
    headers = fs.tenant("cut-off", tenant_pb2.TIER_SHARED)
    data = os.urandom(6 << 20)  # never finished: need not be an adapter
    boundary = "cutoff"
    head = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in (("name", "half"), ("base_model", "tiny-llama"))
        )
        + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    )
    staging = Path(fs.stack.config.data_dir) / "artifacts" / "tmp"
    sent = threading.Event()

    def body() -> Iterator[bytes]:
        yield head.encode()
        for i in range(0, len(data), 256 << 10):
            if i >= (3 << 20):
                sent.set()  # past the data plane's 1 MiB batches: the control plane holds bytes
                time.sleep(0.3)
            yield data[i : i + (256 << 10)]
        yield f"\r\n--{boundary}--\r\n".encode()

    def client() -> int:
        form = {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        try:
            return httpx.post(fs.url + "/v1/adapters/upload", headers=form, content=body(), timeout=30).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(1) as pool:
        status = pool.submit(client)
        assert sent.wait(20)
        wait_for(lambda: any(p.stat().st_size > 0 for p in staging.rglob("upload-*")), 10)
        half_written = [p for p in staging.rglob("upload-*") if p.stat().st_size > 0]
        fs.stack.procs["controlplane"].kill()
        fs.stack.procs["controlplane"].wait()
        assert status.result() in (0, 502, 503), status.result()
    fs.stack.restart("controlplane")
    wait_for(lambda: httpx.get(fs.url + "/v1/adapters", headers=headers).status_code == 200, 30)
    listed = httpx.get(fs.url + "/v1/adapters", headers=headers).json()["data"]
    left = [p for p in half_written if p.exists()]
    figure("half-written uploads left after the control plane was killed mid-upload and restarted", len(left))
    assert listed == [] and half_written and left == []
    for i in range(QUOTA):  # the whole quota is free, the name too
        assert fs.upload(headers, "half" if i == 0 else f"after-{i}").status_code == 201
    fs.wait_connected()
    assert fs.chat(headers, "tiny-llama:half").status_code == 200


def test_redis_back_empty_evicts_nothing(fault_stack: FaultStack) -> None:
    """Redis restarted with no data (its files lost): the control plane notices, the agents
    re-register, and no worker evicts what it holds; the fleet is routable again."""
    fs = fault_stack
    headers = fs.tenant("empty")
    hot(fs, headers, ["e1", "e2"])
    held = [set(fs.sim_state(i)["adapters"]) for i in range(2)]
    blobs = Path(fs.stack.config.data_dir) / "artifacts" / "blobs"
    stored = sorted(p.name for p in blobs.rglob("*") if p.is_file())
    fs.redis.stop()
    for f in fs.redis.directory.rglob("*"):
        if f.is_file():
            f.unlink()
    fs.redis.start()
    wait_for(lambda: httpx.get(fs.url + "/readyz").json()["workers"] == 2, 30)
    time.sleep(6)  # heartbeats, reconciles and orphan sweeps (every 2 s, 3 s grace) more
    after = [set(fs.sim_state(i)["adapters"]) for i in range(2)]
    evicted = sum(len(h - a) for h, a in zip(held, after, strict=True))
    deleted = len(set(stored) - {p.name for p in blobs.rglob("*") if p.is_file()})
    figure("adapters evicted, blobs deleted after Redis came back empty", f"{evicted}, {deleted}")
    assert evicted == 0 and deleted == 0
    assert "Redis lost its data" in logs(fs.stack)
    # The operator's next step (restore from a backup or re-create): a new tenant works at once.
    again = fs.tenant("after-empty")
    assert hot(fs, again, ["n1"])
