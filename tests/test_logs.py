"""Logs: the JSON and text formats, request id validation, and a request id that follows a
request from the data plane through the control plane to the agent (a stack whose processes
log JSON), with no key, token or prompt on any line."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dataplane import access
from loraplane import logs
from loraplane.stack import Stack
from tests.conftest import running_stack
from tests.support import lora_tensors, safetensors_bytes, start_simulator, wait_for

GENERATED = re.compile(r"req_[0-9a-f]{24}")


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing JSON lines to a string."""
    out = io.StringIO()
    logger = logging.getLogger("tests.logs")
    logger.propagate, logger.level = False, logging.DEBUG
    handler = logs.handler("dataplane", "json", out)
    logger.addHandler(handler)
    yield logger, out
    logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_json_line_has_the_fields_and_the_extras(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = capture
    token = logs.REQUEST_ID.set("test-123")
    try:
        logger.info("placed %s", "adp_1", extra={"tenant_id": "ten_1", "status": 200})
    finally:
        logs.REQUEST_ID.reset(token)
    (line,) = lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("ts"))
    assert line == {
        "level": "INFO",
        "component": "dataplane",
        "logger": "tests.logs",
        "message": "placed adp_1",
        "request_id": "test-123",
        "tenant_id": "ten_1",
        "status": 200,
    }


