"""A vLLM that says it unloaded but keeps the slot (THREATS.md: "vLLM unload does not free the
slot"), through the real data plane and control plane with two workers whose agents run vLLM
simulators: the first worker's unloads leak their slots until it looks half empty but is full.
A request for a cold adapter then gets its 200 (the placer's load on the leaking worker fails,
and the next worker takes it); the leaking worker finishes the request it was streaming, is
recycled, serves again with every slot free, and gets its adapters back; no request fails
meanwhile."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from loraplane import tinymodel
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import tenant_pb2
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.stack import BASE_MODEL, Stack, WorkerSpec
from tests.conftest import running_stack
from tests.support import ROOT, figure, free_port, lora_tensors, metric, safetensors_bytes, scrape, wait_for
from tests.support import with_metadata as variant
from workeragent.engine import Group

SLOTS = 3  # LoRA slots per worker: the catalog's, so the simulators' --max-loras
LEAKING, OTHER = f"embedded-{BASE_MODEL}", f"embedded-{BASE_MODEL}-2"
ADAPTER = safetensors_bytes(lora_tensors(rank=4))


@dataclass
class LeakStack:
    stack: Stack
    headers: dict[str, str] = field(default_factory=dict)

    def sim_url(self, worker: str) -> str:
        port = self.stack.config.vllm_port if worker == LEAKING else self.stack.config.extra_workers[0].vllm_port
        return f"http://127.0.0.1:{port}"

    def sim(self, worker: str) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.sim_url(worker) + "/sim/state", timeout=5).json()
        return state

    def group(self, worker: str) -> Group | None:
        cache = "agent-cache" if worker == LEAKING else "agent-cache-2"
        try:
            return Group.decode((self.stack.config.data_dir / cache / "vllm.pid").read_text())
        except FileNotFoundError:
            return None

    def worker(self, worker: str) -> pb.Worker:
        found: pb.Worker = next(w for w in self.stack.operator().list_workers().workers if w.worker_id == worker)
        return found

    def agent_metric(self, worker: str, name: str, **labels: str) -> float:
        agent = "agent" if worker == LEAKING else "agent-2"
        return metric([scrape(self.stack.metrics_urls[agent])], name, **labels)

    def upload(self, name: str) -> str:
        r = httpx.post(
            self.stack.http_url + "/v1/adapters/upload",
            headers=self.headers,
            data={"name": name, "base_model": BASE_MODEL},
            files={"file": ("adapter_model.safetensors", variant(ADAPTER, {"variant": name}))},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        adapter_id: str = r.json()["id"]
        return adapter_id

    def chat(self, model: str, timeout: float = 30) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return httpx.post(self.stack.http_url + "/v1/chat/completions", headers=self.headers, json=body,
                          timeout=timeout)  # fmt: skip

    def stream(self, model: str, tokens: int, per_s: float) -> str:
        """A streamed chat, whole: its content."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
                "stream": True, "sim_tokens_per_s": per_s}  # fmt: skip
        content, done = [], False
        url = self.stack.http_url + "/v1/chat/completions"
        with httpx.stream("POST", url, headers=self.headers, json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    content.append(choices[0].get("delta", {}).get("content") or "")
        assert done, "the stream was cut off"
        return "".join(content)


@pytest.fixture(scope="module")
def leak_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeakStack]:
    tmp = tmp_path_factory.mktemp("leak-stack")
    catalog = tmp / "catalog.json"  # the stack's own says 8 slots a worker
    Catalog.write(catalog, [{"name": BASE_MODEL, "kind": "chat", "path": str(tmp / "data" / "models" / BASE_MODEL),
                             "lora": True, "architecture": dict(tinymodel.DIMENSIONS), "max_rank": 64,
                             "max_adapters_per_worker": SLOTS}])  # fmt: skip
    env = (
        ("LORAPLANE_VLLM_COMMAND", f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'}"),  # each agent runs its own
        ("LORAPLANE_CATALOG", str(catalog)),
        ("LORAPLANE_HEARTBEAT_S", "0.5"),
        ("LORAPLANE_DRAIN_TIMEOUT_S", "20"),
    )
    for stack in running_stack(tmp, with_worker=True, env=env, extra_workers=(WorkerSpec(free_port()),)):
        s = LeakStack(stack)
        key = stack.operator().create_tenant("leak", tenant_pb2.TIER_RESERVED).api_key
        s.headers = {"Authorization": f"Bearer {key}"}
        yield s


class Traffic:
    """Chats from a thread until stopped, each answer counted by status."""

    def __init__(self, s: LeakStack, models: list[str]) -> None:
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(s, models), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self, s: LeakStack, models: list[str]) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.counts[str(s.chat(models[i % len(models)]).status_code)] += 1
            except httpx.HTTPError as err:
                self.counts[type(err).__name__] += 1
            i += 1
            time.sleep(0.05)


