"""The agent's vLLM client (`workeragent/vllm.py`) against an aiohttp server on 127.0.0.1:0 that
answers as vLLM's OpenAI server does and records what it was sent."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from workeragent import vllmguard
from workeragent.vllm import IDLE_AFTER_S, VllmClient, VllmError


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeVllm:
    """Answers (status, body, content type) by (method, path); 404 for the rest."""

    url: str = ""
    answers: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path, dict(request.headers), await request.read()))
        status, body, ctype = self.answers.get((request.method, request.path), (404, "Not Found", "text/plain"))
        return web.Response(status=status, text=body, content_type=ctype)


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    fake = FakeVllm()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}/"  # a trailing slash, as an operator may write it
    yield fake
    await runner.cleanup()


@pytest.fixture
async def client(vllm: FakeVllm) -> AsyncIterator[VllmClient]:
    async with aiohttp.ClientSession() as session:
        yield VllmClient(vllm.url, "sk-vllm", "agent-secret", session)


OK_JSON = (200, '{"status": "ok"}', "application/json")


async def test_load_posts_the_adapter_name_and_path_with_both_credentials(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["POST", "/v1/load_lora_adapter"] = (
        200,
        "Success: LoRA adapter 'a1' added successfully.",
        "text/plain",
    )
    await client.load("a1", "/cache/adp_1")
    (seen,) = vllm.seen
    assert (seen.method, seen.path) == ("POST", "/v1/load_lora_adapter")
    assert json.loads(seen.body) == {"lora_name": "a1", "lora_path": "/cache/adp_1"}
    assert seen.headers["Authorization"] == "Bearer sk-vllm"
    assert seen.headers[vllmguard.SECRET_HEADER] == "agent-secret"


async def test_unload_posts_the_adapter_name(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["POST", "/v1/unload_lora_adapter"] = OK_JSON
    await client.unload("a1")
    (seen,) = vllm.seen
    assert (seen.path, json.loads(seen.body)) == ("/v1/unload_lora_adapter", {"lora_name": "a1"})


async def test_no_credentials_are_sent_when_none_are_configured(vllm: FakeVllm) -> None:
    vllm.answers["POST", "/v1/unload_lora_adapter"] = OK_JSON
    async with aiohttp.ClientSession() as session:
        await VllmClient(vllm.url, "", "", session).unload("a1")
    assert "Authorization" not in vllm.seen[0].headers
    assert vllmguard.SECRET_HEADER not in vllm.seen[0].headers


@pytest.mark.parametrize("verb", ["load", "unload"])
async def test_an_error_answer_is_a_vllm_error_with_status_and_body(
    vllm: FakeVllm, client: VllmClient, verb: str
) -> None:
    error = {"object": "error", "message": "The lora adapter 'a1' has already been loaded.", "code": 400}
    vllm.answers["POST", f"/v1/{verb}_lora_adapter"] = (400, json.dumps(error), "application/json")
    with pytest.raises(VllmError) as caught:
        await (client.load("a1", "/p") if verb == "load" else client.unload("a1"))
    assert str(caught.value).startswith(f"/v1/{verb}_lora_adapter answered 400: ")
    assert "has already been loaded" in str(caught.value)


async def test_a_long_error_body_is_cut_to_500_characters(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["POST", "/v1/load_lora_adapter"] = (500, "x" * 5000, "text/plain")
    with pytest.raises(VllmError) as caught:
        await client.load("a1", "/p")
    assert str(caught.value) == "/v1/load_lora_adapter answered 500: " + "x" * 500


async def test_healthy_is_a_200_from_health(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["GET", "/health"] = (200, "", "text/plain")
    assert await client.healthy()
    vllm.answers["GET", "/health"] = (503, "", "text/plain")
    assert not await client.healthy()
    assert [s.path for s in vllm.seen] == ["/health", "/health"]


async def test_a_vllm_that_is_not_listening_is_unhealthy(vllm: FakeVllm) -> None:
    async with aiohttp.ClientSession() as session:
        assert not await VllmClient("http://127.0.0.1:1", "", "", session).healthy()


async def test_resident_lists_the_models_with_a_parent(vllm: FakeVllm, client: VllmClient) -> None:
    models = {
        "object": "list",
        "data": [
            {"id": "tiny-llama", "object": "model", "root": "/models/tiny-llama", "parent": None},
            {"id": "zeta", "object": "model", "root": "/cache/z", "parent": "tiny-llama"},
            {"id": "alpha", "object": "model", "root": "/cache/a", "parent": "tiny-llama"},
        ],
    }
    vllm.answers["GET", "/v1/models"] = (200, json.dumps(models), "application/json")
    assert await client.resident() == ["alpha", "zeta"]
    assert vllm.seen[0].headers["Authorization"] == "Bearer sk-vllm"


async def test_resident_fails_on_an_error_answer(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["GET", "/v1/models"] = (401, '{"error": "Unauthorized"}', "application/json")
    with pytest.raises(VllmError, match="401"):
        await client.resident()


def metrics_page(
    lora_samples: list[tuple[str, str, float]], running: tuple[float, ...], waiting: tuple[float, ...]
) -> str:
    """A /metrics page as vLLM's prometheus_client renders it: one series per engine for the
    request gauges, a `lora_requests_info` sample per (running, waiting) adapters seen, valued
    at the time it was set, and the other families around them."""
    lines = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 5121.0',
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        *(f'vllm:num_requests_running{{engine="{i}",model_name="tiny-llama"}} {v!r}' for i, v in enumerate(running)),
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        *(f'vllm:num_requests_waiting{{engine="{i}",model_name="tiny-llama"}} {v!r}' for i, v in enumerate(waiting)),
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        *(
            f'vllm:lora_requests_info{{max_lora="8",running_lora_adapters="{r}",waiting_lora_adapters="{w}"}} {t!r}'
            for r, w, t in lora_samples
        ),
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 1234.0',
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny-llama"} 0.0',
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 3.0',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 3.0',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-llama"} 0.25',
    ]
    return "\n".join(lines) + "\n"


async def test_activity_reads_the_newest_lora_sample_and_sums_requests_over_engines(
    vllm: FakeVllm, client: VllmClient
) -> None:
    now = time.time()
    samples = [("old-a", "", now - 30), ("a1,a2", "a3", now - 0.05), ("", "", now - 60), ("a4", "", now - 1)]
    page = metrics_page(samples, running=(2.0, 1.0), waiting=(1.0, 0.0))
    vllm.answers["GET", "/metrics"] = (200, page, "text/plain")
    assert await client.activity() == ({"a1", "a2", "a3"}, 4)
    assert (client.running, client.waiting) == (3.0, 1.0)
    assert await client.busy() == {"a1", "a2", "a3"}
    assert vllm.seen[0].headers["Authorization"] == "Bearer sk-vllm"


async def test_an_engine_silent_for_a_while_runs_no_adapter(vllm: FakeVllm, client: VllmClient) -> None:
    stale = time.time() - IDLE_AFTER_S - 5
    page = metrics_page([("a1", "a2", stale)], running=(1.0,), waiting=(2.0,))
    vllm.answers["GET", "/metrics"] = (200, page, "text/plain")
    assert await client.activity() == (set(), 3)  # the request gauges still count


async def test_a_page_without_lora_or_request_series_means_nothing_in_flight(
    vllm: FakeVllm, client: VllmClient
) -> None:
    vllm.answers["GET", "/metrics"] = (200, metrics_page([], running=(), waiting=()), "text/plain")
    assert await client.activity() == (set(), 0)
    assert (client.running, client.waiting) == (0.0, 0.0)


async def test_metrics_that_fail_are_a_vllm_error(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["GET", "/metrics"] = (500, "boom", "text/plain")
    with pytest.raises(VllmError, match="/metrics answered 500"):
        await client.activity()


async def test_an_unreadable_metrics_page_is_a_vllm_error(vllm: FakeVllm, client: VllmClient) -> None:
    vllm.answers["GET", "/metrics"] = (200, 'vllm:num_requests_running{engine="0"} lots\n', "text/plain")
    with pytest.raises(VllmError):
        await client.activity()


async def test_an_odd_line_in_a_family_the_agent_does_not_read_is_harmless(vllm: FakeVllm, client: VllmClient) -> None:
    page = metrics_page([("a1", "", time.time())], running=(1.0,), waiting=(0.0,))
    page += 'vllm:some_future_series{engine="0"} NaN-ish\n'
    vllm.answers["GET", "/metrics"] = (200, page, "text/plain")
    assert await client.activity() == ({"a1"}, 1)


def test_the_engine_starts_with_the_catalogs_tool_parser_and_chat_template() -> None:
    from workeragent.vllm import engine_command

    plain = engine_command(["vllm"], "/m", "tiny", "127.0.0.1", 8100, 8, 64, [])
    assert "--enable-auto-tool-choice" not in plain and "--chat-template" not in plain
    tools = engine_command(["vllm"], "/m", "tiny", "127.0.0.1", 8100, 8, 64, ["--x"], "hermes", "/t.jinja")
    assert tools[tools.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in tools
    assert tools[tools.index("--chat-template") + 1] == "/t.jinja"
    assert tools[-1] == "--x"  # the operator's own arguments last: they win