def test_a_json_line_outside_a_request_has_no_request_id(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = capture
    logger.warning("quiet\nline")
    (line,) = lines(out)  # a newline in a message stays inside its JSON string
    assert "request_id" not in line
    assert line["message"] == "quiet\nline"


def test_a_json_line_carries_the_traceback(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = capture
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    (line,) = lines(out)
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc_info"]


def test_the_text_format_is_the_old_one_plus_the_request_id() -> None:
    out = io.StringIO()
    logger = logging.getLogger("tests.logs.text")
    logger.propagate = False
    logger.addHandler(logs.handler("agent", "text", out))
    logger.warning("outside")
    token = logs.REQUEST_ID.set("test-123")
    try:
        logger.warning("inside")
    finally:
        logs.REQUEST_ID.reset(token)
    first, second = out.getvalue().splitlines()
    assert re.fullmatch(r"\S+ \S+ WARNING tests\.logs\.text: outside", first)
    assert re.fullmatch(r"\S+ \S+ WARNING tests\.logs\.text \[test-123\]: inside", second)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("test-123", True),
        ("A.b_c-9", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("x" * 500, False),
        ("", False),
        ("abc\r\nX-Injected: 1", False),
        ("with space", False),
        ("caf\u00e9", False),
        ("a/b", False),
    ],
)
def test_a_client_request_id_is_kept_only_when_sane(sent: str, kept: bool) -> None:
    got = logs.from_client(sent)
    assert got == sent if kept else GENERATED.fullmatch(got)
    header_id = access.request_id([(b"accept", b"*/*"), (b"x-request-id", sent.encode())])
    assert header_id == sent if kept else GENERATED.fullmatch(header_id)


def test_each_request_without_an_id_gets_a_new_one() -> None:
    first, second = access.request_id([]), access.request_id([])
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


def test_grpc_metadata_carries_a_sane_id_only() -> None:
    assert logs.from_metadata([("authorization", "Bearer k"), ("x-request-id", "test-123")]) == "test-123"
    assert logs.from_metadata([("x-request-id", "bad id")]) == ""
    assert logs.from_metadata(None) == ""
    assert logs.metadata() == ()
    token = logs.REQUEST_ID.set("test-123")
    try:
        assert logs.metadata() == (("x-request-id", "test-123"),)
    finally:
        logs.REQUEST_ID.reset(token)


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(SystemExit, match="LORAPLANE_LOG_FORMAT"):
        logs.setup("dataplane", {"LORAPLANE_LOG_FORMAT": "xml"})


# End to end: a stack (one simulated worker) whose processes log JSON.


@dataclass
class JsonStack:
    stack: Stack
    log_dir: Path

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        text = (self.log_dir / f"{name}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def all_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JsonStack]:
    tmp = tmp_path_factory.mktemp("json-logs")
    sim, url, _ = start_simulator("tiny-llama")
    try:
        env = (("LORAPLANE_LOG_FORMAT", "json"), ("LORAPLANE_VLLM_URL", url))
        for stack in running_stack(tmp, with_worker=True, env=env):
            yield JsonStack(stack, tmp / "logs")
    finally:
        sim.terminate()
        sim.wait(10)


def lines_with(js: JsonStack, name: str, request_id: str, within_s: float = 10) -> list[dict[str, Any]]:
    """`name`'s lines carrying `request_id`, once there is one (the access line follows the answer)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [line for line in js.log_lines(name) if line.get("request_id") == request_id]
        return bool(found)

    wait_for(seen, within_s, f"no {name} line with request id {request_id}")
    return found


def test_a_request_id_follows_a_cold_request_and_no_secret_is_logged(json_stack: JsonStack) -> None:
    stack = json_stack.stack
    tenant = stack.operator().create_tenant("logs-tenant")
    key = tenant.api_key
    auth = {"Authorization": f"Bearer {key}"}
    uploaded = httpx.post(
        stack.http_url + "/v1/adapters/upload",
        headers=auth,
        data={"name": "logged", "base_model": "tiny-llama"},
        files={"file": ("adapter_model.safetensors", safetensors_bytes(lora_tensors(rank=4)))},
        timeout=60,
    )
    assert uploaded.status_code == 201, uploaded.text
    assert GENERATED.fullmatch(uploaded.headers["x-request-id"])  # Starlette routes too
    canary = f"canary-{secrets.token_hex(8)}"
    body = {"model": "tiny-llama:logged", "messages": [{"role": "user", "content": canary}], "max_tokens": 4}
    resp = httpx.post(
        stack.http_url + "/v1/chat/completions",
        headers={**auth, "X-Request-Id": "test-123"},
        json=body,
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "test-123"

    (line,) = [x for x in lines_with(json_stack, "dataplane", "test-123") if x["logger"] == "loraplane.access"]
    assert line["tenant_id"] == tenant.tenant.id
    assert line["component"] == "dataplane" and line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
    assert line["model"] == "tiny-llama:logged" and line["worker_id"] == "embedded-tiny-llama"
    assert line["duration_ms"] > 0
    placement = lines_with(json_stack, "controlplane", "test-123")
    assert any(x["message"].startswith("loaded adp_") for x in placement), placement
    load = lines_with(json_stack, "agent", "test-123")
    assert any(x["message"].startswith("load ") and x.get("ok") is True for x in load), load

    everything = json_stack.all_text()
    for secret in (key, canary, *stack.secrets.values()):
        assert secret not in everything
    for name in ("dataplane", "controlplane", "agent"):  # every line of every component is JSON
        assert json_stack.log_lines(name)


@pytest.mark.parametrize("sent", [b"x" * 500, b"has space;and=more", "caf\u00e9".encode()])
def test_a_bad_request_id_is_replaced(json_stack: JsonStack, sent: bytes) -> None:
    stack = json_stack.stack
    key = stack.operator().create_tenant(f"logs-bad-{secrets.token_hex(4)}").api_key
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = httpx.post(
        stack.http_url + "/v1/chat/completions",
        headers={b"Authorization": f"Bearer {key}".encode(), b"X-Request-Id": sent},
        json=body,
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-request-id"]
    assert GENERATED.fullmatch(rid)
    (line,) = lines_with(json_stack, "dataplane", rid)
    assert line["logger"] == "loraplane.access" and line["worker_id"] == "embedded-tiny-llama"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/chat/completions", {}, 401),  # the hot path's own errors
        ("GET", "/v1/models", {}, 401),  # Starlette's exception handlers
        ("GET", "/no/such/path", {}, 404),  # Starlette's router
        ("GET", "/healthz", {}, 200),
        ("GET", "/healthz", {"X-Forwarded-For": "x" * 17000}, 413),  # refused before any route
    ],
)
def test_every_answer_echoes_the_request_id(
    json_stack: JsonStack, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    resp = httpx.request(
        method, json_stack.stack.http_url + path, headers={**headers, "X-Request-Id": "echo-1"}, timeout=30
    )
    assert resp.status_code == status
    assert resp.headers["x-request-id"] == "echo-1"
    wait_for(  # the access line is written just after the answer's last byte
        lambda: any(x["path"] == path and x["status"] == status for x in lines_with(json_stack, "dataplane", "echo-1")),
        5,
        "no access line",
    )
