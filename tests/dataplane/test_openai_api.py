"""The OpenAI API as clients expect it, from what vLLM really sends: answers recorded from vLLM
0.32 (CPU build, tiny-llama, `vllm_answers/`) replayed by a worker, relayed by the data plane,
and held to OpenAI's published spec (tests/openai_spec) — schema-true, `model` the client's,
nothing of the engine's own; a worker's errors in OpenAI's vocabulary."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from dataplane import shape
from loraplane.catalog import Catalog
from tests import openai_spec
from tests.dataplane.peers import Peer, peer, read_request
from tests.dataplane.test_inference import dataplane
from tests.support import RedisServer

RECORDED = Path(__file__).with_name("vllm_answers")
NULL_FINISH = re.compile(r"^event \d+: \$\.choices\[0\]\.finish_reason: None is not ")
ENGINE_WORDS = ("vllm", "BadRequestError", "NotFoundError", "adp_", "/tmp/", "body.")


def recorded(name: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads((RECORDED / f"{name}.json").read_text())
    return answer


def replaying(name: str) -> Any:
    """A worker that answers every request with what vLLM answered to the recorded one."""
    rec = recorded(name)
    body = rec["body"].encode()
    head = (f"HTTP/1.1 {rec['status']} X\r\ncontent-type: {rec['content_type']}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()  # fmt: skip

    async def handler(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            state.requests.append(request)
            writer.write(head + body)
            await writer.drain()

    return handler


async def relayed(redis_server: RedisServer, tmp_path: Path, name: str) -> httpx.Response:
    """The recorded request sent to a data plane whose worker replays vLLM's recorded answer."""
    rec = recorded(name)
    async with peer(replaying(name)) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as client:
        return await client.post(rec["path"], json=rec["request"] | {"model": "tiny-llama"})


SUCCESSES = {
    "chat": "CreateChatCompletionResponse",
    "chat_n2_logprobs": "CreateChatCompletionResponse",
    "tools_auto": "CreateChatCompletionResponse",
    "tools_required": "CreateChatCompletionResponse",
    "chat_stream": "CreateChatCompletionStreamResponse",
    "chat_stream_usage_logprobs": "CreateChatCompletionStreamResponse",
    "tools_named_stream": "CreateChatCompletionStreamResponse",
    "completion": "CreateCompletionResponse",
    "completion_stream": "CreateCompletionResponse",
    "responses": "Response",
    "responses_stream": "ResponseStreamEvent",
}


@pytest.mark.parametrize("name", SUCCESSES)
async def test_vllms_answers_reach_the_client_schema_true(redis_server: RedisServer, tmp_path: Path, name: str) -> None:
    r = await relayed(redis_server, tmp_path, name)
    assert r.status_code == 200, r.text
    schema = SUCCESSES[name]
    if r.headers["content-type"].startswith("text/event-stream"):
        violations = openai_spec.validate_stream(schema, r.content)
        if schema == "CreateCompletionResponse":  # the spec has one schema for an answer and a chunk:
            violations = [v for v in violations if not NULL_FINISH.search(v)]  # OpenAI sends null mid-stream too
        assert violations == []
        objects = [json.loads(e) for e in openai_spec.events(r.content) if e != "[DONE]"]
        assert r.text.rstrip().endswith("data: [DONE]") or name.startswith("responses")
    else:
        assert openai_spec.validate(schema, r.json()) == []
        objects = [r.json()]
    for obj in objects:
        assert openai_spec.undeclared(schema, obj) == [], obj  # no field of the engine's own
        model = obj["response"]["model"] if "response" in obj else obj.get("model")
        assert model in (None, "tiny-llama")
    assert "vllm" not in r.text.lower() and "adp_x1" not in r.text


ERRORS = {
    # recorded answer: (status, type, code, param)
    "err_context": (400, "invalid_request_error", "context_length_exceeded", "messages"),
    "err_context_completion": (400, "invalid_request_error", "context_length_exceeded", "prompt"),
    "err_max_tokens": (400, "invalid_request_error", None, "max_tokens"),
    "err_temperature": (400, "invalid_request_error", None, "temperature"),
    "err_unknown_model": (502, "server_error", None, None),
}


@pytest.mark.parametrize("name", ERRORS)
async def test_a_workers_errors_are_told_in_openais_words(redis_server: RedisServer, tmp_path: Path, name: str) -> None:
    r = await relayed(redis_server, tmp_path, name)
    status, kind, code, param = ERRORS[name]
    assert r.status_code == status, r.text
    assert openai_spec.validate("ErrorResponse", r.json()) == []
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert not any(word.lower() in error["message"].lower() for word in ENGINE_WORDS), error["message"]
    if status == 400:  # what helps the client is passed on
        assert error["message"] and ("context length" in error["message"] or param in error["message"])


