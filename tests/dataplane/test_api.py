"""The public HTTP API against a real data plane, control plane and Redis (no worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraplane.stack import Stack
from tests.conftest import curl_upload, new_tenant, upload
from tests.support import lora_tensors, safetensors_bytes, wait_for

ADAPTER = safetensors_bytes(lora_tensors(rank=8))


def blobs(stack: Stack) -> list[Path]:
    return sorted((stack.config.data_dir / "artifacts" / "blobs").rglob("*"))


def test_the_documented_curl_upload_works_as_written(control_stack: Stack, tmp_path: Path) -> None:
    key = new_tenant(control_stack, "curl-user")
    (tmp_path / "adapter_model.safetensors").write_bytes(ADAPTER)
    adapter = curl_upload(control_stack, key, tmp_path)
    assert adapter["status"] == "ready" and adapter["model"] == "tiny-llama:my-finetuned-v3"
    assert adapter["rank"] == 8 and adapter["target_modules"] == ["q_proj", "v_proj"]
    listed = httpx.get(control_stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()
    assert [a["id"] for a in listed["data"]] == [adapter["id"]]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer lp_nope"},
     {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer " + "x" * 10000}],
)  # fmt: skip
def test_missing_or_bad_keys_get_one_constant_401(control_stack: Stack, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/adapters"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/adapters/upload")]:  # fmt: skip
        r = httpx.request(method, control_stack.http_url + path, headers=headers, json={"model": "tiny-llama"})
        assert r.status_code == 401
        assert r.json() == {
            "error": {"message": "Invalid or missing API key.", "type": "authentication_error", "param": None,
                      "code": "invalid_api_key"}
        }  # fmt: skip


def test_unknown_base_model_is_404(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "unknown-base")
    r = httpx.post(
        control_stack.http_url + "/v1/adapters/upload",
        headers={"Authorization": f"Bearer {key}"},
        data={"name": "x", "base_model": "gpt-17"},
        files={"file": ("adapter_model.safetensors", ADAPTER)},
    )
    assert r.status_code == 404 and "gpt-17" in r.json()["error"]["message"]
    chat = httpx.post(
        control_stack.http_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x80\x04\x95pickle", "zip or pickle"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "past the end"),
        (safetensors_bytes(lora_tensors(rank=8, layers=3)), "layer 2 does not exist"),
        (safetensors_bytes(lora_tensors(rank=65)), "exceeds this base model's maximum of 64"),
        (safetensors_bytes({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [8, 64]),
                            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [256, 8])}),
         "do not match the base model"),
    ],
)  # fmt: skip
def test_invalid_adapters_get_422_with_the_reason_and_nothing_is_stored(
    control_stack: Stack, data: bytes, reason: str
) -> None:
    key = new_tenant(control_stack, f"invalid-{abs(hash(data)) % 10**8}")
    before = blobs(control_stack)
    r = upload(control_stack, key, "bad", data)
    assert r.status_code == 422, r.text
    assert reason in r.json()["error"]["message"]
    assert blobs(control_stack) == before
    assert (
        httpx.get(control_stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        == []
    )


def test_bad_forms_get_400(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "bad-forms")
    auth = {"Authorization": f"Bearer {key}"}
    url = control_stack.http_url + "/v1/adapters/upload"
    assert httpx.post(url, headers=auth, json={"name": "x"}).status_code == 400
    no_file = httpx.post(
        url, headers=auth, data={"name": "x", "base_model": "tiny-llama"}, files={"config": ("c", b"{}")}
    )
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert upload(control_stack, key, "../etc/passwd", ADAPTER).status_code == 400
    assert upload(control_stack, key, "ok", ADAPTER, lora_alpha="NaN").status_code == 400


def test_a_taken_name_is_409_and_keeps_the_first(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "conflict")
    first = upload(control_stack, key, "same", ADAPTER)
    assert first.status_code == 201
    second = upload(control_stack, key, "same", safetensors_bytes(lora_tensors(rank=2)))
    assert second.status_code == 409
    listed = httpx.get(control_stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()
    assert [a["rank"] for a in listed["data"]] == [8]


def test_another_tenants_adapter_does_not_exist_for_you(control_stack: Stack) -> None:
    alice, bob = new_tenant(control_stack, "alice"), new_tenant(control_stack, "bob")
    as_bob = {"Authorization": f"Bearer {bob}"}
    chat = {"model": "tiny-llama:secret", "messages": [{"role": "user", "content": "hi"}]}
    before_chat = httpx.post(control_stack.http_url + "/v1/chat/completions", headers=as_bob, json=chat)
    adapter = upload(control_stack, alice, "secret", ADAPTER).json()
    before_get = httpx.get(control_stack.http_url + "/v1/adapters/adp_000000000000000000000000", headers=as_bob)

    after_chat = httpx.post(control_stack.http_url + "/v1/chat/completions", headers=as_bob, json=chat)
    after_get = httpx.get(control_stack.http_url + f"/v1/adapters/{adapter['id']}", headers=as_bob)
    assert after_chat.status_code == 404 and after_chat.content == before_chat.content
    assert after_get.status_code == 404
    assert after_get.json()["error"]["message"].replace(adapter["id"], "X") == before_get.json()["error"][
        "message"
    ].replace("adp_000000000000000000000000", "X")
    models = httpx.get(control_stack.http_url + "/v1/models", headers=as_bob).json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert adapter["id"] not in httpx.get(control_stack.http_url + "/v1/adapters", headers=as_bob).text


def test_no_worker_means_503_with_retry_after(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "no-worker")
    r = httpx.post(
        control_stack.http_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 503 and r.headers["retry-after"].isdigit()


def test_a_body_arriving_in_tiny_pieces_is_parsed_whole(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "trickle")
    boundary = "lp-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\ntrickled\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="base_model"\r\n\r\ntiny-llama\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + ADAPTER
        + f"\r\n--{boundary}--\r\n".encode(),
    ]
    body = b"".join(parts)

    def trickle() -> Iterator[bytes]:
        for i in range(0, 4095, 7):  # the fields in 7-byte pieces, then the rest
            yield body[i : i + 7]
        yield body[4095:]

    r = httpx.post(
        control_stack.http_url + "/v1/adapters/upload",
        headers={"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=trickle(),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "trickled" and r.json()["size_bytes"] == len(ADAPTER)


def test_an_upload_cut_off_midway_leaves_nothing(control_stack: Stack) -> None:
    import socket

    key = new_tenant(control_stack, "cut-off")
    boundary = "cut-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\ncut\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="base_model"\r\n\r\ntiny-llama\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    ).encode() + ADAPTER[: len(ADAPTER) // 2]
    request = (
        f"POST /v1/adapters/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(head) * 2}\r\n\r\n"
    ).encode() + head
    before = blobs(control_stack)
    with socket.create_connection(("127.0.0.1", control_stack.config.http_port)) as s:
        s.sendall(request)
        time.sleep(0.5)  # the half file is streaming to the control plane; then the client goes away
    tmp = control_stack.config.data_dir / "artifacts" / "tmp"
    wait_for(lambda: [p for p in tmp.rglob("*") if p.is_file()] == [], 10, "the cut-off upload's staging file stayed")
    assert blobs(control_stack) == before
    listed = httpx.get(control_stack.http_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()
    assert listed["data"] == []
    assert upload(control_stack, key, "cut", ADAPTER).status_code == 201  # the name was never taken


def test_one_model_is_looked_up_as_the_list_shows_it(control_stack: Stack) -> None:
    """GET /v1/models/{model}: a tenant's adapter (created when it was), the catalog's base model
    (created when the catalog was written), and the same 404 for another tenant's as for none."""
    alice, bob = new_tenant(control_stack, "alice-models"), new_tenant(control_stack, "bob-models")
    adapter = upload(control_stack, alice, "mine", ADAPTER).json()

    def get(key: str, model: str) -> httpx.Response:
        return httpx.get(f"{control_stack.http_url}/v1/models/{model}", headers={"Authorization": f"Bearer {key}"})

    models = httpx.get(control_stack.http_url + "/v1/models", headers={"Authorization": f"Bearer {alice}"}).json()
    by_id = {m["id"]: m for m in models["data"]}
    mine = get(alice, "tiny-llama:mine")
    assert mine.status_code == 200 and mine.json() == by_id["tiny-llama:mine"]
    assert mine.json()["created"] == adapter["created_at"]
    base = get(alice, "tiny-llama").json()
    assert base == by_id["tiny-llama"] and base["created"] > 1_600_000_000
    theirs, nothing = get(bob, "tiny-llama:mine"), get(bob, "tiny-llama:nothing")
    assert theirs.status_code == nothing.status_code == 404
    assert theirs.json()["error"]["message"].replace("mine", "X") == nothing.json()["error"]["message"].replace(
        "nothing", "X"
    )


def test_an_upload_declared_over_the_limit_is_refused_at_once(control_stack: Stack) -> None:
    """No `100 Continue`, no wait for a body that will not be read: the 413 at once, then the
    connection closed."""
    import socket

    key = new_tenant(control_stack, "too-large")
    head = (
        f"POST /v1/adapters/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000000\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", control_stack.config.http_port), timeout=5) as s:
        s.sendall(head)
        answer = b""
        while chunk := s.recv(65536):  # until the server closes (a socket timeout fails the test)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer and b"connection: close" in answer.lower()
