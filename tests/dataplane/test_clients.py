"""The OpenAI clients users call loraplane with, called as users call them, against the data plane
in front of the vLLM simulator: the OpenAI Node SDK (the scripts in tests/clients/node, run with
`node`; `scripts/install` installs the lockfile's version), the OpenAI Python SDK and LangChain's
ChatOpenAI. One test per check; the run's figures say how many ran and how many passed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from pydantic import BaseModel, Field, SecretStr

from tests.conftest import SimStack, new_tenant, upload
from tests.support import ROOT, figure, lora_tensors, safetensors_bytes

NODE_DIR = ROOT / "tests" / "clients" / "node"
NODE_TIMEOUT_S = 60
BASE = "tiny-llama"
EMBED = "tiny-embed"
ADAPTER = "client-checks"
MODEL = f"{BASE}:{ADAPTER}"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 5


def sim_text(tokens: int) -> str:
    """What the simulator answers with `max_tokens=tokens`, whole: the words of its chunks."""
    return " ".join(["tok"] * tokens)


def sim_embedding(text: str) -> list[float]:
    """The simulator's embedding of `text`."""
    return [round(len(text) / 100, 3)] * 8


@dataclass(frozen=True)
class Tenant:
    key: str
    base_url: str  # the data plane's OpenAI API: http://host:port/v1


# --- counting: every check here is one test; the run reports how many ran and passed -----------

RAN = [0]
PASSED = [0]


def _versions() -> str:
    node = json.loads((NODE_DIR / "package-lock.json").read_text())["packages"]["node_modules/openai"]["version"]
    python = {name: importlib.metadata.version(name) for name in ("openai", "langchain-openai")}
    return f"openai-node {node}, openai-python {python['openai']}, langchain-openai {python['langchain-openai']}"


@pytest.fixture(scope="module", autouse=True)
def client_checks() -> Iterator[None]:
    yield
    figure(f"OpenAI client checks run / passed ({_versions()})", f"{RAN[0]} / {PASSED[0]}")


@pytest.fixture(autouse=True)
def client_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Counts this test as a check; as passed if the session's failure count did not move (a
    test's failed call is counted by then: its report comes before its fixtures' teardown)."""
    failed_before = request.session.testsfailed
    yield
    RAN[0] += 1
    PASSED[0] += request.session.testsfailed == failed_before


# --- the stack: a tenant with an adapter ------------------------------------------------------


@pytest.fixture(scope="module")
def tenant(sim_stack: SimStack) -> Tenant:
    key = new_tenant(sim_stack.stack, "client-checks")
    r = upload(sim_stack.stack, key, ADAPTER, safetensors_bytes(lora_tensors(rank=4)))
    assert r.status_code == 201, r.text
    return Tenant(key, sim_stack.stack.http_url + "/v1")


@pytest.fixture(scope="module")
def client(tenant: Tenant) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tenant.base_url, api_key=tenant.key, max_retries=0, timeout=20) as c:
        yield c


def async_client(tenant: Tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tenant.base_url, api_key=tenant.key, max_retries=0, timeout=20)


def chat_model(tenant: Tenant, **fields: Any) -> ChatOpenAI:
    fields = {"max_tokens": MAX_TOKENS, "max_retries": 0, "timeout": 20, **fields}
    return ChatOpenAI(base_url=tenant.base_url, api_key=SecretStr(tenant.key), model=MODEL, **fields)


def worker_saw(sim_stack: SimStack, last: int = 1) -> list[dict[str, Any]]:
    """The last requests tiny-llama's worker (the simulator) received, as the data plane sent them."""
    requests: list[dict[str, Any]] = sim_stack.state()["requests"][-last:]
    return requests


def is_sim_text(text: object) -> bool:
    """An answer of the simulator's, whole: its tokens and nothing else."""
    return isinstance(text, str) and bool(text.split()) and set(text.split()) == {"tok"}


# --- the OpenAI Node SDK ----------------------------------------------------------------------