STREAM_ERRORS = {
    # recorded stream: (its chunks' schema, the error's type, code, param)
    "err_stream_chat": ("CreateChatCompletionStreamResponse", "server_error", None, None),
    "err_stream_chat_engine_dead": ("CreateChatCompletionStreamResponse", "server_error", None, None),
    "err_stream_completion": ("CreateCompletionResponse", "server_error", None, None),
    "err_stream_completion_param": ("CreateCompletionResponse", "invalid_request_error", None, "skip_tokenizer_init"),
}


@pytest.mark.parametrize("name", STREAM_ERRORS)
async def test_a_workers_error_in_a_stream_is_told_in_openais_words(
    redis_server: RedisServer, tmp_path: Path, name: str
) -> None:
    """Once its stream has started, vLLM tells of a failure in an event: `{"error": ...}` with its
    exception's class as `type` and the HTTP status as an integer `code` (recorded from vLLM 0.32's
    own stream generators). The client gets it as OpenAI sends one, the error envelope as an
    event (what the SDKs raise as an APIError), in the words a whole error answer would have."""
    r = await relayed(redis_server, tmp_path, name)
    schema, kind, code, param = STREAM_ERRORS[name]
    assert r.status_code == 200, r.text
    data = openai_spec.events(r.content)
    assert data[-1] == "[DONE]", data
    *chunks, failure = [json.loads(d) for d in data[:-1]]
    for chunk in chunks:  # what came before the failure, as ever
        violations = openai_spec.validate(schema, chunk)
        assert [v for v in violations if not NULL_FINISH.search(f"event 0: {v}")] == [], (violations, chunk)
    assert openai_spec.validate("ErrorResponse", failure) == [], failure
    assert openai_spec.undeclared("ErrorResponse", failure) == [], failure
    error = failure["error"]
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert not any(w.lower() in r.text.lower() for w in (*ENGINE_WORDS, "EngineCore", "InternalServerError")), r.text
    if kind == "invalid_request_error":  # what helps the client is passed on
        assert "tokenizer" in error["message"], error


def test_a_responses_streams_error_event_is_the_specs() -> None:
    """A Responses stream's `error` event (vLLM 0.32 sends none: the one it makes of a failure
    fails its own validation, and the stream breaks off) is the spec's ResponseErrorEvent, in
    OpenAI's words, from whatever a worker put in it."""
    event = {"type": "error", "code": 500, "message": "EngineCore encountered an issue. See /opt/vllm/core.py",
             "param": None, "sequence_number": 7}  # fmt: skip
    raw = b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    out = shape.events(raw, "tiny-llama")
    assert out.startswith(b"event: error\n") and openai_spec.validate_stream("ResponseStreamEvent", out) == []
    (data,) = openai_spec.events(out)
    assert json.loads(data) == {"type": "error", "code": None, "message": "The model's worker failed to answer.",
                                "param": None, "sequence_number": 7}  # fmt: skip
    event |= {"code": 400, "message": "ValueError: input too odd for adp_x1", "param": "body.input_text"}
    (data,) = openai_spec.events(shape.events(b"data: " + json.dumps(event).encode(), "m", prompt_param="input"))
    assert json.loads(data) == {"type": "error", "code": None, "message": "input too odd for the adapter",
                                "param": "input", "sequence_number": 7}  # fmt: skip


async def test_an_unknown_role_is_refused_before_any_worker_sees_it(redis_server: RedisServer, tmp_path: Path) -> None:
    """vLLM answers a message of role "wizard" as if it were fine (recorded: 200)."""
    assert recorded("err_bad_role")["status"] == 200
    r = await relayed(redis_server, tmp_path, "err_bad_role")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role", r.text


