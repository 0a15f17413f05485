"""Tenant isolation, probed for real while the victim's adapter is hot on the worker: another
tenant names it by name, id, case and unicode variants, through the body, the query and headers;
every probe gets exactly the bytes it gets once the adapter no longer exists. Same-name adapters
of two tenants on one worker each answer for their own tenant; a re-uploaded name is the new
weights; nothing leaks through /v1/models, error messages or logs."""

from __future__ import annotations

import unicodedata

import httpx
import pytest

from loraplane.stack import Stack
from tests.conftest import SimStack, new_tenant
from tests.reliability.conftest import logs
from tests.support import figure, lora_tensors, safetensors_bytes, with_metadata

NAME = "secret-v1"
CANARY = "CANARY-PROMPT-7f3a"  # a prompt no log may hold


def variants(name: str, adapter_id: str, tenant_id: str) -> list[str]:
    """What another tenant might type for the victim's adapter."""
    names = {
        name,
        name.upper(),
        name.capitalize(),
        f" {name}",
        f"{name} ",
        f"{name}\u200b",  # zero-width space
        name.replace("-", "\u2010"),  # unicode hyphen
        name.replace("s", "\u0455"),  # Cyrillic dze, looks like s
        unicodedata.normalize("NFKC", name).replace("e", "\uff45"),  # fullwidth e
        f"{name}\x00",
        f"../{name}",
        f"{tenant_id}/{name}",
        f"{tenant_id}:{name}",
        adapter_id,
        adapter_id.upper(),
        f"{name}/../{name}",
        f"%2e%2e/{name}",
    }
    return sorted(f"tiny-llama:{n}" for n in names) + [adapter_id, f"tiny-llama:{name}:{name}"]


def adapter_bytes(tag: str) -> bytes:
    return with_metadata(safetensors_bytes(lora_tensors(rank=4)), {"tag": tag})


def upload(stack: Stack, headers: dict[str, str], name: str, tag: str) -> dict[str, str]:
    r = httpx.post(
        stack.http_url + "/v1/adapters/upload",
        headers=headers,
        data={"name": name, "base_model": "tiny-llama"},
        files={"file": ("adapter_model.safetensors", adapter_bytes(tag))},
    )
    assert r.status_code == 201, r.text
    body: dict[str, str] = r.json()
    return body


def chat(stack: Stack, headers: dict[str, str], model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": CANARY}], "max_tokens": 2}
    return httpx.post(stack.http_url + "/v1/chat/completions", headers=headers, json=body | extra, timeout=30)


def probes(stack: Stack, attacker: dict[str, str], models: list[str], adapter_id: str, tenant_id: str) -> list[bytes]:
    """Every way the attacker can ask for the victim's adapter; what each got (status + body)."""
    out = []
    url = stack.http_url
    with httpx.Client(timeout=30) as client:
        for model in models:
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                body = {"model": model, "prompt": "x", "input": "x", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "x"}]}  # fmt: skip
                r = client.post(url + path, headers=attacker, json=body)
                out.append(b"%d %s" % (r.status_code, r.content))
            r = client.post(url + "/v1/chat/completions", params={"model": model}, headers=attacker,
                            json={"messages": [{"role": "user", "content": "x"}]})  # fmt: skip
            out.append(b"%d %s" % (r.status_code, r.content))
        for header in ("OpenAI-Organization", "X-Tenant-Id", "X-Loraplane-Tenant", "OpenAI-Project"):
            body = {"model": f"tiny-llama:{NAME}", "messages": [{"role": "user", "content": "x"}]}
            r = client.post(url + "/v1/chat/completions", headers={**attacker, header: tenant_id}, json=body)
            out.append(b"%d %s" % (r.status_code, r.content))
        for ref in (adapter_id, NAME, adapter_id.upper()):
            for method in ("GET", "DELETE"):
                r = client.request(method, f"{url}/v1/adapters/{ref}", headers=attacker)
                out.append(b"%d %s" % (r.status_code, r.content))
    return out


@pytest.fixture(scope="module")
def tenants(sim_stack: SimStack) -> tuple[dict[str, str], dict[str, str]]:
    victim = {"Authorization": f"Bearer {new_tenant(sim_stack.stack, 'iso-victim')}"}
    attacker = {"Authorization": f"Bearer {new_tenant(sim_stack.stack, 'iso-attacker')}"}
    return victim, attacker


