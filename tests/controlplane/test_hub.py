"""Adapters from Hugging Face repos, through the real `huggingface_hub` client and a local hub."""

from __future__ import annotations

import json
import uuid

import httpx

from loraplane.stack import Stack
from tests.conftest import new_tenant
from tests.hubserver import HubServer, Repo
from tests.support import lora_tensors, safetensors_bytes, wait_for

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}).encode()
WEIGHTS = safetensors_bytes(lora_tensors(rank=8))


def register(stack: Stack, key: str, name: str, repo: str, revision: str = "main", **extra: str) -> httpx.Response:
    body = {"name": name, "base_model": "tiny-llama", "repo": repo, "revision": revision, **extra}
    return httpx.post(stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}, json=body)


def settle(stack: Stack, key: str, adapter_id: str) -> dict[str, object]:
    adapter: dict[str, object] = {}

    def settled() -> bool:
        r = httpx.get(f"{stack.http_url}/v1/adapters/{adapter_id}", headers={"Authorization": f"Bearer {key}"})
        adapter.update(r.json())
        return adapter["status"] != "pending"

    wait_for(settled, 30, "adapter stayed pending")
    return adapter


def new_repo(hub: HubServer, files: dict[str, bytes], token: str | None = None) -> tuple[str, Repo]:
    name = f"acme/lora-{uuid.uuid4().hex[:8]}"
    repo = Repo(token=token)
    repo.commit(files)
    hub.repos[name] = repo
    return name, repo


def test_a_repo_revision_is_pinned_to_its_commit(control_stack: Stack, hub: HubServer) -> None:
    key = new_tenant(control_stack, "hub-user")
    name, repo = new_repo(hub, {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS, "README.md": b"x"})
    first_sha = repo.branches["main"]
    r = register(control_stack, key, "from-hub", name)
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    adapter = settle(control_stack, key, r.json()["id"])
    assert adapter["status"] == "ready", adapter
    assert adapter["source"] == {"kind": "huggingface", "repo": name, "revision": "main", "commit_sha": first_sha}
    assert adapter["rank"] == 8 and adapter["lora_alpha"] == 32.0
    # The branch moves: the registered adapter keeps the bytes of the commit it was pinned to.
    repo.commit({"adapter_model.safetensors": safetensors_bytes(lora_tensors(rank=4))})
    again = settle(control_stack, key, r.json()["id"])
    assert again["source"] == adapter["source"] and again["sha256"] == adapter["sha256"]
    # Only the two files were fetched, each at the pinned commit.
    fetched = [line for line in hub.requests if f"/{name}/resolve/" in line]
    assert fetched and all(f"/resolve/{first_sha}/adapter_" in line for line in fetched)


def test_pickle_only_repos_fail_with_a_reason(control_stack: Stack, hub: HubServer) -> None:
    key = new_tenant(control_stack, "hub-pickle")
    name, _ = new_repo(hub, {"adapter_config.json": CONFIG, "adapter_model.bin": b"\x80\x04pickle"})
    r = register(control_stack, key, "pickled", name)
    adapter = settle(control_stack, key, r.json()["id"])
    assert adapter["status"] == "failed"
    assert "pickle" in str(adapter["status_reason"]) and "safetensors" in str(adapter["status_reason"])
    # A failed download holds neither the name nor a quota slot.
    name2, _ = new_repo(hub, {"adapter_model.safetensors": WEIGHTS})
    assert settle(control_stack, key, register(control_stack, key, "pickled", name2).json()["id"])["status"] == "ready"


def test_private_repos_need_the_token_which_is_never_stored(control_stack: Stack, hub: HubServer) -> None:
    key = new_tenant(control_stack, "hub-private")
    secret = "hf_" + uuid.uuid4().hex
    name, _ = new_repo(hub, {"adapter_model.safetensors": WEIGHTS}, token=secret)
    without = settle(control_stack, key, register(control_stack, key, "p1", name).json()["id"])
    assert without["status"] == "failed" and "not found" in str(without["status_reason"])
    with_token = settle(control_stack, key, register(control_stack, key, "p2", name, hf_token=secret).json()["id"])
    assert with_token["status"] == "ready" and secret not in json.dumps(with_token)
    stored = b"".join(p.read_bytes() for p in control_stack.config.data_dir.rglob("*") if p.is_file())
    assert secret.encode() not in stored  # nor in Redis's AOF, nor in any log
    logs = (
        b"".join(p.read_bytes() for p in control_stack.config.log_dir.glob("*.log"))
        if control_stack.config.log_dir
        else b""
    )
    assert secret.encode() not in logs


def test_bad_repos_and_revisions(control_stack: Stack, hub: HubServer) -> None:
    key = new_tenant(control_stack, "hub-bad")
    name, _ = new_repo(hub, {"adapter_model.safetensors": safetensors_bytes(lora_tensors(rank=8, layers=3))})
    cases = {
        "missing": ("acme/does-not-exist", "main", "not found"),
        "revision": (name, "no-such-branch", "revision 'no-such-branch' was not found"),
        "invalid": (name, "main", "layer 2 does not exist"),
    }
    for adapter_name, (repo, revision, reason) in cases.items():
        adapter = settle(control_stack, key, register(control_stack, key, adapter_name, repo, revision).json()["id"])
        assert adapter["status"] == "failed" and reason in str(adapter["status_reason"]), adapter
    assert register(control_stack, key, "x", "../../etc/passwd").status_code == 400
    assert register(control_stack, key, "y", name, revision="../main").status_code == 400
