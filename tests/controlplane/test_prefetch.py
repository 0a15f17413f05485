"""Prefetch (issue 19): an adapter that becomes ready has its bytes pushed into the node caches of
the workers a placement would pick next, before any request; its first load fetches nothing. A
real stack whose two tiny-llama workers are vLLM simulators."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from loraplane.controlplane.v1 import admin_pb2, admin_pb2_grpc
from loraplane.stack import Stack, WorkerSpec
from tests.conftest import new_tenant, running_stack, upload
from tests.support import lora_tensors, safetensors_bytes, start_simulator, wait_for, with_metadata

ADAPTER = safetensors_bytes(lora_tensors(rank=4))


@dataclass
class Fleet:
    stack: Stack
    sims: list[str]  # the simulators' URLs, the first worker's first

    def caches(self) -> list[Path]:
        d = self.stack.config.data_dir.resolve()
        return [d / "agent-cache", d / "agent-cache-2"]

    def loads(self) -> int:
        return sum(int(httpx.get(url + "/sim/state", timeout=5).json()["loads"]) for url in self.sims)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    sims: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for _ in range(2):
            sim, url, _ = start_simulator("tiny-llama")
            sims.append(sim)
            urls.append(url)
        second = WorkerSpec(int(urls[1].rpartition(":")[2]), env=(("LORAPLANE_VLLM_URL", urls[1]),))
        env = (("LORAPLANE_VLLM_URL", urls[0]),)
        for stack in running_stack(tmp_path_factory.mktemp("prefetch"), True, env=env, extra_workers=(second,)):
            yield Fleet(stack, urls)
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait(10)


def cached(cache: Path, sha256: str) -> list[Path]:
    return [p for p in cache.rglob(sha256) if p.is_file()]


def test_a_ready_adapter_is_in_the_node_caches_before_its_first_request(fleet: Fleet) -> None:
    key = new_tenant(fleet.stack, "prefetched")
    loads = fleet.loads()
    r = upload(fleet.stack, key, "early", with_metadata(ADAPTER, {"n": "early"}))
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]
    wait_for(lambda: all(cached(c, sha) for c in fleet.caches()), 10, "the bytes were not pushed to both nodes")
    assert fleet.loads() == loads  # cached, not loaded
    adapter_id = r.json()["id"]

    def listed() -> bool:  # each node's heartbeat says so: placement prefers those nodes (no fetch)
        workers = fleet.stack.operator().list_workers().workers
        return all(adapter_id in w.cached_adapter_ids for w in workers)

    wait_for(listed, 10, "the workers' records do not list the adapter as on their node")
    inodes = {p: p.stat().st_ino for c in fleet.caches() for p in cached(c, sha)}
    chat = httpx.post(
        fleet.stack.http_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-llama:early", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        timeout=30,
    )
    assert chat.status_code == 200, chat.text
    assert fleet.loads() == loads + 1
    assert {p: p.stat().st_ino for p in inodes} == inodes  # the load used the pushed bytes: nothing fetched again


def test_an_operator_prefetches_onto_the_workers_named(fleet: Fleet) -> None:
    key = new_tenant(fleet.stack, "prefetch-op")
    r = upload(fleet.stack, key, "named", with_metadata(ADAPTER, {"n": "named"}))
    adapter_id, sha = r.json()["id"], r.json()["sha256"]
    wait_for(lambda: all(cached(c, sha) for c in fleet.caches()), 10, "the bytes were not pushed to both nodes")
    for cache in fleet.caches():  # as if trimmed from the node caches since
        for p in cached(cache, sha):
            p.unlink()
    token = fleet.stack.secrets["operator_token"]
    with grpc.insecure_channel(fleet.stack.grpc_addr) as channel:
        resp = admin_pb2_grpc.AdminServiceStub(channel).PrefetchAdapter(
            admin_pb2.PrefetchAdapterRequest(adapter_id=adapter_id, worker_ids=["embedded-tiny-llama-2"]),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=30,
        )
    assert list(resp.worker_ids) == ["embedded-tiny-llama-2"]
    assert cached(fleet.caches()[1], sha) and not cached(fleet.caches()[0], sha)
