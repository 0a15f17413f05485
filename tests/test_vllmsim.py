"""The vLLM simulator the fault tests run as workers' engines must refuse what vLLM refuses, and
schedule as vLLM does."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, start_simulator, wait_for
from tests.vllmsim import SimConfig, create_app
from workeragent.vllm import parse_activity


async def test_concurrent_loads_never_take_more_slots_than_max_loras() -> None:
    """As vLLM's LRU caches do: every load succeeds, each the most recently used, and the least
    recently used leave the slots and host memory (still listed: vLLM's API server knows them)."""
    app = create_app(SimConfig(max_loras=2, load_ms_base=50))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as sim:
        answers = await asyncio.gather(
            *(sim.post("/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": "/none"}) for i in range(4))
        )
        assert [r.status_code for r in answers] == [200] * 4
        state = (await sim.get("/sim/state")).json()
        assert len(state["active"]) == 2 and state["host"] == state["active"]  # max_cpu_loras: max_loras
        assert state["adapters"] == ["a0", "a1", "a2", "a3"] and state["max_cpu_loras"] == 2


def sim_client(**config: Any) -> httpx.AsyncClient:
    app = create_app(SimConfig(**config))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


async def timed(sim: httpx.AsyncClient, model: str, stream: bool = False) -> float:
    """Seconds a one-token completion for `model` takes, whole."""
    started = time.monotonic()
    r = await sim.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1, "stream": stream})
    assert r.status_code == 200, r.text
    return time.monotonic() - started


async def swap_ins(sim: httpx.AsyncClient) -> float:
    """The simulator's count of swap-ins, from its /metrics page."""
    page = (await sim.get("/metrics")).text
    (value,) = [s.value for f in text_string_to_metric_families(page) for s in f.samples
                if s.name == "vllmsim:lora_swap_ins_total"]  # fmt: skip
    return value


async def load(sim: httpx.AsyncClient, name: str) -> None:
    r = await sim.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "/none"})
    assert r.status_code == 200, r.text


def test_max_cpu_loras_below_max_loras_is_refused_as_vllm_refuses_it() -> None:
    with pytest.raises(ValueError, match=re.escape("max_cpu_loras (1) must be >= max_loras (2).")):
        SimConfig(max_loras=2, max_cpu_loras=1)
    assert SimConfig(max_loras=2).host_capacity == 2  # vLLM's default: as many as the slots
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "vllmsim.py"), "--max-loras", "2", "--max-cpu-loras",
                          "1"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 2 and "max_cpu_loras (1) must be >= max_loras (2)." in run.stderr


async def test_a_request_for_an_adapter_not_in_a_slot_waits_for_its_swap_in_and_is_counted() -> None:
    """One slot, three adapters in host memory: a request for the active adapter (or the base
    model) runs at once; one for an adapter in host memory waits --swap-in-ms and takes the slot,
    counted in /metrics; the next for it runs at once."""
    async with sim_client(max_loras=1, max_cpu_loras=3, swap_in_ms=300, load_ms_base=0) as sim:
        for name in ("a", "b"):
            await load(sim, name)  # a load takes a slot: b's
        assert await swap_ins(sim) == 0
        assert await timed(sim, "b") < 0.2 and await timed(sim, "tiny-llama") < 0.2
        assert await swap_ins(sim) == 0

        assert await timed(sim, "a") >= 0.3  # swapped in, b out of the slot
        assert await swap_ins(sim) == 1
        state = (await sim.get("/sim/state")).json()
        assert (state["active"], state["host"], state["swap_ins"]) == (["a"], ["b", "a"], 1)
        assert await timed(sim, "a") < 0.2
        assert await timed(sim, "b", stream=True) >= 0.3  # a stream waits for its swap-in too
        assert await swap_ins(sim) == 2
        page = (await sim.get("/metrics")).text
        assert 'max_lora="1"' in page  # the slots, as vLLM says them


