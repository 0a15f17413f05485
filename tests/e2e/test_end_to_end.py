"""Two tenants upload adapters and chat through loraplane: real Redis, control plane,
agent, vLLM (CPU build) and data plane, driven by the real OpenAI client."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from loraplane import devadapter
from loraplane.controlplane.v1 import tenant_pb2
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.stack import Stack
from tests.conftest import (
    REPLICATE_AT_IN_FLIGHT,
    SECOND_WORKER_MAX_RANK,
    curl_upload,
    grpc_upload,
    new_tenant,
    upload,
)
from tests.reference import openai_clients, reference, reference_logprob
from tests.support import LONG, figure, lora_tensors, metric, safetensors_bytes, scrape, wait_for, with_metadata
from workeragent.engine import Group, members

PROMPT = "hello"
MAX_TOKENS = 16
# Between the requests that keep coming while a vLLM restarts: a steady stream, not a busy loop
# that takes the cores the restarting engine needs (on 2 cores a restart took 134 s under one).
PACE_S = 0.5


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, full_stack: Stack) -> dict[str, Path]:
    base = full_stack.config.data_dir / "models" / "tiny-llama"
    out = tmp_path_factory.mktemp("adapters")
    return {
        # alpha = rank: what an upload without a config assumes.
        "a": devadapter.train(base, out / "a", "red apple river", seed=0),
        # alpha 16 at rank 8: only right if the uploaded config is honoured.
        "b": devadapter.train(base, out / "b", "blue moon star", rank=8, lora_alpha=16, seed=1),
    }


@pytest.fixture(autouse=True)
def healthy_worker(full_stack: Stack) -> None:
    """Each test starts with every component up and the worker serving, even if an earlier
    test that kills components failed half-way."""
    for name in ("controlplane", "controlplane-2", *full_stack.agents, "dataplane"):
        if full_stack.procs[name].poll() is not None:
            full_stack.restart(name)
    wait_for(lambda: _serving(full_stack), 120, "no healthy worker", every_s=0.2)


def _serving(stack: Stack) -> bool:
    try:
        workers = stack.operator(timeout=2).list_workers().workers
    except grpc.RpcError:  # a control plane still starting
        return False
    return sum(w.healthy for w in workers) == len(stack.agents)


W1, W2 = "embedded-tiny-llama", "embedded-tiny-llama-2"  # agent (first replica), agent-2 (second)


def _empty_workers(stack: Stack) -> None:
    op = stack.operator()
    for w in op.list_workers().workers:
        for adapter_id in w.resident_adapter_ids:
            op.force_evict(adapter_id)


def _holders(stack: Stack, adapter_id: str) -> set[str]:
    return {w.worker_id for w in stack.operator().list_workers().workers if adapter_id in w.resident_adapter_ids}


@pytest.fixture
def openai_client(full_stack: Stack) -> Iterator[Callable[[str], openai.OpenAI]]:
    yield from openai_clients(full_stack)


def say(client: openai.OpenAI, model: str) -> ChatCompletion:
    """A short request, for when only which adapter serves matters."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_two_tenants_chat_with_their_own_adapters(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI], tmp_path: Path
) -> None:
    key_a, key_b = new_tenant(full_stack, "tenant-a"), new_tenant(full_stack, "tenant-b")

    # Tenant A: the documented curl call, as written.
    (tmp_path / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
    assert curl_upload(full_stack, key_a, tmp_path)["status"] == "ready"

    # Tenant B: same adapter name, other weights, with its PEFT config.
    r = upload(
        full_stack,
        key_b,
        "my-finetuned-v3",
        (adapters["b"] / "adapter_model.safetensors").read_bytes(),
        config=(adapters["b"] / "adapter_config.json").read_bytes(),
    )
    assert r.status_code == 201 and r.json()["lora_alpha"] == 16.0, r.text

    client_a = openai_client(key_a)
    client_b = openai_client(key_b)

    # The documented OpenAI call, as written.
    documented = client_a.chat.completions.create(
        model="tiny-llama:my-finetuned-v3", messages=[{"role": "user", "content": "hello"}]
    )
    assert documented.model == "tiny-llama:my-finetuned-v3"

    def chat(client: openai.OpenAI, model: str) -> str:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=MAX_TOKENS
        )
        assert resp.model == model
        return resp.choices[0].message.content or ""

    base_out = chat(client_a, "tiny-llama")
    out_a = chat(client_a, "tiny-llama:my-finetuned-v3")
    out_b = chat(client_b, "tiny-llama:my-finetuned-v3")
    # tiny-llama's generation config defaults to top_k 1: the documented call answers greedily too.
    assert documented.choices[0].message.content == out_a

    # (a) base and adapter outputs differ; so do the two tenants' same-named adapters.
    assert len({base_out, out_a, out_b}) == 3, (base_out, out_a, out_b)
    # (b) each adapter's output is what transformers + PEFT compute.
    base_dir = full_stack.config.data_dir / "models" / "tiny-llama"
    assert out_a == reference(base_dir, adapters["a"], PROMPT, MAX_TOKENS)
    assert out_b == reference(base_dir, adapters["b"], PROMPT, MAX_TOKENS)
    # (c) tenant B cannot reach tenant A's adapter, by name or by id.
    adapter_a = client_a.get("/adapters", cast_to=object)["data"][0]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client_b.chat.completions.create(
            model=f"tiny-llama:{adapter_a['id']}", messages=[{"role": "user", "content": "x"}]
        )
    assert (
        httpx.get(
            f"{full_stack.http_url}/v1/adapters/{adapter_a['id']}", headers={"Authorization": f"Bearer {key_b}"}
        ).status_code
        == 404
    )


