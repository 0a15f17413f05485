"""Tiers that mean capacity, on two real vLLM workers (the full stack): a dedicated tenant's pool,
a reserved tenant's pinned adapter through an eviction storm, and fair queuing when the workers
are full."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loraplane.controlplane.v1 import tenant_pb2
from loraplane.stack import Stack, http_ok, wait_until
from tests.conftest import upload
from tests.e2e.test_end_to_end import W1, W2, _holders, _loads_logged, _serving
from tests.support import free_port, lora_tensors, metric, safetensors_bytes, scrape, wait_for, with_metadata

ADAPTER = safetensors_bytes(lora_tensors(rank=8))  # zeros: the base model's answers, any adapter id


def _tenant(stack: Stack, name: str, tier: tenant_pb2.Tier) -> tuple[str, str]:
    resp = stack.operator().create_tenant(name, tier)
    return resp.tenant.id, resp.api_key


def _adapter(stack: Stack, key: str, name: str) -> str:
    r = upload(stack, key, name, with_metadata(ADAPTER, {"name": name}))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _chat(url: str, key: str, model: str, max_tokens: int = 2, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens},
        timeout=timeout,
    )


def _served(port: int) -> float:
    """Requests the vLLM on `port` has finished (its own counter)."""
    page = scrape(f"http://127.0.0.1:{port}/metrics")
    return sum(v for (name, _), v in page.items() if name == "vllm:request_success_total")


@pytest.fixture
def serving(full_stack: Stack) -> Iterator[Stack]:
    """Every worker serving before and after (a test here stops an agent)."""
    wait_for(lambda: _serving(full_stack), 120, "no healthy worker", every_s=0.2)
    yield full_stack
    if full_stack.procs["agent-2"].poll() is not None:
        full_stack.restart("agent-2")
    wait_for(lambda: _serving(full_stack), 120, "the workers did not come back", every_s=0.2)


def test_a_dedicated_tenants_pool_serves_it_alone(serving: Stack) -> None:
    stack, op = serving, serving.operator()
    dedicated, d_key = _tenant(stack, "pool-owner", tenant_pb2.TIER_DEDICATED)
    _, s_key = _tenant(stack, "pool-neighbour", tenant_pb2.TIER_SHARED)
    d_adapter, s_adapter = _adapter(stack, d_key, "mine"), _adapter(stack, s_key, "theirs")
    op.force_load(s_adapter, W2)  # the neighbour's adapter is on the worker about to be assigned
    with pytest.raises(grpc.RpcError) as refused:
        op.assign_worker(W2, _tenant(stack, "not-dedicated", tenant_pb2.TIER_SHARED)[0])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    try:
        assigned = op.assign_worker(W2, dedicated)
        assert s_adapter in assigned.evicted_adapter_ids and W2 not in _holders(stack, s_adapter)
        listed = {w.worker_id: w for w in op.list_workers().workers}
        assert (listed[W2].pool_tenant_id, listed[W1].pool_tenant_id) == (dedicated, "")

        for _ in range(3):  # each tenant's adapter on its side of the line, and only there
            assert _chat(stack.http_url, d_key, "tiny-llama:mine").status_code == 200
            assert _chat(stack.http_url, s_key, "tiny-llama:theirs").status_code == 200
        assert _holders(stack, d_adapter) == {W2} and _holders(stack, s_adapter) == {W1}
        with pytest.raises(grpc.RpcError) as outside:
            op.force_load(s_adapter, W2)
        assert outside.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        ports = (stack.config.vllm_port, stack.config.extra_workers[0].vllm_port)
        before = [_served(port) for port in ports]
        for _ in range(3):  # base-model requests too: the owner's to its pool, the others' elsewhere
            assert _chat(stack.http_url, d_key, "tiny-llama").status_code == 200
        assert _chat(stack.http_url, s_key, "tiny-llama").status_code == 200
        assert [_served(port) - n for port, n in zip(ports, before, strict=True)] == [1, 3]

        # Its pool down: a 503 saying so, not a shared worker; with spill-over, a shared worker.
        stack.procs["agent-2"].send_signal(signal.SIGKILL)
        stack.procs["agent-2"].wait(10)
        wait_for(lambda: not {w.worker_id: w for w in op.list_workers().workers}[W2].healthy, 20, "still healthy")
        down = _chat(stack.http_url, d_key, "tiny-llama:mine")
        assert down.status_code == 503 and "dedicated" in down.json()["error"]["message"], down.text
        op.set_capacity(dedicated, spill_over=True)
        wait_for(lambda: _chat(stack.http_url, d_key, "tiny-llama:mine").status_code == 200, 10, "no spill-over")
        assert W1 in _holders(stack, d_adapter)
    finally:
        op.set_capacity(dedicated, spill_over=False)
        op.unassign_worker(W2)
    assert {w.worker_id: w for w in op.list_workers().workers}[W2].pool_tenant_id == ""


def test_a_pinned_adapter_rides_out_an_eviction_storm(serving: Stack) -> None:
    stack, op = serving, serving.operator()
    _, r_key = _tenant(stack, "pinner", tenant_pb2.TIER_RESERVED)
    _, s_key = _tenant(stack, "stormer", tenant_pb2.TIER_SHARED)
    pinned = [_adapter(stack, r_key, f"keep-{i}") for i in range(3)]
    headers = {"Authorization": f"Bearer {r_key}"}
    r = httpx.post(f"{stack.http_url}/v1/adapters/{pinned[0]}/pin", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["pinned"] and r.json()["pinned_slots"] == {"used": 1, "allowed": 2}
    assert _holders(stack, pinned[0])  # loaded when pinned, before any request
    assert httpx.post(f"{stack.http_url}/v1/adapters/{pinned[1]}/pin", headers=headers, timeout=60).status_code == 200
    over = httpx.post(f"{stack.http_url}/v1/adapters/{pinned[2]}/pin", headers=headers, timeout=60)
    assert over.status_code == 429 and "2" in over.json()["error"]["message"], over.text

    slots = sum(w.max_adapters for w in op.list_workers().workers)
    storm = [_adapter(stack, s_key, f"storm-{i}") for i in range(slots + 2)]  # more than every slot
    for i in range(len(storm)):
        assert _chat(stack.http_url, s_key, f"tiny-llama:storm-{i}").status_code == 200
        assert _holders(stack, pinned[0]) and _holders(stack, pinned[1]), f"a pinned adapter left at {i}"
    assert sum(bool(_holders(stack, a)) for a in storm) < len(storm)  # the storm did evict
    assert _chat(stack.http_url, r_key, "tiny-llama:keep-0").status_code == 200
    assert _loads_logged(stack, pinned[0]) == 1  # loaded once, when pinned: never a cold load
    unpinned = httpx.delete(f"{stack.http_url}/v1/adapters/{pinned[0]}/pin", headers=headers, timeout=10)
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False


@pytest.fixture
def queued_dataplane(full_stack: Stack, tmp_path: Path) -> Iterator[str]:
    """Another data plane on the full stack's workers that keeps each to 2 requests in flight."""
    port = free_port()
    env = full_stack.env() | {
        "LORAPLANE_HTTP_PORT": str(port),
        "LORAPLANE_WORKER_CONCURRENCY": "2",
        "LORAPLANE_DATAPLANE_REPLICAS": "1",  # each worker's 2 for this one (the stack's own sends nothing here)
        "LORAPLANE_CONTROLPLANE_ADDR": f"127.0.0.1:{full_stack.config.second_grpc_port}",
    }
    with open(tmp_path / "dataplane.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane.app"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(url + "/readyz"), 60, "queued data plane", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_light_tenant_does_not_queue_behind_a_flood(full_stack: Stack, queued_dataplane: str) -> None:
    """Four slots (two workers, two each): a shared tenant floods them with three times as many
    requests; a reserved tenant that was active a moment ago keeps getting a slot at once."""
    url = queued_dataplane
    _, flood_key = _tenant(full_stack, "flood", tenant_pb2.TIER_SHARED)
    _, light_key = _tenant(full_stack, "light", tenant_pb2.TIER_RESERVED)
    assert _chat(url, light_key, "tiny-llama").status_code == 200  # active a moment ago
    statuses: list[int] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            statuses.append(_chat(url, flood_key, "tiny-llama", max_tokens=48).status_code)

    threads = [threading.Thread(target=flood) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: _depth(url) > 0, 30, "the flood never queued")
        light = []
        for _ in range(5):
            started = time.monotonic()
            assert _chat(url, light_key, "tiny-llama", max_tokens=4).status_code == 200
            light.append(time.monotonic() - started)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    pages = [scrape(url + "/metrics")]
    # The flood waited; the light tenant's requests, which found the flood's waiting, never did.
    assert metric(pages, "loraplane_queue_wait_seconds_sum", tier="shared") > 1
    light_waits = metric(pages, "loraplane_queue_wait_seconds_count", tier="reserved")
    assert light_waits == metric(pages, "loraplane_queue_wait_seconds_bucket", tier="reserved", le="0.01")
    assert statuses and set(statuses) == {200}  # the flood was slowed, not refused
    wait_for(lambda: _depth(url) == 0, 30, "requests left waiting")


def _depth(url: str) -> float:
    page = scrape(url + "/metrics")
    return sum(v for (name, _), v in page.items() if name == "loraplane_queue_depth")
