"""The vLLM simulator the fault tests run as workers' engines must refuse what vLLM refuses, and
schedule as vLLM does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import start_simulator, wait_for
from tests.vllmsim import SimConfig, create_app
from workeragent.vllm import parse_activity


async def test_concurrent_loads_never_take_more_slots_than_max_loras() -> None:
    app = create_app(SimConfig(max_loras=2, load_ms_base=50))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as sim:
        answers = await asyncio.gather(
            *(sim.post("/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": "/none"}) for i in range(4))
        )
        assert sorted(r.status_code for r in answers) == [200, 200, 400, 400]
        assert len((await sim.get("/sim/state")).json()["adapters"]) == 2


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