async def test_a_load_past_max_cpu_loras_drops_the_least_recently_used_from_host_memory() -> None:
    """As vLLM's CPU LoRA cache does: the least recently used (a request uses it) leaves host
    memory and its slot, stays listed, and a request for it loads it again from its path."""
    async with sim_client(max_loras=1, max_cpu_loras=2, swap_in_ms=100, load_ms_base=200) as sim:
        await load(sim, "a")
        await load(sim, "b")
        assert await timed(sim, "a") >= 0.1  # swapped in: now b is the least recently used
        await load(sim, "c")
        state = (await sim.get("/sim/state")).json()
        assert (state["host"], state["active"], state["reloads"]) == (["a", "c"], ["c"], 0)
        listed = [m["id"] for m in (await sim.get("/v1/models")).json()["data"] if m["parent"]]
        assert sorted(listed) == ["a", "b", "c"]

        assert await timed(sim, "b") >= 0.3  # loaded again (200 ms), then swapped in (100 ms)
        state = (await sim.get("/sim/state")).json()
        assert (state["host"], state["active"], state["reloads"], state["swap_ins"]) == (["c", "b"], ["b"], 1, 2)


@pytest.fixture
def two_seqs() -> Iterator[str]:
    """A simulator running at most 2 requests at once: its URL."""
    sim, url, _ = start_simulator("tiny-llama", "--max-num-seqs", "2")
    try:
        yield url
    finally:
        sim.terminate()
        sim.wait(10)


def state(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(url + "/sim/state", timeout=5).json()
    return body


async def until_counted(url: str, requests: int) -> None:
    """Until the simulator counts `requests` running or waiting (polled from a thread: the
    requests in flight run on this loop)."""

    def counted() -> bool:
        s = state(url)
        return bool(s["running"] + s["waiting"] == requests)

    await asyncio.to_thread(wait_for, counted, 10, f"the simulator never counted {requests} requests")


async def test_max_num_seqs_runs_that_many_and_queues_the_rest_first_come_first_served(two_seqs: str) -> None:
    """Four streams on 2 slots: the first two start at once; the third takes the first slot
    freed (by the short first stream), the fourth the next (not the third's: it came later);
    a waiting stream's first token comes only once it runs. vLLM's metrics count them, and the
    waiting adapter is in `waiting_lora_adapters` as the agent reads it."""
    async with httpx.AsyncClient(base_url=two_seqs, timeout=30) as client:
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "/none"})
        assert loaded.status_code == 200
        first: dict[int, float] = {}
        done: dict[int, float] = {}

        async def stream(i: int, model: str, tokens: int) -> None:
            body = {"model": model, "prompt": f"p{i}", "max_tokens": tokens, "stream": True, "sim_tokens_per_s": 20}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first.setdefault(i, time.monotonic())
            done[i] = time.monotonic()

        tasks = []
        # 20 tokens a second: the first stream takes 1 s, the second and third 3 s
        for i, (model, tokens) in enumerate([("tiny-llama", 20), ("tiny-llama", 60), ("tiny-llama", 60), ("a1", 4)]):
            tasks.append(asyncio.create_task(stream(i, model, tokens)))
            await until_counted(two_seqs, i + 1)  # each in the queue before the next is sent

        s = state(two_seqs)
        assert (s["running"], s["waiting"], s["max_num_seqs"]) == (2, 2, 2)
        page = (await client.get("/metrics")).text
        _, adapters, running, waiting = parse_activity(page)
        assert (running, waiting, adapters) == (2.0, 2.0, ",a1")  # running: none; waiting: a1
        await asyncio.gather(*tasks)

    assert first[1] < done[0]  # the first two at once
    assert first[2] >= done[0]  # once the first stream gave its slot up
    assert first[3] >= min(done[1], done[2])  # the next slot, not the first one: it came after the third
    assert first[3] - first[2] > 1
    s = state(two_seqs)
    assert (s["running"], s["waiting"]) == (0, 0)