def test_another_tenants_hot_adapter_does_not_exist_for_you(
    sim_stack: SimStack, tenants: tuple[dict[str, str], dict[str, str]]
) -> None:
    stack = sim_stack.stack
    victim, attacker = tenants
    adapter = upload(stack, victim, NAME, "victim")
    tenant_id = _tenant_id(stack, "iso-victim")
    assert chat(stack, victim, f"tiny-llama:{NAME}").status_code == 200  # hot on the worker now
    assert adapter["id"] in sim_stack.state()["adapters"]
    models = variants(NAME, adapter["id"], tenant_id)
    while_hot = probes(stack, attacker, models, adapter["id"], tenant_id)
    successes = [p for p in while_hot if not p.startswith(b"4")]
    # The victim's adapter gone: what "does not exist" looks like for the same probes.
    assert httpx.delete(f"{stack.http_url}/v1/adapters/{adapter['id']}", headers=victim).status_code == 200
    gone = probes(stack, attacker, models, adapter["id"], tenant_id)
    different = [(a, b) for a, b in zip(while_hot, gone, strict=True) if a != b]
    figure("cross-tenant probes (hot victim adapter; body, query, headers, paths)", len(while_hot))
    figure("cross-tenant probe successes", len(successes))
    figure("cross-tenant probes answered differently from 'does not exist'", len(different))
    assert successes == [] and different == []


def test_same_name_adapters_of_two_tenants_each_answer_for_their_own(
    sim_stack: SimStack, tenants: tuple[dict[str, str], dict[str, str]]
) -> None:
    """Both on the one tiny-llama worker, the same prompt: each request reaches its own tenant's
    upload (vLLM's prefix cache is keyed by adapter name: the names vLLM sees differ)."""
    stack = sim_stack.stack
    one, two = tenants
    a, b = upload(stack, one, "shared-name", "one"), upload(stack, two, "shared-name", "two")
    assert a["id"] != b["id"]
    for headers, expected in ((one, a["id"]), (two, b["id"]), (one, a["id"])):
        assert chat(stack, headers, "tiny-llama:shared-name").status_code == 200
        assert sim_stack.state()["requests"][-1]["model"] == expected
    assert {a["id"], b["id"]} <= set(sim_stack.state()["adapters"])


def test_a_reuploaded_name_serves_the_new_weights(
    sim_stack: SimStack, tenants: tuple[dict[str, str], dict[str, str]]
) -> None:
    stack = sim_stack.stack
    victim, _ = tenants
    old = upload(stack, victim, "reused", "old")
    assert chat(stack, victim, "tiny-llama:reused").status_code == 200
    assert httpx.delete(f"{stack.http_url}/v1/adapters/{old['id']}", headers=victim).status_code == 200
    new = upload(stack, victim, "reused", "new")
    assert new["sha256"] != old["sha256"] and new["id"] != old["id"]
    for _ in range(3):
        assert chat(stack, victim, "tiny-llama:reused").status_code == 200
        assert sim_stack.state()["requests"][-1]["model"] == new["id"]


def test_nothing_leaks_through_models_errors_or_logs(
    sim_stack: SimStack, tenants: tuple[dict[str, str], dict[str, str]]
) -> None:
    stack = sim_stack.stack
    victim, attacker = tenants
    upload(stack, victim, "private-name", "private")
    assert chat(stack, victim, "tiny-llama:private-name").status_code == 200
    listed = httpx.get(stack.http_url + "/v1/models", headers=attacker).text
    assert "private-name" not in listed and "secret" not in listed
    errors = [
        chat(stack, attacker, "tiny-llama:private-name").text,
        chat(stack, attacker, "tiny-llama", max_tokens=10**9).text,
        chat(stack, attacker, "tiny-llama", sim_fail="midway").text,
        httpx.get(stack.http_url + "/v1/adapters/adp_x", headers=attacker).text,
        httpx.post(stack.http_url + "/v1/adapters/upload", headers=attacker, files={"file": ("a", b"x")}).text,
    ]
    forbidden = [stack.config.data_dir.name, "/tmp", "127.0.0.1", sim_stack.sim_url, "lp_", "Traceback"]
    leaks = [(e, f) for e in errors for f in forbidden if f in e]
    secrets = [h["Authorization"].split()[1] for h in tenants] + list(stack.secrets.values())
    log_text = logs(stack)
    logged = [s[:6] + "…" for s in secrets if s in log_text] + ([CANARY] if CANARY in log_text else [])
    figure("secrets and prompts found in the logs", len(logged))
    assert leaks == [] and logged == []


def _tenant_id(stack: Stack, name: str) -> str:
    return next(t.id for t in stack.operator().list_tenants().tenants if t.name == name)
