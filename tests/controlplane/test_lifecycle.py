"""Delete, quotas and limits through the public API, on a real control plane and Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from loraplane.stack import Stack
from tests.conftest import CONTROL_STACK_MAX_BYTES, new_tenant, upload
from tests.support import lora_tensors, safetensors_bytes, wait_for, with_metadata

ADAPTER = safetensors_bytes(lora_tensors(rank=8))


def blob(stack: Stack, sha256: str) -> Path:
    return stack.config.data_dir / "artifacts" / "blobs" / sha256[:2] / sha256


def wait_gone(path: Path) -> None:
    wait_for(lambda: not path.exists(), 10, f"{path} is still there")


def test_delete_is_immediate_and_the_bytes_are_collected(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "deleter")
    auth = {"Authorization": f"Bearer {key}"}
    data = with_metadata(safetensors_bytes(lora_tensors(rank=3)), {"test": "delete"})  # bytes no one else has
    adapter = upload(control_stack, key, "v3", data).json()
    assert blob(control_stack, adapter["sha256"]).exists()

    r = httpx.delete(f"{control_stack.http_url}/v1/adapters/{adapter['id']}", headers=auth)
    assert r.status_code == 200 and r.json() == {"id": adapter["id"], "object": "adapter", "deleted": True}
    assert httpx.get(f"{control_stack.http_url}/v1/adapters/{adapter['id']}", headers=auth).status_code == 404
    chat = {"model": "tiny-llama:v3", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{control_stack.http_url}/v1/chat/completions", headers=auth, json=chat).status_code == 404
    assert httpx.get(f"{control_stack.http_url}/v1/adapters", headers=auth).json()["data"] == []
    assert httpx.delete(f"{control_stack.http_url}/v1/adapters/{adapter['id']}", headers=auth).status_code == 404
    wait_gone(blob(control_stack, adapter["sha256"]))
    assert not blob(control_stack, adapter["sha256"]).exists()

    # The name is free again, and a re-upload is a new adapter with a new id.
    again = upload(control_stack, key, "v3", safetensors_bytes(lora_tensors(rank=5))).json()
    assert again["id"] != adapter["id"] and again["rank"] == 5


def test_bytes_shared_by_two_adapters_outlive_one_delete(control_stack: Stack) -> None:
    alice, bob = new_tenant(control_stack, "share-a"), new_tenant(control_stack, "share-b")
    data = with_metadata(safetensors_bytes(lora_tensors(rank=6)), {"test": "shared"})
    a, b = upload(control_stack, alice, "same", data).json(), upload(control_stack, bob, "same", data).json()
    assert a["sha256"] == b["sha256"] and a["id"] != b["id"]
    httpx.delete(f"{control_stack.http_url}/v1/adapters/{a['id']}", headers={"Authorization": f"Bearer {alice}"})
    time.sleep(0.5)
    assert blob(control_stack, b["sha256"]).exists()
    httpx.delete(f"{control_stack.http_url}/v1/adapters/{b['id']}", headers={"Authorization": f"Bearer {bob}"})
    wait_gone(blob(control_stack, b["sha256"]))
    assert not blob(control_stack, b["sha256"]).exists()


def test_concurrent_uploads_for_the_last_slot_admit_exactly_one(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "quota")
    for i in range(19):  # the shared tier holds 20
        assert upload(control_stack, key, f"a{i}", safetensors_bytes(lora_tensors(rank=1 + i % 8))).status_code == 201
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: upload(control_stack, key, f"race{i}", ADAPTER).status_code, range(8)))
    assert sorted(codes) == [201] + [429] * 7
    listed = httpx.get(f"{control_stack.http_url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()
    assert len(listed["data"]) == 20
    # Deleting one frees one slot.
    httpx.delete(
        f"{control_stack.http_url}/v1/adapters/{listed['data'][0]['id']}", headers={"Authorization": f"Bearer {key}"}
    )
    assert upload(control_stack, key, "after-delete", ADAPTER).status_code == 201
    assert upload(control_stack, key, "one-too-many", ADAPTER).status_code == 429


def test_an_adapter_over_the_tiers_size_limit_is_413(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "big")
    big = safetensors_bytes(lora_tensors(rank=64, modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert len(big) > CONTROL_STACK_MAX_BYTES
    r = upload(control_stack, key, "big", big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"], r.text