def test_an_rslora_adapter_answers_as_peft_computes_it(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI], tmp_path: Path
) -> None:
    """Adapter b's tensors declared rsLoRA with alpha 1 (scaling 1 / sqrt(8), where b's own
    config scales by 16 / 8): loraplane's greedy answer is transformers + PEFT's for that
    adapter, and the same as the plain adapter PEFT defines as the same function (alpha sqrt(r))."""
    rs = tmp_path / "rs"
    shutil.copytree(adapters["b"], rs)
    config = json.loads((rs / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    (rs / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True, "lora_alpha": 1}))
    tensors = (rs / "adapter_model.safetensors").read_bytes()
    key = new_tenant(full_stack, "rslora")
    r = upload(full_stack, key, "rs", tensors, config=(rs / "adapter_config.json").read_bytes())
    assert r.status_code == 201, r.text
    twin = json.dumps(config | {"lora_alpha": math.sqrt(8)}).encode()
    assert upload(full_stack, key, "twin", with_metadata(tensors, {"twin": "1"}), config=twin).status_code == 201
    client = openai_client(key)

    def chat(model: str) -> str:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=MAX_TOKENS
        )
        return resp.choices[0].message.content or ""

    base_dir = full_stack.config.data_dir / "models" / "tiny-llama"
    answer = chat("tiny-llama:rs")
    assert answer == reference(base_dir, rs, PROMPT, MAX_TOKENS)
    assert chat("tiny-llama:twin") == answer
    # The adapter answers "blue" at any of these scalings; the first token's log-probability tells
    # them apart: served = PEFT's with the flag, and far from PEFT's without it (scaling 1 / 8).
    dropped = tmp_path / "dropped"
    shutil.copytree(adapters["b"], dropped)
    (dropped / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 1}))
    first = client.chat.completions.create(
        model="tiny-llama:rs", messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=1,
        logprobs=True,
    )  # fmt: skip
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.content
    served = first.choices[0].logprobs.content[0].logprob
    expected, without = reference_logprob(base_dir, rs, PROMPT), reference_logprob(base_dir, dropped, PROMPT)
    assert served == pytest.approx(expected, abs=1e-3)
    assert abs(expected - without) > 100 * 1e-3, (expected, without)


def test_streaming_and_text_completions_echo_the_model(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "streamer")
    r = upload(full_stack, key, "s1", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    assert r.status_code == 201
    client = openai_client(key)

    # A cold adapter: the first token arrives after placement + hot-load.
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="tiny-llama:s1",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        temperature=0.0,
        max_tokens=MAX_TOKENS,
    )
    chunks, first_token_s = [], None
    for chunk in stream:
        assert chunk.model == "tiny-llama:s1"
        if chunk.choices and chunk.choices[0].delta.content:
            first_token_s = first_token_s or time.monotonic() - started
            chunks.append(chunk.choices[0].delta.content)
    assert len(chunks) >= 2 and "".join(chunks) == "red apple river"
    assert first_token_s is not None
    print(f"\ncold adapter: request -> first token {first_token_s * 1000:.0f} ms")

    text = client.completions.create(
        model="tiny-llama:s1", prompt="<|user|>\nhello</s>\n<|assistant|>\n", temperature=0.0, max_tokens=MAX_TOKENS
    )
    assert text.model == "tiny-llama:s1" and text.choices[0].text == "red apple river"
    text_stream = list(client.completions.create(model="tiny-llama", prompt="hello", stream=True, max_tokens=4))
    assert text_stream and all(c.model == "tiny-llama" for c in text_stream)


