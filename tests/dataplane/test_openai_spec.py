"""The data plane's real answers against OpenAI's published OpenAPI spec (tests/openai_spec,
vendored by scripts/vendor-openai-spec): completions, chat completions and their streams (one
that fails midway too), responses and their streams, embeddings, models and the error envelope,
each validated in full and every violation listed.

The workers are vLLM simulators asked (`sim_vllm`) for vLLM 0.32's exact answers, null fields,
`n`, `logprobs`, usage chunks and default `system_fingerprint` included: what the data plane
gets from a real worker. Besides the schema, no answer may name vLLM: not in a
`system_fingerprint`, not in an error's words, not by vLLM's own fields (VLLM_FIELDS).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import openai_spec
from tests.conftest import SimStack, new_tenant, upload
from tests.openai_spec import events, undeclared, validate
from tests.support import figure, lora_tensors, safetensors_bytes

ADAPTER = "tiny-llama:spec"
MESSAGES = [{"role": "user", "content": "Say something."}]
# The fields vLLM 0.32 adds to OpenAI's objects (vllm/entrypoints/openai/*/protocol.py): naming
# the engine and its internals (KV transfer, expert routing, token ids), none of them OpenAI's.
VLLM_FIELDS = frozenset({"stop_reason", "token_ids", "routed_experts", "prompt_logprobs", "prompt_token_ids",
                         "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics", "reasoning",
                         "reasoning_content"})  # fmt: skip
# Where the spec is narrower than OpenAI's own API: a completion stream's chunks share
# CreateCompletionResponse (the spec says so), whose `finish_reason` is not nullable, yet every
# chunk but a choice's last has `finish_reason: null`, from OpenAI as from vLLM.
SPEC_GAPS = {
    "CreateCompletionResponse": re.compile(r"^event \d+: \$\.choices\[\d+\]\.finish_reason: None is not "),
}


@pytest.fixture(scope="module", autouse=True)
def count() -> Iterator[None]:
    yield
    figure(f"OpenAI spec validations of the data plane's answers ({openai_spec.source()})", openai_spec.CHECKS[0])


@pytest.fixture(scope="module")
def auth(sim_stack: SimStack) -> dict[str, str]:
    key = new_tenant(sim_stack.stack, "openai-spec")
    r = upload(sim_stack.stack, key, "spec", safetensors_bytes(lora_tensors(rank=4)))
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {key}"}


def post(sim_stack: SimStack, path: str, headers: dict[str, str], **body: object) -> httpx.Response:
    """An inference request the simulator answers as vLLM 0.32 does."""
    return httpx.post(sim_stack.stack.http_url + path, headers=headers, json={"sim_vllm": True, **body}, timeout=60)


def names_vllm(schema_name: str, raw: str, instance: object) -> list[str]:
    """How an answer gives away the engine behind it."""
    out = []
    if "vllm" in raw.lower():
        where = raw.lower().index("vllm")
        out.append(f"the answer names vLLM: {raw[max(0, where - 60) : where + 40]!r}")
    stream = isinstance(instance, list)
    for i, obj in enumerate(instance if isinstance(instance, list) else [instance]):
        at = f"event {i}: " if stream else ""
        fingerprint = obj.get("system_fingerprint") if isinstance(obj, dict) else None
        if isinstance(fingerprint, str) and fingerprint.lower().startswith("vllm"):
            out.append(f"{at}$.system_fingerprint: {fingerprint!r} is vLLM's (its version and config hash)")
        for path in undeclared(schema_name, obj):
            if path.rpartition(".")[2] in VLLM_FIELDS:
                out.append(f"{at}{path}: vLLM's own field, not in the spec's {schema_name}")
    return out


def by_event(problems: list[str]) -> list[str]:
    """A stream's problems, each once, with the events it is in."""
    where: dict[str, list[str]] = {}
    for p in problems:
        event, sep, rest = p.partition(": ")
        if event.startswith("event ") and sep:
            where.setdefault(rest, []).append(event.removeprefix("event "))
        else:
            where.setdefault(p, [])
    return [f"{p} (event{'s' if len(ev) > 1 else ''} {','.join(ev)})" if ev else p for p, ev in where.items()]


def report(title: str, problems: list[str], schema_name: str, instances: list[Any]) -> str:
    extra = sorted({p for obj in instances for p in undeclared(schema_name, obj)
                    if p.rpartition(".")[2] not in VLLM_FIELDS})  # fmt: skip
    lines = [f"{title}: {len(problems)} violation(s) of {schema_name}", *problems]
    if extra:  # the spec's objects are open: noted, not failed
        lines.append(f"(fields the spec does not declare, allowed: {', '.join(extra)})")
    text = "\n  ".join(lines)
    print(text)
    return text