def node(script: str, tenant: Tenant, model: str = MODEL) -> dict[str, Any]:
    """`node tests/clients/node/<script> --base-url … --model …` (the key in OPENAI_API_KEY, as
    a user's would be): its JSON summary, which says `ok` when the SDK threw nothing unexpected."""
    binary = shutil.which("node")
    assert binary, "node is required for the OpenAI Node SDK's checks: run scripts/install"
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "run scripts/install (npm ci --prefix tests/clients/node)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")} | {"OPENAI_API_KEY": tenant.key}
    done = subprocess.run(
        [binary, script, "--base-url", tenant.base_url, "--model", model],
        cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT_S,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing (exit {done.returncode}): {done.stderr[-2000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    assert summary["ok"] and done.returncode == 0, f"{script}: {summary.get('error')} {done.stderr[-2000:]}"
    return summary


def test_node_chat_completions_create(tenant: Tenant) -> None:
    out = node("chat.mjs", tenant)
    assert (out["object"], out["model"], out["choices"], out["role"]) == ("chat.completion", MODEL, 1, "assistant")
    assert out["content"] == sim_text(MAX_TOKENS) and out["finish_reason"] == "length"
    assert out["id"].startswith("chatcmpl-") and out["usage"]["completion_tokens"] == MAX_TOKENS


def test_node_chat_completions_stream_for_await(tenant: Tenant) -> None:
    out = node("chat_stream.mjs", tenant)
    assert out["chunks"] == MAX_TOKENS and out["content"] == "tok " * MAX_TOKENS
    assert out["finish_reason"] == "length"
    assert (out["models"], out["objects"], len(out["ids"])) == ([MODEL], ["chat.completion.chunk"], 1)


def test_node_run_tools_calls_the_function_and_sends_its_result(tenant: Tenant) -> None:
    """The SDK's tool loop on a forced call: a well-formed call, the function run with its
    arguments, the result sent back as a `tool` message."""
    out = node("run_tools.mjs", tenant)
    assert out["calls"] == ["get_weather"] and len(out["ran"]) == 1, out
    assert out["ran"][0]["city"] in ("Paris", "Rome")
    roles = out["roles"]
    assert "assistant" in roles and "tool" in roles and roles.index("assistant") < roles.index("tool"), out


def test_node_completions_create(tenant: Tenant) -> None:
    out = node("completions.mjs", tenant)  # max_tokens: 4
    assert (out["object"], out["model"], out["choices"]) == ("text_completion", MODEL, 1)
    assert out["text"] == sim_text(4) and out["finish_reason"] == "length"


def test_node_models_list_auto_paginates(tenant: Tenant) -> None:
    out = node("models.mjs", tenant)
    assert {BASE, EMBED, MODEL} <= set(out["ids"]) and len(out["ids"]) == len(set(out["ids"]))
    assert all(m["object"] == "model" for m in out["models"])


@pytest.fixture(scope="module")
def node_embeddings(tenant: Tenant) -> dict[str, Any]:
    """embeddings.mjs, run once for the two tests below."""
    return node("embeddings.mjs", tenant, model=EMBED)


def assert_embeddings(got: dict[str, Any]) -> None:
    assert (got["object"], got["model"], got["indexes"]) == ("list", EMBED, [0, 1])
    want = [sim_embedding("a"), sim_embedding("hello world")]
    assert got["embeddings"] == [pytest.approx(e, rel=1e-6) for e in want]


def test_node_embeddings_create_float(node_embeddings: dict[str, Any]) -> None:
    """encoding_format: 'float'."""
    assert_embeddings(node_embeddings["float"])


def test_node_embeddings_create_as_the_sdk_does_by_default(
    sim_stack: SimStack, node_embeddings: dict[str, Any]
) -> None:
    """No encoding_format: the SDK asks for base64 and decodes the floats from it itself."""
    saw = sim_stack.state(sim_stack.embed_sim_url)["requests"][-2:]  # the script's two requests
    assert [r.get("encoding_format") for r in saw] == ["base64", "float"]  # the data plane passed it on
    assert_embeddings(node_embeddings["default"])


@pytest.fixture(scope="module")
def node_errors(tenant: Tenant) -> dict[str, Any]:
    """errors.mjs's cases, run once for the tests below."""
    return node("errors.mjs", tenant)


def test_node_unknown_model_throws_not_found_error(node_errors: dict[str, Any]) -> None:
    for case in ("unknown_adapter", "unknown_base_model"):
        err = node_errors[case]
        assert err is not None, f"{case}: nothing thrown"
        assert (err["class"], err["status"], err["isNotFoundError"]) == ("NotFoundError", 404, True), err


def test_node_bad_max_tokens_throws_bad_request_error(node_errors: dict[str, Any]) -> None:
    err = node_errors["bad_max_tokens"]
    assert err is not None, "nothing thrown"
    assert (err["class"], err["status"], err["isBadRequestError"]) == ("BadRequestError", 400, True), err
    assert err["param"] == "max_tokens", err


def test_node_wrong_key_throws_authentication_error(node_errors: dict[str, Any]) -> None:
    err = node_errors["wrong_key"]
    assert err is not None, "nothing thrown"
    assert (err["class"], err["status"], err["isAuthenticationError"]) == ("AuthenticationError", 401, True), err


# --- the OpenAI Python SDK ----------------------------------------------------------------------


async def test_python_async_create(tenant: Tenant) -> None:
    async with async_client(tenant) as c:
        completion = await c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    assert completion.model == MODEL and completion.choices[0].message.content == sim_text(MAX_TOKENS)
    assert completion.choices[0].finish_reason == "length"


async def test_python_async_stream(tenant: Tenant) -> None:
    async with async_client(tenant) as c:
        stream = await c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True)
        chunks = [chunk async for chunk in stream]
    assert {chunk.model for chunk in chunks} == {MODEL}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * MAX_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_python_stream_helper_get_final_completion(client: openai.OpenAI) -> None:
    """`client.chat.completions.stream(...)`: the SDK's events, and the completion it assembles."""
    with client.chat.completions.stream(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS) as stream:
        events = [event.type for event in stream]
        final: ChatCompletion
        try:
            final = stream.get_final_completion()
        except openai.LengthFinishReasonError as err:  # the SDK's answer to any answer cut at max_tokens, which
            final = err.completion  # the simulator's all are; the completion it assembled comes with it
    assert events.count("content.delta") == MAX_TOKENS and "content.done" in events
    assert final.model == MODEL and final.choices[0].message.content == "tok " * MAX_TOKENS
    assert final.choices[0].finish_reason == "length"


def test_python_models_retrieve(client: openai.OpenAI) -> None:
    """GET /v1/models/{model}: a base model, the tenant's adapter, and one that does not exist."""
    base = client.models.retrieve(BASE)
    assert (base.id, base.object) == (BASE, "model")
    adapter = client.models.retrieve(MODEL)
    assert (adapter.id, adapter.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(f"{BASE}:no-such-adapter")


def test_python_responses_create(client: openai.OpenAI) -> None:
    """The Responses API (POST /v1/responses), which vLLM serves."""
    response = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=MAX_TOKENS)
    assert response.model == MODEL and response.status in ("completed", "incomplete")
    assert response.output_text == sim_text(MAX_TOKENS)


# --- LangChain: ChatOpenAI ----------------------------------------------------------------------
# ChatOpenAI sends max_tokens as `max_completion_tokens`: the worker is asserted to receive it.


def test_langchain_invoke(sim_stack: SimStack, tenant: Tenant) -> None:
    message = chat_model(tenant).invoke("Say hello.")
    assert isinstance(message, AIMessage) and is_sim_text(message.content), message
    assert message.response_metadata["model_name"] == MODEL
    assert message.response_metadata["finish_reason"] == "length"
    assert worker_saw(sim_stack)[0]["max_completion_tokens"] == MAX_TOKENS


def test_langchain_stream(sim_stack: SimStack, tenant: Tenant) -> None:
    chunks = list(chat_model(tenant).stream("Count to five."))
    assert len(chunks) > 1 and is_sim_text("".join(str(c.content) for c in chunks)), chunks
    request = worker_saw(sim_stack)[0]
    assert request["stream"] is True and request["max_completion_tokens"] == MAX_TOKENS


def test_langchain_batch(sim_stack: SimStack, tenant: Tenant) -> None:
    messages = chat_model(tenant).batch(["one", "two", "three"])
    assert len(messages) == 3 and all(is_sim_text(m.content) for m in messages), messages
    assert sorted(r["messages"][-1]["content"] for r in worker_saw(sim_stack, 3)) == ["one", "three", "two"]


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(description="The city's name")


class Weather(BaseModel):
    """A weather report."""

    city: str
    temperature_c: float


def sent_upstream(sim_stack: SimStack) -> dict[str, Any]:
    """What of a tool or structured-output request reached the worker, for a failure's message."""
    return {k: v for k, v in worker_saw(sim_stack)[0].items() if k in ("tools", "tool_choice", "response_format")}


def test_langchain_bind_tools_gets_a_tool_call(sim_stack: SimStack, tenant: Tenant) -> None:
    """A tool the model is told to call (tool_choice: the function): the answer is a call of it
    with arguments in the tool's schema."""
    message = (
        chat_model(tenant, max_tokens=64)
        .bind_tools([GetWeather], tool_choice="GetWeather")
        .invoke("What is the weather in Paris?")
    )
    assert isinstance(message, AIMessage)
    calls = [call["name"] for call in message.tool_calls]
    assert calls == ["GetWeather"], (message.content, message.tool_calls, sent_upstream(sim_stack))
    GetWeather.model_validate(message.tool_calls[0]["args"])


def test_langchain_with_structured_output(sim_stack: SimStack, tenant: Tenant) -> None:
    """with_structured_output's default (a JSON schema response_format): a parsed object back."""
    try:
        report = chat_model(tenant, max_tokens=64).with_structured_output(Weather).invoke("The weather in Paris?")
    except Exception as err:
        raise AssertionError(f"{type(err).__name__}: {err}; the worker got {sent_upstream(sim_stack)}") from err
    assert isinstance(report, Weather), report