async def test_responses_are_not_stored_and_say_so(redis_server: RedisServer, tmp_path: Path) -> None:
    async with peer(replaying("responses")) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        for field, value in (("store", True), ("previous_response_id", "resp_1"), ("background", True),
                             ("conversation", "conv_1"), ("conversation", {"id": "conv_1"})):  # fmt: skip
            r = await c.post("/v1/responses", json={"model": "tiny-llama", "input": "hi", field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            assert openai_spec.validate("ErrorResponse", r.json()) == [], r.text
        assert worker.requests == []  # none of them reached a worker
        assert (await c.post("/v1/responses", json={"model": "tiny-llama", "input": "hi"})).status_code == 200
        assert b'"store":false' in worker.requests[-1]  # never kept on a worker tenants share
        assert (await c.get("/v1/responses/resp_9f5242c58e2ae0fc")).status_code == 404


async def test_browsers_are_answered_only_from_the_allowed_origins(redis_server: RedisServer, tmp_path: Path) -> None:
    async with (
        peer(replaying("chat")) as worker,
        dataplane(redis_server, tmp_path, {"w1": worker.url}, cors_origins="https://app.example") as c,
    ):
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        r = await c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]}
        r = await c.post("/v1/chat/completions", json=body, headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await c.post("/v1/chat/completions", json=body, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    async with peer(replaying("chat")) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        r = await c.options("/v1/chat/completions", headers=preflight)  # off by default
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405


async def test_a_wrong_method_is_405_with_what_is_allowed(redis_server: RedisServer, tmp_path: Path) -> None:
    async with peer(replaying("chat")) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        wrong = [("GET", "/v1/chat/completions", {"POST"}), ("PUT", "/v1/adapters", {"GET", "POST"}),
                 ("POST", "/v1/models", {"GET"}), ("PATCH", "/v1/adapters/adp_1", {"GET", "DELETE"})]  # fmt: skip
        for method, path, allowed in wrong:
            r = await c.request(method, path)
            assert r.status_code == 405, (method, path, r.text)
            assert set(r.headers["allow"].replace(" ", "").split(",")) >= allowed
            assert openai_spec.validate("ErrorResponse", r.json()) == []
        r = await c.get("/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


async def test_tool_choice_auto_needs_the_models_parser(redis_server: RedisServer, tmp_path: Path) -> None:
    """The catalog names the model's tool-call parser (tiny-llama: hermes; workers start with
    automatic tool choice on); a model without one takes tools only when the choice is forced."""
    async with peer(replaying("tools_auto")) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "tools": [tool]}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200


async def test_tool_choice_auto_is_refused_for_a_model_without_a_parser(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose catalog entry names no tool-call parser has workers without automatic tool
    choice, which would answer `tools` with `auto` (said or not) with vLLM's 400 naming its own
    flags: refused before any worker sees it, in OpenAI's words; forced and "none" still go."""
    write = Catalog.write

    def without_parser(path: Path, models: list[dict[str, object]]) -> None:
        write(path, [{k: v for k, v in m.items() if k != "tool_parser"} for m in models])

    monkeypatch.setattr(Catalog, "write", staticmethod(without_parser))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "tools": [tool]}
    async with peer(replaying("chat")) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        for choice in ({}, {"tool_choice": "auto"}):
            r = await c.post("/v1/chat/completions", json=body | choice)
            assert r.status_code == 400, r.text
            assert openai_spec.validate("ErrorResponse", r.json()) == [], r.text
            error = r.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", None, "tool_choice")
            assert "tool_choice" in error["message"] and "--" not in error["message"], error
            assert not any(word.lower() in r.text.lower() for word in ENGINE_WORDS), r.text
        assert worker.requests == []
        r = await c.post("/v1/chat/completions", json=body | {"tool_choice": "none"})
        assert r.status_code == 200 and len(worker.requests) == 1, r.text


async def test_a_workers_failure_is_a_502_and_not_held_against_it(redis_server: RedisServer, tmp_path: Path) -> None:
    """What a failing engine says (a class name, a path, its name) stays behind; the request is
    not retried elsewhere, and the worker keeps its place in routing."""
    body = (b'{"error":{"message":"EngineCore failed: /opt/vllm/v1/engine/core.py",'
            b'"type":"InternalServerError","code":500}}')  # fmt: skip
    head = f"HTTP/1.1 500 X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()

    async def failing(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request(reader):
            state.requests.append(request)
            writer.write(head + body)
            await writer.drain()

    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]}
    async with peer(failing) as worker, dataplane(redis_server, tmp_path, {"w1": worker.url}) as c:
        first, second = await c.post("/v1/chat/completions", json=chat), await c.post("/v1/chat/completions", json=chat)
        assert len(worker.requests) == 2  # once each, and the second still sent there
    for r in (first, second):
        assert r.status_code == 502 and openai_spec.validate("ErrorResponse", r.json()) == []
        assert r.json()["error"]["type"] == "server_error"
        assert not any(word.lower() in r.text.lower() for word in (*ENGINE_WORDS, "EngineCore", "/opt/")), r.text