def test_usage_is_what_the_real_worker_reported(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    """Real vLLM's usage, metered: whole answers, a stream that asked for usage and the same
    greedy stream that did not (its usage never reaches the client, and is still counted), a
    text completion; the usage API's totals are the sum, token for token (cached tokens: at least
    what the client saw; the silent stream's it cannot know)."""
    key = new_tenant(full_stack, "usage-metered")
    assert upload(full_stack, key, "u1", (adapters["a"] / "adapter_model.safetensors").read_bytes()).status_code == 201
    client = openai_client(key)
    since = int(time.time())
    reported = {"input_tokens": 0, "output_tokens": 0, "input_cached_tokens": 0, "num_model_requests": 0}

    def add(prompt: int, completion: int, cached: int) -> None:
        for name, n in (("input_tokens", prompt), ("output_tokens", completion), ("input_cached_tokens", cached),
                        ("num_model_requests", 1)):  # fmt: skip
            reported[name] += n

    messages: Any = [{"role": "user", "content": "tell me about the " + "long " * 40 + "river"}]
    for _ in range(2):  # the second may be served from the prefix cache: vLLM says how much
        a = client.chat.completions.create(model="tiny-llama:u1", messages=messages, temperature=0.0, max_tokens=8)
        assert a.usage is not None
        details = a.usage.prompt_tokens_details
        add(a.usage.prompt_tokens, a.usage.completion_tokens, (details.cached_tokens or 0) if details else 0)
    chunks = list(client.chat.completions.create(model="tiny-llama:u1", messages=messages, temperature=0.0,
                                                 max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    usage = chunks[-1].usage
    assert usage is not None and all(c.usage is None for c in chunks[:-1])
    details = usage.prompt_tokens_details
    add(usage.prompt_tokens, usage.completion_tokens, (details.cached_tokens or 0) if details else 0)
    silent = list(client.chat.completions.create(model="tiny-llama:u1", messages=messages, temperature=0.0,
                                                 max_tokens=8, stream=True))  # fmt: skip
    assert all(c.usage is None for c in silent)
    add(usage.prompt_tokens, usage.completion_tokens, 0)  # the same tokens; its cached ones the client cannot know
    text = client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    assert text.usage is not None
    add(text.usage.prompt_tokens, text.usage.completion_tokens, 0)

    def recorded() -> dict[str, int]:
        r = httpx.get(full_stack.http_url + "/v1/usage/completions", headers={"Authorization": f"Bearer {key}"},
                      params={"start_time": since - 60, "bucket_width": "1m"})  # fmt: skip
        assert r.status_code == 200, r.text
        out = dict.fromkeys(reported, 0)
        for bucket in r.json()["data"]:
            for result in bucket["results"]:
                for name in out:
                    out[name] += result[name]
        return out

    wait_for(lambda: recorded()["num_model_requests"] == 5, 10, "usage is not recorded within 10 s")
    got = recorded()
    figure("usage metered with real vLLM: requests; input, output tokens reported / recorded",
           f"5; {reported['input_tokens']}, {reported['output_tokens']} / {got['input_tokens']}, "
           f"{got['output_tokens']}")  # fmt: skip
    assert got["input_cached_tokens"] >= reported.pop("input_cached_tokens")
    assert {name: got[name] for name in reported} == reported


def _vllm_group(stack: Stack) -> Group:
    """The first worker's vLLM: its API server's pid and process group."""
    group = Group.decode((stack.config.data_dir / "agent-cache" / "vllm.pid").read_text())
    assert group is not None
    return group


def _vllm_pid(stack: Stack) -> int:
    return _vllm_group(stack).pgid


def _restarted(stack: Stack, old: Group) -> bool:
    """Whether another engine than `old` runs (between two, there is no pid file)."""
    try:
        return _vllm_group(stack) != old
    except FileNotFoundError:
        return False


def _engine_core(group: Group) -> int:
    """The group's engine core process (vLLM titles it `VLLM::EngineCore…`); its other children
    are helpers (multiprocessing's resource tracker, compile workers)."""
    (core,) = [
        pid for pid in members(group) if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore")
    ]
    return core


def _vllm_holds(stack: Stack) -> set[str]:
    """What the first worker's vLLM itself says it holds (asked as data planes can)."""
    try:
        r = httpx.get(
            f"http://127.0.0.1:{stack.config.vllm_port}/v1/models",
            headers={"Authorization": f"Bearer {stack.secrets['worker_api_key']}"},
            timeout=2,
        )
    except httpx.HTTPError:
        return set()
    return {m["id"] for m in r.json()["data"] if m.get("parent")} if r.status_code == 200 else set()


def config_logs(stack: Stack) -> str:
    """Both control plane replicas' logs."""
    assert stack.config.log_dir is not None
    return "".join(p.read_text() for p in sorted(stack.config.log_dir.glob("controlplane*.log")))


def _loads_logged(stack: Stack, adapter_id: str) -> int:
    return config_logs(stack).count(f"loaded {adapter_id} on")


def op_adapter(stack: Stack, key: str, adapter_id: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.http_url}/v1/adapters/{adapter_id}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def test_a_crashed_vllm_is_restarted_and_no_request_fails_meanwhile(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "survivor")
    r = upload(full_stack, key, "k1", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    assert r.status_code == 201
    adapter_id = r.json()["id"]
    full_stack.operator().force_load(adapter_id, W1)
    client = openai_client(key)

    def ask() -> str:
        resp = client.chat.completions.create(
            model="tiny-llama:k1",
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0.0,
            max_tokens=MAX_TOKENS,
        )
        return resp.choices[0].message.content or ""

    assert ask() == "red apple river"
    old = _vllm_group(full_stack)
    _engine_core(old)  # vLLM runs its engine core in a process of its own
    os.kill(old.pgid, signal.SIGKILL)  # the API server alone: its engine core would outlive it
    killed = time.monotonic()
    # Requests keep coming: the second worker takes them (the first request after the kill finds
    # the dead worker and is retried there). Meanwhile the agent ends what is left of the old
    # engine, starts a new one, and the control plane reloads what it should hold, with no
    # request needed.
    answers = []
    while adapter_id not in _vllm_holds(full_stack):
        assert time.monotonic() - killed < 240, "not reloaded within 240 s"
        answers.append(ask())
        time.sleep(PACE_S)
    took = time.monotonic() - killed
    assert answers and set(answers) == {"red apple river"}  # every request served, none failed
    assert _vllm_pid(full_stack) != old.pgid
    assert members(old) == [], "a process of the killed vLLM survived it"
    assert W2 in _holders(full_stack, adapter_id)
    wait_for(lambda: W1 in _holders(full_stack, adapter_id), 10, "the restarted worker did not reload", every_s=0.2)
    assert ask() == "red apple river"
    figure("vLLM API server kill -9 (real vLLM): requests served while it restarted, failed", f"{len(answers)}, 0")
    figure("vLLM API server kill -9 (real vLLM): processes of the old engine left", len(members(old)))
    figure("vLLM API server kill -9 (real vLLM): seconds until restarted and reloaded", f"{took:.0f}")


def test_a_stopped_engine_core_is_found_hung_and_restarted(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    """vLLM's /health answers 200 while its engine core is stopped: the agent's progress probe
    finds it hung, kills the whole engine and starts another; the other worker serves meanwhile."""
    key = new_tenant(full_stack, "hung")
    adapter_id = upload(full_stack, key, "h1", (adapters["a"] / "adapter_model.safetensors").read_bytes()).json()["id"]
    full_stack.operator().force_load(adapter_id, W1)
    full_stack.operator().force_load(adapter_id, W2)
    client = openai_client(key)
    old = _vllm_group(full_stack)
    os.kill(_engine_core(old), signal.SIGSTOP)
    stopped = time.monotonic()
    answers = []
    while _worker(full_stack, W1).healthy:
        assert time.monotonic() - stopped < 30, "the stopped engine was not found hung"
        answers.append(say(client, "tiny-llama:h1"))
    detected = time.monotonic() - stopped
    wait_for(lambda: _restarted(full_stack, old), 30, "no new engine", every_s=0.2)
    assert members(old) == []
    while adapter_id not in _vllm_holds(full_stack):
        assert time.monotonic() - stopped < 240, "not reloaded within 240 s"
        answers.append(say(client, "tiny-llama:h1"))
        time.sleep(PACE_S)
    serving = time.monotonic() - stopped
    assert _worker(full_stack, W1).engine_restarts >= 1
    figure(
        "stopped engine core (real vLLM): seconds until found hung / serving again", f"{detected:.1f} / {serving:.0f}"
    )
    figure("stopped engine core (real vLLM): requests served meanwhile, failed", f"{len(answers)}, 0")


def _worker(stack: Stack, worker_id: str) -> pb.Worker:
    (w,) = [w for w in stack.operator().list_workers().workers if w.worker_id == worker_id]
    return w


def test_a_killed_agent_comes_back_without_reloading(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "agent-crash")
    adapter = upload(full_stack, key, "g1", (adapters["b"] / "adapter_model.safetensors").read_bytes()).json()
    full_stack.operator().force_load(adapter["id"], W1)
    client = openai_client(key)
    say(client, "tiny-llama:g1")
    loads, vllm = _loads_logged(full_stack, adapter["id"]), _vllm_pid(full_stack)

    full_stack.procs["agent"].kill()  # the agent alone: vLLM lives on
    full_stack.procs["agent"].wait()
    assert _vllm_holds(full_stack) >= {adapter["id"]}  # vLLM lives on with what it holds
    # (the worker leaves the routing table while its agent is away: nothing could load or evict there)
    full_stack.restart("agent")
    wait_for(lambda: _serving(full_stack), 60, "the agent did not come back", every_s=0.2)
    time.sleep(3)  # a heartbeat or two: time for any (needless) reconcile to happen
    assert _vllm_pid(full_stack) == vllm
    assert _loads_logged(full_stack, adapter["id"]) == loads
    assert W1 in _holders(full_stack, adapter["id"])


def test_the_control_plane_killed_mid_placement_converges(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "cp-crash")
    data = with_metadata((adapters["a"] / "adapter_model.safetensors").read_bytes(), {"copy": "cp-crash"})
    adapter = upload(full_stack, key, "m1", data).json()
    client = openai_client(key)

    def ask() -> str:
        resp = client.chat.completions.create(
            model="tiny-llama:m1", messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=8
        )
        return resp.choices[0].message.content or ""

    op = full_stack.operator()
    op.drain(W2)  # the placement must go to the first worker, whose agent the first replica holds
    try:
        with ThreadPoolExecutor(1) as pool:
            during = pool.submit(ask)  # the data plane asks the second replica, which forwards to the first
            time.sleep(0.01)
            full_stack.procs["controlplane"].kill()  # the replica holding the first agent's stream
            full_stack.procs["controlplane"].wait()
            with contextlib.suppress(openai.APIError):
                during.result()
        full_stack.restart("controlplane")
    finally:

        def undrained() -> bool:
            with contextlib.suppress(grpc.RpcError):
                full_stack.operator().drain(W2, draining=False)
                return True
            return False

        wait_for(undrained, 60, "the worker could not be undrained", every_s=0.5)

    def served() -> bool:
        try:
            answer = ask()
        except openai.APIStatusError:
            return False
        assert answer == "red apple river"
        return True

    wait_for(served, 60, "never served after the restart", every_s=0.5)
    holders = [w for w in full_stack.operator().list_workers().workers if adapter["id"] in w.resident_adapter_ids]
    assert len(holders) == 1


def test_full_workers_evict_the_least_recently_used_idle_adapter(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    _empty_workers(full_stack)
    key = new_tenant(full_stack, "lru")
    client = openai_client(key)
    base = (adapters["a"] / "adapter_model.safetensors").read_bytes()
    ids = [upload(full_stack, key, f"l{i}", with_metadata(base, {"lru": str(i)})).json()["id"] for i in range(17)]
    for i in range(16):  # fill both workers' 8 slots, l0 first: l0 is the least recently used
        client.chat.completions.create(
            model=f"tiny-llama:l{i}", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    # A cold adapter takes a free place (first where its node has its bytes: prefetch races this),
    # so which worker holds which varies; each holds 8, in the order they were used.
    held = {w: [a for a in ids[:16] if _holders(full_stack, a) == {w}] for w in (W1, W2)}
    assert [len(held[W1]), len(held[W2])] == [8, 8], held

    def long_stream(model: str) -> Iterator[ChatCompletionChunk]:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=1000,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        return chunks

    # Each worker's least recently used gets a request in flight.
    busy = [held[W1][0], held[W2][0]]
    running = [long_stream(f"tiny-llama:l{ids.index(a)}") for a in busy]
    time.sleep(2.5)  # heartbeats report them busy
    say(client, "tiny-llama:l16")
    (taker,) = _holders(full_stack, ids[16])  # either worker: each runs one request
    assert _holders(full_stack, busy[0]) == {W1} and _holders(full_stack, busy[1]) == {W2}  # never a busy one
    lru = held[taker][1]  # the least recently used idle one on that worker went
    assert not _holders(full_stack, lru)
    assert all(_holders(full_stack, a) for a in ids[:16] if a != lru)
    for chunks in running:
        assert list(chunks)[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_for_a_cold_adapter_all_succeed(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "crowd")
    assert upload(full_stack, key, "c1", (adapters["b"] / "adapter_model.safetensors").read_bytes()).status_code == 201
    client = openai_client(key)

    def ask(_: int) -> str:
        resp = client.chat.completions.create(
            model="tiny-llama:c1",
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0.0,
            max_tokens=MAX_TOKENS,
        )
        return resp.choices[0].message.content or ""

    # As many as make the adapter hot on one worker, but no more: one placement, no replica.
    with ThreadPoolExecutor(REPLICATE_AT_IN_FLIGHT) as pool:
        answers = list(pool.map(ask, range(REPLICATE_AT_IN_FLIGHT)))
    assert len(set(answers)) == 1 and answers[0]
    adapter_id = httpx.get(f"{full_stack.http_url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()[
        "data"
    ][0]["id"]
    assert len(_holders(full_stack, adapter_id)) == 1
    assert _loads_logged(full_stack, adapter_id) == 1


def test_delete_during_traffic_finishes_running_requests_then_evicts(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "deleter")
    # Bytes no other adapter shares, so that deleting this one collects them.
    data = with_metadata((adapters["a"] / "adapter_model.safetensors").read_bytes(), {"copy": "d1"})
    adapter = upload(full_stack, key, "d1", data).json()
    client = openai_client(key)
    stream = client.chat.completions.create(
        model="tiny-llama:d1",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        max_tokens=600,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # the request is running on the worker

    r = httpx.delete(f"{full_stack.http_url}/v1/adapters/{adapter['id']}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny-llama:d1", messages=[{"role": "user", "content": "x"}])
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"  # the running request finished whole

    workers = full_stack.operator().list_workers
    wait_for(lambda: all(adapter["id"] not in w.resident_adapter_ids for w in workers().workers), 60, "not evicted")
    blob = full_stack.config.data_dir / "artifacts" / "blobs" / adapter["sha256"][:2] / adapter["sha256"]
    wait_for(lambda: not blob.exists(), 60, "bytes not collected")


def test_operator_drain_and_forced_placements(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    op = full_stack.operator()
    key = new_tenant(full_stack, "operated")
    adapter = upload(full_stack, key, "o1", (adapters["b"] / "adapter_model.safetensors").read_bytes()).json()
    client = openai_client(key)

    for w in (W1, W2):
        op.drain(w)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            say(client, "tiny-llama:o1")
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        assert all(w.draining for w in op.routing_table().workers)
    finally:
        for w in (W1, W2):
            op.drain(w, draining=False)

    loaded = op.force_load(adapter["id"], W2)
    assert loaded.worker_id == W2 and not loaded.already_loaded
    assert _holders(full_stack, adapter["id"]) == {W2}
    assert op.force_load(adapter["id"], W2).already_loaded
    assert op.force_evict(adapter["id"]) == [W2]
    assert not _holders(full_stack, adapter["id"])
    assert say(client, "tiny-llama:o1").model == "tiny-llama:o1"


def test_vllm_admin_paths_are_the_agents_alone(full_stack: Stack) -> None:
    """Data planes hold the worker API key: it opens serving paths, never LoRA loading."""
    auth = {"Authorization": f"Bearer {full_stack.secrets['worker_api_key']}"}
    for port in (full_stack.config.vllm_port, full_stack.config.extra_workers[0].vllm_port):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/reset_prefix_cache"):
            r = httpx.post(url + path, headers=auth, json={"lora_name": "x", "lora_path": "/tmp"})
            assert r.status_code == 403, (path, r.text)


def test_a_failed_load_is_retried_on_another_worker(
    full_stack: Stack, openai_client: Callable[[str], openai.OpenAI]
) -> None:
    """The second worker's vLLM takes ranks up to 32; a rank-64 adapter fails there first."""
    _empty_workers(full_stack)
    op = full_stack.operator()
    key = new_tenant(full_stack, "retry")
    filler = grpc_upload(full_stack.grpc_addr, key, "filler", safetensors_bytes(lora_tensors(rank=2)))
    op.force_load(filler.id, W1)  # the first worker is now the more used: the second is tried first
    big = grpc_upload(full_stack.grpc_addr, key, "big", safetensors_bytes(lora_tensors(rank=64)))
    assert big.rank > SECOND_WORKER_MAX_RANK
    assert say(openai_client(key), "tiny-llama:big").model == "tiny-llama:big"
    assert _holders(full_stack, big.id) == {W1}
    assert config_logs(full_stack).count(f"load of {big.id} on {W2} failed") == 1
    assert "max_lora_rank" in config_logs(full_stack)
    assert op_adapter(full_stack, key, big.id)["placement_error"] is None
    assert _holders(full_stack, filler.id) == {W1}  # the other adapter is unaffected


def test_an_adapter_no_worker_can_load_is_marked_failed(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "broken")
    client = openai_client(key)
    good = upload(full_stack, key, "good", (adapters["a"] / "adapter_model.safetensors").read_bytes()).json()
    say(client, "tiny-llama:good")
    good_holders = _holders(full_stack, good["id"])
    data = with_metadata((adapters["b"] / "adapter_model.safetensors").read_bytes(), {"copy": "rotten"})
    bad = upload(full_stack, key, "bad", data).json()
    blob = full_stack.config.data_dir / "artifacts" / "blobs" / bad["sha256"][:2] / bad["sha256"]
    rotten = bytearray(blob.read_bytes())
    rotten[-1] ^= 0xFF  # the stored bytes rot: every worker's fetch fails verification
    blob.write_bytes(bytes(rotten))

    with pytest.raises(openai.APIStatusError) as err:
        say(client, "tiny-llama:bad")
    assert err.value.status_code == 503 and "could not be loaded" in err.value.message
    assert "failed verification" in err.value.message and str(full_stack.config.data_dir) not in err.value.message
    reason = op_adapter(full_stack, key, bad["id"])["placement_error"]
    assert W1 in reason and W2 in reason  # tried on both workers
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError):
        say(client, "tiny-llama:bad")  # marked failed: refused at once, not tried again
    assert time.monotonic() - started < 1.0
    attempts = config_logs(full_stack).count(f"load of {bad['id']} on")
    assert attempts == 2
    assert _holders(full_stack, good["id"]) == good_holders  # other adapters unaffected
    assert say(client, "tiny-llama:good").model == "tiny-llama:good"
    assert not _holders(full_stack, bad["id"])
    figure("a bad adapter (real vLLM): load attempts before it was marked failed", attempts)


def test_a_hot_adapter_gets_a_replica_on_another_worker(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "hot")
    client = openai_client(key)
    adapter = upload(full_stack, key, "h1", (adapters["a"] / "adapter_model.safetensors").read_bytes()).json()
    full_stack.operator().force_load(adapter["id"], W1)
    assert _holders(full_stack, adapter["id"]) == {W1}

    def stream(_: int) -> str | None:
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama:h1", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=150,
                extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        return chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(REPLICATE_AT_IN_FLIGHT + 2) as pool:
        # More requests in flight than the threshold per worker holding it: a copy on the other.
        finished = list(pool.map(stream, range(REPLICATE_AT_IN_FLIGHT + 2)))
    assert finished == ["length"] * (REPLICATE_AT_IN_FLIGHT + 2)
    assert _holders(full_stack, adapter["id"]) == {W1, W2}


def test_two_control_plane_replicas_share_one_quota(full_stack: Stack) -> None:
    """The data plane and agent already use different replicas in every test here; this races
    uploads for a tenant's last quota slot across both replicas."""
    key = new_tenant(full_stack, "two-replicas")
    replicas = [full_stack.grpc_addr, f"127.0.0.1:{full_stack.config.second_grpc_port}"]
    for i in range(19):
        grpc_upload(replicas[i % 2], key, f"r{i}", safetensors_bytes(lora_tensors(rank=1 + i % 8)))

    def attempt(i: int) -> bool:
        try:
            grpc_upload(replicas[i % 2], key, f"race{i}", safetensors_bytes(lora_tensors(rank=2)))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(attempt, range(8)))
    assert sum(admitted) == 1


def test_every_components_metrics_move_with_the_traffic(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    """Scrapes of the data plane's, both control planes' and both agents' /metrics around a cold
    adapter's first request (a routing miss and a load), a second (a hit), a stream (time to
    first token) and a refused upload."""
    urls = {"dataplane": full_stack.http_url + "/metrics", **full_stack.metrics_urls}
    assert set(urls) == {"dataplane", "controlplane", "controlplane-2", "agent", "agent-2"}
    before = [scrape(u) for u in urls.values()]
    key = new_tenant(full_stack, "metered")
    data = with_metadata((adapters["a"] / "adapter_model.safetensors").read_bytes(), {"copy": "metered"})
    assert upload(full_stack, key, "m1", data).status_code == 201
    assert upload(full_stack, key, "m2", b"not an adapter").status_code == 422
    client = openai_client(key)
    say(client, "tiny-llama:m1")  # cold: placed, then answered
    say(client, "tiny-llama:m1")  # resident: straight to its worker
    for _ in client.chat.completions.create(model="tiny-llama:m1", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=4, stream=True):  # fmt: skip
        pass

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    ok = {"component": "dataplane", "base_model": "tiny-llama", "status": "200"}
    after: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

    def counted() -> bool:  # a stream is counted once its handler has finished, just after its last byte
        after[:] = [scrape(u) for u in urls.values()]
        return moved("loraplane_requests_total", **ok) >= 3

    wait_for(counted, 5, "the requests were not counted", every_s=0.2)
    assert moved("loraplane_requests_total", **ok) == 3
    assert moved("loraplane_request_seconds_count", base_model="tiny-llama") == 3
    assert moved("loraplane_time_to_first_token_seconds_count", base_model="tiny-llama") == 3
    assert moved("loraplane_routing_total", result="miss") == 1
    assert moved("loraplane_routing_total", result="hit") == 2
    # The adapter's bytes, and what of the refused file was read before it was refused.
    assert len(data) < moved("loraplane_upload_bytes_total") <= len(data) + len(b"not an adapter")
    assert moved("loraplane_upload_rejections_total", reason="invalid_adapter") == 1
    assert moved("loraplane_adapter_loads_total", base_model="tiny-llama", result="ok") == 1
    assert moved("loraplane_adapter_load_seconds_count", base_model="tiny-llama") == 1
    assert moved("loraplane_requests_total", component="controlplane", status="OK") >= 3  # upload, place, …
    assert metric(after, "loraplane_cold_placements_waiting") == 0
    for component in ("dataplane", "controlplane", "agent"):
        up = [page for name, page in zip(urls, after, strict=True) if name.startswith(component)]
        if component != "agent":
            assert metric(up, "loraplane_redis_up", component=component) == len(up)
        if component != "controlplane":
            assert metric(up, "loraplane_controlplane_up", component=component) == len(up)
    assert metric(after, "loraplane_agents_connected", base_model="tiny-llama") == 2  # on either replica
    slots = {w: metric(after, "loraplane_worker_lora_slots", worker=w) for w in (W1, W2)}
    assert slots == {W1: 8, W2: 8}
    holder = next(iter(_holders(full_stack, _adapter_id(full_stack, key, "m1"))))
    agent = urls["agent" if holder == W1 else "agent-2"]
    wait_for(  # the agent measures at each heartbeat
        lambda: metric([scrape(agent)], "loraplane_worker_lora_slots_used", worker=holder) >= 1, 10, every_s=0.5
    )
    assert ("loraplane_worker_requests_waiting", frozenset({("worker", holder)})) in scrape(agent)


def _adapter_id(stack: Stack, key: str, name: str) -> str:
    listed = httpx.get(stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    return str(next(a["id"] for a in listed if a["name"] == name))


CHURN_CYCLES = 2000 if LONG else 150
KILLS = 10 if LONG else 1


def _footprint(stack: Stack) -> dict[str, float]:
    """The first worker's agent and engine: resident MB, open fds, processes."""
    agent, engine = stack.procs["agent"].pid, members(_vllm_group(stack))
    return {
        "agent MB": _rss_mb([agent]),
        "agent fds": len(os.listdir(f"/proc/{agent}/fd")),
        "engine MB": _rss_mb(engine),
        "engine fds": sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in engine),
        "engine processes": len(engine),
    }


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def test_churn_and_engine_kills_leak_nothing(full_stack: Stack, adapters: dict[str, Path]) -> None:
    """Thousands of load/unload cycles of different adapters through the agent (the long suite;
    CI runs fewer), then kill -9s of the engine: memory, fds and processes before and after."""
    key = full_stack.operator().create_tenant("churn", tenant_pb2.TIER_RESERVED).api_key
    data = (adapters["a"] / "adapter_model.safetensors").read_bytes()
    ids = [upload(full_stack, key, f"c{i}", with_metadata(data, {"v": str(i)})).json()["id"] for i in range(8)]
    op = full_stack.operator(timeout=60)

    def cycle(i: int) -> None:
        op.force_load(ids[i % len(ids)], W1)
        op.force_evict(ids[i % len(ids)], W1)

    for i in range(16):  # allocators and caches warm
        cycle(i)
    before = _footprint(full_stack)
    started = time.monotonic()
    for i in range(CHURN_CYCLES):
        cycle(i)
    cycles_s = time.monotonic() - started
    churned = _footprint(full_stack)

    kinds = ["api server", "engine core"] * KILLS if LONG else ["engine core"]
    seconds: list[float] = []
    orphans = 0
    for kind in kinds:
        old = _vllm_group(full_stack)
        killed = time.monotonic()
        os.kill(old.pgid if kind == "api server" else _engine_core(old), signal.SIGKILL)
        wait_for(lambda: _restarted(full_stack, old), 60, "no new engine", every_s=0.2)  # noqa: B023
        orphans += len(members(old))
        wait_for(lambda: _worker(full_stack, W1).healthy, 240, "not serving again", every_s=0.2)
        seconds.append(time.monotonic() - killed)
    after = _footprint(full_stack)

    figure("churn: load/unload cycles on a real vLLM (agent path)", f"{CHURN_CYCLES} in {cycles_s:.0f} s")
    for name in ("agent MB", "engine MB", "agent fds", "engine fds", "engine processes"):
        figure(f"churn: {name} before / after the cycles / after {len(kinds)} kills",
               f"{before[name]:.0f} / {churned[name]:.0f} / {after[name]:.0f}")  # fmt: skip
    p99 = statistics.quantiles(seconds, n=100)[98] if len(seconds) > 1 else seconds[0]
    figure(f"engine kill -9 x{len(kinds)} (real vLLM): processes left / seconds until serving p50, p99",
           f"{orphans} / {statistics.median(seconds):.0f}, {p99:.0f}")  # fmt: skip
    assert orphans == 0
    assert churned["agent MB"] - before["agent MB"] < 50 and after["agent MB"] - before["agent MB"] < 50
    assert churned["engine MB"] - before["engine MB"] < 50
    assert after["engine processes"] == before["engine processes"]
    assert churned["agent fds"] <= before["agent fds"] + 2 and churned["engine fds"] <= before["engine fds"] + 2
    assert after["agent fds"] <= before["agent fds"] + 2


WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },  # fmt: skip
    },
}


def test_tools_work_through_the_openai_client(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    """`auto` (the worker's parser), `required` and a named function (forced through structured
    output, whole or streamed): well-formed calls even from the tiny model, in the spec's shape."""
    from tests import openai_spec

    key = new_tenant(full_stack, "tools")
    upload(full_stack, key, "tooled", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    client = openai_client(key)
    messages: Any = [{"role": "user", "content": "weather in Paris?"}]
    auto = client.chat.completions.create(model="tiny-llama", messages=messages, tools=[WEATHER], max_tokens=8)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    for model, choice in [("tiny-llama", "required"), ("tiny-llama:tooled", named)]:
        resp = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER], tool_choice=choice, max_tokens=64
        )
        assert openai_spec.validate("CreateChatCompletionResponse", resp.model_dump(exclude_unset=True)) == []
        (call,) = resp.choices[0].message.tool_calls or []
        assert resp.choices[0].finish_reason == "tool_calls" and call.type == "function"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    # The loop's next turn: the call and its result go back, and the model answers.
    turn = [*messages, resp.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    answered = client.chat.completions.create(model="tiny-llama:tooled", messages=turn, tools=[WEATHER], max_tokens=8)
    assert answered.choices[0].message.content is not None and answered.choices[0].finish_reason != "tool_calls"
    calls: dict[int, str] = {}
    with client.chat.completions.stream(
        model="tiny-llama", messages=messages, tools=[WEATHER], tool_choice=named, max_tokens=64
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                calls[event.index] = event.arguments
        final = stream.get_final_completion()
    assert list(calls) == [0] and json.loads(calls[0])["city"] in ("Paris", "Rome")
    assert final.choices[0].finish_reason == "tool_calls"


def test_the_responses_api_answers_with_the_adapter(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    from tests import openai_spec

    key = new_tenant(full_stack, "responses")
    upload(full_stack, key, "resp", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    client = openai_client(key)
    chat = client.chat.completions.create(
        model="tiny-llama:resp", messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=8
    )
    raw = client.responses.with_raw_response.create(
        model="tiny-llama:resp", input=PROMPT, temperature=0.0, max_output_tokens=8
    )
    assert openai_spec.validate("Response", raw.http_response.json()) == []
    resp = raw.parse()
    assert resp.model == "tiny-llama:resp" and resp.output_text == chat.choices[0].message.content
    with client.responses.stream(model="tiny-llama:resp", input=PROMPT, temperature=0.0, max_output_tokens=8) as s:
        assert s.get_final_response().output_text == resp.output_text
    streamed = httpx.post(
        f"{full_stack.http_url}/v1/responses", headers={"Authorization": f"Bearer {key}"}, timeout=60,
        json={"model": "tiny-llama:resp", "input": PROMPT, "max_output_tokens": 8, "stream": True},
    )  # fmt: skip
    assert openai_spec.validate_stream("ResponseStreamEvent", streamed.content) == []
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model="tiny-llama:resp", input=PROMPT, store=True)


def test_real_answers_and_errors_are_schema_true(full_stack: Stack, adapters: dict[str, Path]) -> None:
    """Straight from a real vLLM, through the data plane, against OpenAI's published schemas."""
    from tests import openai_spec

    key = new_tenant(full_stack, "spec")
    upload(full_stack, key, "spec", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    headers = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": PROMPT}]

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(full_stack.http_url + path, headers=headers, json=body, timeout=60)

    checks = {
        "CreateChatCompletionResponse": post("/v1/chat/completions", {"model": "tiny-llama:spec", "messages": messages,
                                             "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 2}),
        "CreateCompletionResponse": post("/v1/completions", {"model": "tiny-llama:spec", "prompt": PROMPT,
                                         "max_tokens": 4, "logprobs": 2}),
        "ListModelsResponse": httpx.get(full_stack.http_url + "/v1/models", headers=headers),
        "Model": httpx.get(full_stack.http_url + "/v1/models/tiny-llama:spec", headers=headers),
    }  # fmt: skip
    for schema, r in checks.items():
        assert r.status_code == 200, r.text
        assert openai_spec.validate(schema, r.json()) == [], schema
        assert "vllm" not in r.text.lower()
    stream = post("/v1/chat/completions", {"model": "tiny-llama:spec", "messages": messages, "max_tokens": 4,
                                           "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    assert openai_spec.validate_stream("CreateChatCompletionStreamResponse", stream.content) == []
    too_long = post(
        "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello " * 1500}]}
    )
    assert too_long.status_code == 400 and openai_spec.validate("ErrorResponse", too_long.json()) == []
    error = too_long.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
