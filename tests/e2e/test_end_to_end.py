"""Two tenants upload adapters and chat through loraplane: real Redis, control plane,
agent, vLLM (CPU build) and data plane, driven by the real OpenAI client."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import psutil
import pytest

from loraplane import devadapter
from loraplane.stack import Stack
from tests.conftest import curl_upload, grpc_upload, new_tenant, upload
from tests.support import lora_tensors, safetensors_bytes, with_metadata

PROMPT = "hello"
MAX_TOKENS = 16


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


@pytest.fixture
def openai_client(full_stack: Stack) -> Iterator[Callable[[str], openai.OpenAI]]:
    """Makes real OpenAI clients for the stack's data plane; closes them afterwards."""
    made: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=f"{full_stack.http_url}/v1", api_key=key, max_retries=0, timeout=60))
        return made[-1]

    yield make
    for client in made:
        client.close()


def reference(base: Path, adapter: Path | None, prompt: str, max_tokens: int) -> str:
    """Greedy output computed independently with transformers + PEFT on the CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


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
    assert documented.choices[0].message.content

    def chat(client: openai.OpenAI, model: str) -> str:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=MAX_TOKENS
        )
        assert resp.model == model
        return resp.choices[0].message.content or ""

    base_out = chat(client_a, "tiny-llama")
    out_a = chat(client_a, "tiny-llama:my-finetuned-v3")
    out_b = chat(client_b, "tiny-llama:my-finetuned-v3")

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


def _vllm_pid(stack: Stack) -> int:
    agent = psutil.Process(stack.procs["agent"].pid)
    (server,) = [p for p in agent.children() if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    return int(server.pid)


def test_a_crashed_vllm_is_restarted_and_serves_adapters_again(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    key = new_tenant(full_stack, "survivor")
    r = upload(full_stack, key, "k1", (adapters["a"] / "adapter_model.safetensors").read_bytes())
    assert r.status_code == 201
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
    old = _vllm_pid(full_stack)
    os.killpg(old, signal.SIGKILL)  # vLLM and its engine processes die at once
    killed = time.monotonic()
    answer, errors = None, 0
    while time.monotonic() - killed < 240:
        try:
            answer = ask()
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            errors += 1  # 502/503 while vLLM is down
            time.sleep(1)
    assert answer == "red apple river", f"not served again within 240 s ({errors} failed tries)"
    assert _vllm_pid(full_stack) != old
    print(f"\nvLLM killed: served again after {time.monotonic() - killed:.0f} s")


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

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(set(answers)) == 1 and answers[0]
    workers = full_stack.operator().list_workers().workers
    adapter_id = httpx.get(f"{full_stack.http_url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()[
        "data"
    ][0]["id"]
    assert sum(adapter_id in w.resident_adapter_ids for w in workers) == 1


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

    deadline = time.monotonic() + 60
    while any(adapter["id"] in w.resident_adapter_ids for w in full_stack.operator().list_workers().workers):
        assert time.monotonic() < deadline, "not evicted"
        time.sleep(0.2)
    blob = full_stack.config.data_dir / "artifacts" / "blobs" / adapter["sha256"][:2] / adapter["sha256"]
    while blob.exists():
        assert time.monotonic() < deadline, "bytes not collected"
        time.sleep(0.2)


def test_operator_drain_and_forced_placements(
    full_stack: Stack, adapters: dict[str, Path], openai_client: Callable[[str], openai.OpenAI]
) -> None:
    op = full_stack.operator()
    key = new_tenant(full_stack, "operated")
    adapter = upload(full_stack, key, "o1", (adapters["b"] / "adapter_model.safetensors").read_bytes()).json()
    (worker,) = op.list_workers().workers
    client = openai_client(key)

    op.drain(worker.worker_id)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="tiny-llama:o1", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
    assert op.routing_table().workers[0].draining
    op.drain(worker.worker_id, draining=False)

    loaded = op.force_load(adapter["id"])
    assert loaded.worker_id == worker.worker_id and not loaded.already_loaded
    assert adapter["id"] in op.routing_table().workers[0].adapter_ids
    assert op.force_load(adapter["id"]).already_loaded
    assert op.force_evict(adapter["id"]) == [worker.worker_id]
    assert adapter["id"] not in op.routing_table().workers[0].adapter_ids
    resp = client.chat.completions.create(
        model="tiny-llama:o1", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert resp.model == "tiny-llama:o1"


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