def test_a_worker_whose_slots_leaked_is_recycled_without_a_failed_request(leak_stack: LeakStack) -> None:
    s = leak_stack
    op = s.stack.operator()
    held, leaked, other_1, other_2 = (s.upload(n) for n in ("held", "leaked", "other-1", "other-2"))
    op.force_load(held, LEAKING)
    assert httpx.post(s.sim_url(LEAKING) + "/sim/leak", json={"unloads": SLOTS - 1}, timeout=5).status_code == 200
    for _ in range(SLOTS - 1):  # loaded and unloaded through the agent, its slot kept each time
        op.force_load(leaked, LEAKING)
        op.force_evict(leaked, LEAKING)
    op.force_load(other_1, OTHER)
    op.force_load(other_2, OTHER)
    # The leaking worker lists 1 adapter (all its slots taken): the emptiest, to the placer.
    assert (s.sim(LEAKING)["adapters"], s.sim(LEAKING)["leaked"]) == ([held], SLOTS - 1)
    assert s.sim(OTHER)["adapters"] == sorted([other_1, other_2])
    cold = s.upload("cold")
    group = s.group(LEAKING)

    with Traffic(s, [BASE_MODEL, f"{BASE_MODEL}:other-1"]) as traffic, ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(s.stream, f"{BASE_MODEL}:held", 15, 5.0)  # 3 s, on the leaking worker
        wait_for(lambda: s.sim(LEAKING)["running"] == 1, 10, "the stream did not start on the leaking worker")
        sent = time.monotonic()
        answer = s.chat(f"{BASE_MODEL}:cold")
        answered = time.monotonic() - sent
        assert answer.status_code == 200, answer.text
        wait_for(lambda: s.worker(LEAKING).engine_state == "recycling", 5, "the worker was not reported recycling")
        assert streaming.result() == "tok " * 15  # whole: the worker drained before it went
        drained = time.monotonic() - sent

        def serving_again() -> bool:
            w = s.worker(LEAKING)
            return w.healthy and w.engine_state == "serving" and s.group(LEAKING) not in (None, group)

        wait_for(serving_again, 30, "the recycled worker does not serve again")
        serving = time.monotonic() - sent
        wait_for(lambda: s.sim(LEAKING)["adapters"] == [held], 30, "its adapter was not loaded back")
        reloaded = time.monotonic() - sent
        assert s.chat(f"{BASE_MODEL}:held").status_code == 200
    failed = sum(n for status, n in traffic.counts.items() if status != "200")

    figure("leaked LoRA slots: cold request answered in (s)", f"{answered:.2f}")
    figure("leaked LoRA slots: seconds until drained / serving again / adapters back",
           f"{drained:.1f} / {serving:.1f} / {reloaded:.1f}")  # fmt: skip
    figure("leaked LoRA slots: requests meanwhile ok / failed", f"{traffic.counts['200']} / {failed}")
    assert failed == 0, traffic.counts
    assert cold in s.sim(OTHER)["adapters"]  # the next worker took it
    assert s.sim(LEAKING)["leaked"] == 0
    w = s.worker(LEAKING)
    assert (w.engine_restarts, w.engine_last_error.startswith("LoRA slots leaked")) == (1, True)
    assert s.agent_metric(LEAKING, "loraplane_worker_slot_leaks_total") == 1
    assert s.agent_metric(LEAKING, "loraplane_worker_engine_restarts_total", reason="recycled") == 1
    assert s.agent_metric(OTHER, "loraplane_worker_slot_leaks_total") == 0
    assert s.worker(OTHER).engine_restarts == 0