def check(schema_name: str, r: httpx.Response, status: int = 200) -> dict[str, Any]:
    """A whole (JSON) answer: its status, its schema, and nothing of vLLM's."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    body: dict[str, Any] = r.json()
    problems = validate(schema_name, body) + names_vllm(schema_name, r.text, body)
    text = report(f"{r.request.method} {r.request.url.path} -> {r.status_code}", problems, schema_name, [body])
    assert problems == [], text
    return body


def check_stream(schema_name: str, r: httpx.Response, failed: bool = False) -> list[dict[str, Any]]:
    """A streamed answer: SSE, every event valid, `[DONE]` last (not in a Responses stream: it
    ends with its `response.completed`, as OpenAI's does), nothing of vLLM's. `failed`: the
    last event (before `[DONE]`) is an error, OpenAI's envelope (ErrorResponse)."""
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    data = events(r.content)
    if schema_name == "ResponseStreamEvent":
        assert "[DONE]" not in data, "a Responses stream has no `data: [DONE]`"
        named = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
        assert named == [json.loads(d)["type"] for d in data], "each event's `event:` line names its type"
    else:
        assert data and data[-1] == "[DONE]", f"the stream does not end with `data: [DONE]`: {data[-1:]}"
        data = data[:-1]
    chunks: list[dict[str, Any]] = [json.loads(d) for d in data]
    failure = chunks.pop() if failed else None
    gap = SPEC_GAPS.get(schema_name)
    problems = [f"event {i}: {p}" for i, chunk in enumerate(chunks) for p in validate(schema_name, chunk)]
    problems = [p for p in problems if not (gap and gap.match(p))]
    problems += names_vllm(schema_name, r.text, chunks)
    if failure is not None:
        at = f"event {len(chunks)}: "
        problems += [at + p for p in validate("ErrorResponse", failure) + names_vllm("ErrorResponse", "", failure)]
        problems += [f"{at}{p}: not in the spec's Error" for p in undeclared("ErrorResponse", failure)]
    problems = by_event(problems)
    text = report(f"{r.request.method} {r.request.url.path} (stream, {len(data)} events)", problems, schema_name,
                  chunks)  # fmt: skip
    assert problems == [], text
    return chunks if failure is None else [*chunks, failure]


# Chat completions


@pytest.mark.parametrize("model", ["tiny-llama", ADAPTER])
def test_a_chat_completion(sim_stack: SimStack, auth: dict[str, str], model: str) -> None:
    r = post(sim_stack, "/v1/chat/completions", auth, model=model, messages=MESSAGES, max_tokens=3)
    body = check("CreateChatCompletionResponse", r)
    assert body["model"] == model and len(body["choices"]) == 1


def test_a_chat_completion_with_n_2(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/chat/completions", auth, model=ADAPTER, messages=MESSAGES, max_tokens=3, n=2)
    body = check("CreateChatCompletionResponse", r)
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_a_chat_completion_with_logprobs(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/chat/completions", auth, model=ADAPTER, messages=MESSAGES, max_tokens=3,
             logprobs=True, top_logprobs=2)  # fmt: skip
    body = check("CreateChatCompletionResponse", r)
    assert len(body["choices"][0]["logprobs"]["content"]) == 3


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_a_chat_completion_stream(sim_stack: SimStack, auth: dict[str, str], include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    r = post(sim_stack, "/v1/chat/completions", auth, model=ADAPTER, messages=MESSAGES, max_tokens=3, stream=True,
             **options)  # fmt: skip
    chunks = check_stream("CreateChatCompletionStreamResponse", r)
    assert all(c["model"] == ADAPTER for c in chunks)
    assert ("usage" in chunks[-1] and chunks[-1]["choices"] == []) == include_usage


def test_a_chat_completion_stream_with_n_2_and_logprobs(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/chat/completions", auth, model=ADAPTER, messages=MESSAGES, max_tokens=2, stream=True,
             n=2, logprobs=True, top_logprobs=1, stream_options={"include_usage": True})  # fmt: skip
    chunks = check_stream("CreateChatCompletionStreamResponse", r)
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_that_fails_midway(sim_stack: SimStack, auth: dict[str, str], path: str) -> None:
    """The worker's engine fails the request after its first token (vLLM's `{"error": ...}` event,
    its exception class the `type`, the HTTP status an integer `code`): the client gets OpenAI's
    error envelope as the stream's last event, then `[DONE]`."""
    prompt: dict[str, Any] = {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "Once"}
    schema = "CreateChatCompletionStreamResponse" if path == "/v1/chat/completions" else "CreateCompletionResponse"
    r = post(sim_stack, path, auth, model=ADAPTER, max_tokens=3, stream=True, sim_fail="generation_error", **prompt)
    *chunks, failure = check_stream(schema, r, failed=True)
    assert chunks and all(c["model"] == ADAPTER for c in chunks)
    assert failure["error"]["type"] == "server_error" and "InternalServerError" not in r.text, failure


# Completions


def test_a_completion(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/completions", auth, model=ADAPTER, prompt="Once", max_tokens=3, logprobs=2)
    body = check("CreateCompletionResponse", r)
    assert body["choices"][0]["text"] == "tok tok tok"


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include_usage"])
def test_a_completion_stream(sim_stack: SimStack, auth: dict[str, str], include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    r = post(sim_stack, "/v1/completions", auth, model=ADAPTER, prompt="Once", max_tokens=3, stream=True, **options)
    chunks = check_stream("CreateCompletionResponse", r)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "tok tok tok "


# Responses


@pytest.mark.parametrize("model", ["tiny-llama", ADAPTER])
def test_a_response(sim_stack: SimStack, auth: dict[str, str], model: str) -> None:
    r = post(sim_stack, "/v1/responses", auth, model=model, input="Say something.", max_output_tokens=3)
    body = check("Response", r)
    assert body["model"] == model and body["object"] == "response"
    assert body["output"][0]["content"][0]["text"] == "tok tok tok"


def test_a_response_stream(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/responses", auth, model=ADAPTER, input="Say something.", max_output_tokens=3,
             stream=True)  # fmt: skip
    stream = check_stream("ResponseStreamEvent", r)
    kinds = [e["type"] for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    assert "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta") == "tok tok tok"
    assert all(e["response"]["model"] == ADAPTER for e in stream if "response" in e)


# Embeddings


def test_embeddings(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/embeddings", auth, model="tiny-embed", input=["a", "bb"])
    body = check("CreateEmbeddingResponse", r)
    assert [d["index"] for d in body["data"]] == [0, 1]


# Models


def test_the_models_list(sim_stack: SimStack, auth: dict[str, str]) -> None:
    body = check("ListModelsResponse", httpx.get(sim_stack.stack.http_url + "/v1/models", headers=auth))
    assert {"tiny-llama", ADAPTER} <= {m["id"] for m in body["data"]}


@pytest.mark.parametrize("model", ["tiny-llama", ADAPTER])
def test_one_model(sim_stack: SimStack, auth: dict[str, str], model: str) -> None:
    r = httpx.get(f"{sim_stack.stack.http_url}/v1/models/{model}", headers=auth)
    assert r.status_code == 200, (
        f"GET /v1/models/{{model}} (OpenAI's 'retrieve model', models.retrieve() in the SDKs) must answer "
        f"the Model object; got {r.status_code}: {r.text[:300]}"
    )
    assert check("Model", r)["id"] == model


# Errors


def big_body() -> bytes:
    return b'{"model": "tiny-llama", "prompt": "' + b"x" * (2 << 20) + b'"}'


ERRORS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    # id: (method, path, httpx request arguments, status)
    "400-bad-json": ("POST", "/v1/chat/completions", {"content": b'{"model": "tiny-llama", '}, 400),
    "400-bad-max-tokens": (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 0}},
        400,
    ),
    "400-not-a-chat-model": (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "tiny-embed", "messages": MESSAGES}},
        400,
    ),
    "404-unknown-model": (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "tiny-llama:nope", "messages": MESSAGES}},
        404,
    ),
    "404-unknown-base-model": ("POST", "/v1/completions", {"json": {"model": "gpt-17", "prompt": "x"}}, 404),
    "400-responses-store": (
        "POST",
        "/v1/responses",
        {"json": {"model": "tiny-llama", "input": "x", "store": True}},
        400,
    ),
    "404-unknown-path": ("GET", "/v1/nope", {}, 404),
    "405-get-chat": ("GET", "/v1/chat/completions", {}, 405),
    "405-delete-models": ("DELETE", "/v1/models", {}, 405),
    "413-body": ("POST", "/v1/chat/completions", {"content": big_body()}, 413),
    "413-headers": (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "tiny-llama", "messages": MESSAGES}, "headers": {"X-Padding": "x" * 20_000}},
        413,
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_an_error(sim_stack: SimStack, auth: dict[str, str], case: str) -> None:
    method, path, arguments, status = ERRORS[case]
    kwargs = dict(arguments)
    headers = {**auth, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    r = httpx.request(method, sim_stack.stack.http_url + path, headers=headers, timeout=60, **kwargs)
    check("ErrorResponse", r, status)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer lp_nope"}], ids=["no-key", "bad-key"])
def test_a_401(sim_stack: SimStack, headers: dict[str, str]) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")]:
        r = httpx.request(method, sim_stack.stack.http_url + path, headers=headers, json={"model": "tiny-llama"})
        check("ErrorResponse", r, 401)


def test_a_422_for_a_bad_adapter_upload(sim_stack: SimStack, auth: dict[str, str]) -> None:
    key = auth["Authorization"].removeprefix("Bearer ")
    check("ErrorResponse", upload(sim_stack.stack, key, "bad", b"\x80\x04\x95pickle"), 422)


def test_a_worker_that_breaks_off_is_a_502_in_the_envelope(sim_stack: SimStack, auth: dict[str, str]) -> None:
    r = post(sim_stack, "/v1/chat/completions", auth, model="tiny-llama", messages=MESSAGES, max_tokens=1,
             sim_fail="midway")  # fmt: skip
    check("ErrorResponse", r, 502)
