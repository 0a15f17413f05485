"""The data plane's proxy through a real uvicorn server, in front of the vLLM simulator."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import SimStack, new_tenant
from tests.support import lora_tensors, safetensors_bytes, scrape, wait_for


@pytest.fixture(scope="module")
def tenant(sim_stack: SimStack) -> dict[str, str]:
    key = new_tenant(sim_stack.stack, "proxied")
    r = httpx.post(
        sim_stack.stack.http_url + "/v1/adapters/upload",
        headers={"Authorization": f"Bearer {key}"},
        data={"name": "p1", "base_model": "tiny-llama"},
        files={"file": ("adapter_model.safetensors", safetensors_bytes(lora_tensors(rank=4)))},
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {key}"}


def chat(sim_stack: SimStack, headers: dict[str, str], timeout: float = 30, **fields: object) -> httpx.Response:
    body = {"model": "tiny-llama:p1", "messages": [{"role": "user", "content": "x"}], **fields}
    return httpx.post(sim_stack.stack.http_url + "/v1/chat/completions", headers=headers, json=body, timeout=timeout)


def wait_idle(sim_stack: SimStack, within_s: float) -> float:
    return wait_for(lambda: not sim_stack.state()["running"], within_s, "the upstream request is still running", 0.02)


def test_a_client_that_leaves_a_non_streaming_request_cancels_it_upstream(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    assert chat(sim_stack, tenant, max_tokens=2).status_code == 200  # resident now
    with pytest.raises(httpx.ReadTimeout):
        chat(sim_stack, tenant, timeout=0.5, max_tokens=100, sim_tokens_per_s=5)  # would take 20 s
    assert wait_idle(sim_stack, within_s=1.0) < 1.0


def test_a_client_that_leaves_a_stream_cancels_it_upstream(sim_stack: SimStack, tenant: dict[str, str]) -> None:
    body = {"model": "tiny-llama:p1", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 100, "sim_tokens_per_s": 5}  # fmt: skip
    with httpx.stream("POST", sim_stack.stack.http_url + "/v1/chat/completions", headers=tenant, json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        assert '"model":"tiny-llama:p1"' in first
        assert sim_stack.state()["running"] == 1
    assert wait_idle(sim_stack, within_s=1.0) < 1.0


def test_a_client_that_leaves_after_the_last_event_got_a_whole_answer(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    """Clients (the OpenAI SDK among them) close a stream once they read `data: [DONE]`, maybe
    before the body's end arrives: that answer was whole, a 200, not a 499."""
    body = {"model": "tiny-llama:p1", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 2, "sim_linger_s": 1}  # fmt: skip
    before = dataplane_requests(sim_stack)
    with httpx.stream("POST", sim_stack.stack.http_url + "/v1/chat/completions", headers=tenant, json=body) as r:
        assert any(line == "data: [DONE]" for line in r.iter_lines())

    def counted() -> bool:  # the data plane's handler ends when the worker's body does, a second on
        after = dataplane_requests(sim_stack)
        return after.get("200", 0) + after.get("499", 0) > before.get("200", 0) + before.get("499", 0)

    wait_for(counted, 10, "the request was never counted")
    after = dataplane_requests(sim_stack)
    assert (after.get("200", 0) - before.get("200", 0), after.get("499", 0) - before.get("499", 0)) == (1, 0)


def dataplane_requests(sim_stack: SimStack) -> dict[str, float]:
    """The data plane's chat completions answered so far, by status."""
    page = scrape(sim_stack.stack.http_url + "/metrics")
    return {dict(labels)["status"]: value for (name, labels), value in page.items()
            if name == "loraplane_requests_total" and ("base_model", "tiny-llama") in labels}  # fmt: skip