async def test_a_request_whose_client_leaves_while_it_waits_leaves_the_queue(two_seqs: str) -> None:
    """A non-streamed request (taking no time: it would be answered at once were a slot free)
    waits for a slot; its client gives up; the queue forgets it and the next request runs as
    soon as a slot is free."""
    async with httpx.AsyncClient(base_url=two_seqs, timeout=30) as client:
        long = {"model": "tiny-llama", "prompt": "hold", "max_tokens": 60, "stream": True, "sim_tokens_per_s": 20}
        started = time.monotonic()
        holders = []
        for i in range(2):
            holders.append(asyncio.create_task(client.post("/v1/completions", json=long)))
            await until_counted(two_seqs, i + 1)
        instant = {"model": "tiny-llama", "prompt": "x", "max_tokens": 1}
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=instant, timeout=0.5)
        await asyncio.to_thread(wait_for, lambda: state(two_seqs)["waiting"] == 0, 10, "the request stayed queued")
        assert state(two_seqs)["running"] == 2
        answer = await client.post("/v1/completions", json=instant)  # waits for the first slot freed
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "tok"
        assert time.monotonic() - started > 2.5  # the holders take 3 s
        for r in await asyncio.gather(*holders):
            assert r.status_code == 200
    s = state(two_seqs)
    assert (s["running"], s["waiting"]) == (0, 0)


async def test_an_unload_that_leaks_answers_success_and_keeps_the_slot() -> None:
    """As the vLLM bug class does: the adapter leaves /v1/models, its slot stays taken, and loads
    are refused for lack of a free slot while fewer than max_loras adapters are listed."""
    app = create_app(SimConfig(max_loras=2, load_ms_base=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as sim:

        async def load(name: str) -> httpx.Response:
            return await sim.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "/none"})

        async def listed() -> list[str]:
            return [m["id"] for m in (await sim.get("/v1/models")).json()["data"] if m["parent"]]

        assert (await sim.post("/sim/leak", json={"unloads": "all"})).status_code == 400
        assert (await sim.post("/sim/leak", json={"unloads": 1})).json() == {"leak_unloads": 1, "leaked": 0}
        assert (await load("a0")).status_code == 200
        unloaded = await sim.post("/v1/unload_lora_adapter", json={"lora_name": "a0"})
        assert unloaded.status_code == 200 and unloaded.text.startswith("Success")
        assert await listed() == []
        assert (await load("a1")).status_code == 200
        refused = await load("a2")
        assert refused.status_code == 400 and "no free LoRA slot" in refused.text
        assert await listed() == ["a1"]
        state = (await sim.get("/sim/state")).json()
        assert (state["leaked"], state["leak_unloads"]) == (1, 0)
        # only the next N unloads leak: this one frees its slot
        assert (await sim.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})).status_code == 200
        assert (await load("a2")).status_code == 200
        assert (await sim.get("/sim/state")).json()["leaked"] == 1


def test_leak_unloads_minus_one_leaks_every_unload_until_the_process_restarts() -> None:
    sim, url, port = start_simulator("tiny-llama", "--max-loras", "2", "--leak-unloads", "-1")
    try:
        assert state(url)["leak_unloads"] == -1
        for i in range(2):
            name = {"lora_name": f"a{i}", "lora_path": "/none"}
            assert httpx.post(url + "/v1/load_lora_adapter", json=name, timeout=5).status_code == 200
            assert httpx.post(url + "/v1/unload_lora_adapter", json=name, timeout=5).status_code == 200
        refused = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/none"}, timeout=5)
        assert refused.status_code == 400
        assert (state(url)["leaked"], state(url)["adapters"]) == (2, [])
    finally:
        sim.terminate()
        sim.wait(10)
    sim, url, _ = start_simulator("tiny-llama", "--max-loras", "2", port=port)
    try:
        assert state(url)["leaked"] == 0
        loaded = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/none"}, timeout=5)
        assert loaded.status_code == 200
    finally:
        sim.terminate()
        sim.wait(10)
