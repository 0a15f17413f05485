"""The data plane's proxy through a real uvicorn server, in front of the vLLM simulator."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import SimStack, new_tenant
from tests.support import lora_tensors, safetensors_bytes


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
    started = time.monotonic()
    while sim_stack.state()["running"]:
        assert time.monotonic() - started < within_s, "the upstream request is still running"
        time.sleep(0.02)
    return time.monotonic() - started


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