@pytest.mark.parametrize(
    ("param", "value"),
    [("max_tokens", 10_000), ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", True), ("n", 9), ("n", 0),
     ("max_completion_tokens", 5000), ("best_of", 100)],
)  # fmt: skip
def test_request_limits_are_clear_400s(sim_stack: SimStack, tenant: dict[str, str], param: str, value: object) -> None:
    r = chat(sim_stack, tenant, 30, **{param: value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and "from 1 to" in r.json()["error"]["message"]


def test_cache_salt_is_the_tenants_own(sim_stack: SimStack, tenant: dict[str, str]) -> None:
    other = {"Authorization": f"Bearer {new_tenant(sim_stack.stack, 'salted')}"}
    chat(sim_stack, tenant, model="tiny-llama", max_tokens=1, cache_salt="victims-salt")
    chat(sim_stack, tenant, model="tiny-llama", max_tokens=1)
    chat(sim_stack, other, model="tiny-llama", max_tokens=1, cache_salt="victims-salt")
    mine, mine_again, theirs = (r["cache_salt"] for r in sim_stack.state()["requests"][-3:])
    assert re.fullmatch(r"[0-9a-f]{64}", mine)
    assert mine == mine_again != theirs


def test_embeddings_go_to_an_embedding_models_worker(sim_stack: SimStack, tenant: dict[str, str]) -> None:
    url = sim_stack.stack.http_url + "/v1/embeddings"
    r = httpx.post(url, headers=tenant, json={"model": "tiny-embed", "input": ["a", "bb"]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-embed" and [d["index"] for d in r.json()["data"]] == [0, 1]
    assert sim_stack.state(sim_stack.embed_sim_url)["requests"][-1]["input"] == ["a", "bb"]

    r = httpx.post(url, headers=tenant, json={"model": "tiny-embed:p1", "input": "a"})
    assert r.status_code == 400 and "embedding models do not support LoRA" in r.json()["error"]["message"]
    r = httpx.post(url, headers=tenant, json={"model": "tiny-llama", "input": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = chat(sim_stack, tenant, model="tiny-embed")
    assert r.status_code == 400 and "not a chat model" in r.json()["error"]["message"]


def test_embeddings_are_metered_apart(sim_stack: SimStack) -> None:
    """Embeddings count in /v1/usage/embeddings (input tokens and requests), not with completions."""
    headers = {"Authorization": f"Bearer {new_tenant(sim_stack.stack, 'embed-metered')}"}
    since = int(time.time()) - 60
    r = httpx.post(sim_stack.stack.http_url + "/v1/embeddings", headers=headers,
                   json={"model": "tiny-embed", "input": ["a", "bb", "ccc"]})  # fmt: skip
    reported = r.json()["usage"]["prompt_tokens"]

    def results(kind: str) -> list[dict[str, Any]]:
        page = httpx.get(sim_stack.stack.http_url + f"/v1/usage/{kind}", headers=headers,
                         params={"start_time": since, "bucket_width": "1m", "group_by": "model"}).json()  # fmt: skip
        return [result for bucket in page["data"] for result in bucket["results"]]

    wait_for(lambda: bool(results("embeddings")), 10, "embeddings usage is not recorded")
    (result,) = results("embeddings")
    assert result["object"] == "organization.usage.embeddings.result"
    assert (result["model"], result["input_tokens"], result["num_model_requests"]) == ("tiny-embed", reported, 1)
    assert results("completions") == []
    assert httpx.get(sim_stack.stack.http_url + "/v1/usage/images", headers=headers).status_code == 404


def test_models_list_the_base_models_and_the_tenants_ready_adapters(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    r = httpx.get(sim_stack.stack.http_url + "/v1/models", headers=tenant)
    models = {m["id"]: m["parent"] for m in r.json()["data"]}
    assert models == {"tiny-llama": None, "tiny-embed": None, "tiny-llama:p1": "tiny-llama"}


def test_readyz_and_metrics(sim_stack: SimStack, tenant: dict[str, str]) -> None:
    base = sim_stack.stack.http_url
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 2

    def requests_ok() -> float:
        text = httpx.get(base + "/metrics").text
        line = 'loraplane_dataplane_requests_total{path="/v1/chat/completions",status="200"} '
        return float(next((ln[len(line) :] for ln in text.splitlines() if ln.startswith(line)), "0"))

    before = requests_ok()
    chat(sim_stack, tenant, max_tokens=1)
    chat(sim_stack, tenant, max_tokens=1)
    assert requests_ok() == before + 2
    assert chat(sim_stack, tenant, n=0).status_code == 400
    text = httpx.get(base + "/metrics").text
    assert "loraplane_dataplane_healthy_workers 2" in text
    assert 'loraplane_dataplane_requests_total{path="/v1/chat/completions",status="400"}' in text


def test_with_redis_and_the_control_plane_frozen_the_last_snapshot_still_serves(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    stack = sim_stack.stack
    assert chat(sim_stack, tenant, max_tokens=1).status_code == 200  # key, adapter and routing known
    frozen = [stack.procs["redis"], stack.procs["controlplane"]]
    for proc in frozen:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        took = []
        for _ in range(20):
            started = time.monotonic()
            assert chat(sim_stack, tenant, max_tokens=1).status_code == 200
            assert chat(sim_stack, tenant, model="tiny-llama", max_tokens=1).status_code == 200
            took.append(time.monotonic() - started)
            time.sleep(0.3)  # past the key and adapter caches' freshness
        assert sorted(took)[len(took) // 2] < 0.5  # Redis's timeout holds up one probe, not every request
        stranger = {"Authorization": "Bearer lp_" + "x" * 43}
        assert chat(sim_stack, stranger, max_tokens=1).status_code in (401, 503)  # never served blind
    finally:
        for proc in frozen:
            os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: httpx.get(stack.http_url + "/readyz").json()["workers"] >= 2, 30, "workers did not come back")


def test_oversized_headers_and_bodies_are_413_before_anything_is_routed(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    r = chat(sim_stack, {**tenant, "X-Padding": "x" * 20_000})
    assert r.status_code == 413 and "headers" in r.json()["error"]["message"]
    big = httpx.post(
        sim_stack.stack.http_url + "/v1/chat/completions",
        headers={**tenant, "Content-Type": "application/json"},
        content=b'{"model": "tiny-llama", "prompt": "' + b"x" * (2 << 20) + b'"}',
    )
    assert big.status_code == 413 and "body" in big.json()["error"]["message"]


def test_a_worker_that_breaks_off_mid_answer_is_a_502_in_the_envelope(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    r = chat(sim_stack, tenant, model="tiny-llama", max_tokens=1, sim_fail="midway")
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "server_error" and "mid-answer" in r.json()["error"]["message"]
    assert chat(sim_stack, tenant, model="tiny-llama", max_tokens=1).status_code == 200  # the next one is fine


def test_an_adapter_gone_from_its_worker_behind_the_tables_back_is_never_a_leaked_404(
    sim_stack: SimStack, tenant: dict[str, str]
) -> None:
    assert chat(sim_stack, tenant, max_tokens=1).status_code == 200
    adapter_id = sim_stack.state()["requests"][-1]["model"]
    assert httpx.post(sim_stack.sim_url + "/v1/unload_lora_adapter", json={"lora_name": adapter_id}).status_code == 200
    r = chat(sim_stack, tenant, max_tokens=1)  # the table still says the worker holds it
    assert r.status_code in (200, 503) and adapter_id not in r.text  # never the worker's 404, naming the id
    wait_for(  # the control plane reloads it
        lambda: chat(sim_stack, tenant, max_tokens=1).status_code == 200, 10, "not reloaded", every_s=0.2
    )
