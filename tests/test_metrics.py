"""Metrics on prometheus_client: each component's registry, scraped and read back with
prometheus_client's own parser, exports the names, types and labels the dashboard uses (and
nothing of the library's own, such as `_created` series); `metrics.serve` answers on a real
socket; the agent reads vLLM's /metrics page with the same parser."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from controlplane import telemetry
from dataplane.metrics import Metrics, path_label
from loraplane import metrics
from loraplane.catalog import Catalog
from tests.test_deploy import METRICS
from workeragent.agent import Agent
from workeragent.settings import Settings as AgentSettings
from workeragent.vllm import VllmClient, parse_activity

# Series the data plane has always exported besides the dashboard's (tests/dataplane/test_proxy.py).
DATAPLANE_OWN = {
    "loraplane_dataplane_requests_total": ("counter", {"path", "status"}),
    "loraplane_dataplane_request_seconds_total": ("counter", {"path"}),
    "loraplane_dataplane_requests_in_flight": ("gauge", set()),
    "loraplane_dataplane_routing_version": ("gauge", set()),
    "loraplane_dataplane_healthy_workers": ("gauge", set()),
    "loraplane_dataplane_placements_waiting": ("gauge", set()),
}
# The control plane's series besides the dashboard's (docs/operations.md lists them).
CONTROLPLANE_OWN = {"loraplane_workers_by_engine_state": ("gauge", {"base_model", "state"})}
# The agent's (docs/operations.md, Engine supervision).
AGENT_OWN = {
    "loraplane_worker_slot_leaks_total": ("counter", {"worker"}),
    "loraplane_worker_lora_host_slots": ("gauge", {"worker"}),  # the host-memory tier (--max-cpu-loras)
    "loraplane_worker_lora_host_slots_used": ("gauge", {"worker"}),
}


def families(page: bytes) -> dict[str, tuple[str, list[Sample]]]:
    """{exported name: (type, samples)}; a counter under its `_total` name, as Prometheus sees it."""
    out = {}
    for family in text_string_to_metric_families(page.decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, family.samples)
    return out


def check(page: bytes, expected: dict[str, tuple[str, set[str]]]) -> None:
    found = families(page)
    assert set(found) == set(expected)
    for name, (kind, samples) in found.items():
        assert kind == expected[name][0], name
        for sample in samples:
            assert set(sample.labels) - {"le"} == expected[name][1], sample
            assert not sample.name.endswith("_created"), sample


def dashboard(*names: str) -> dict[str, tuple[str, set[str]]]:
    return {name: (METRICS[name][0], set(METRICS[name][1])) for name in names}


def test_the_data_planes_registry() -> None:
    m = Metrics()
    m.ended(path_label("/v1/chat/completions"), 200, 0.01, "tiny-llama", 0.005)
    m.ended(path_label("/v1/adapters/adp_1"), 404, 0.001, None, None)
    m.routing.inc("hit")
    m.upload_rejections.inc("too_large")
    m.redis_up.set("dataplane", value=1)
    m.controlplane_up.set("dataplane", value=1)
    m.tokens.inc("tiny-llama", "shared", "input", by=8)
    m.metered.inc("tiny-llama", "shared")
    m.rate_limited.inc("requests")
    m.queue_depth.add("tiny-llama", "shared", by=1)
    m.queue_wait.observe("shared", value=0.2)
    m.queue_rejected.inc("shared", "timeout")
    expected = dashboard(
        "loraplane_requests_total", "loraplane_request_seconds", "loraplane_time_to_first_token_seconds",
        "loraplane_routing_total", "loraplane_cold_placements_waiting", "loraplane_upload_bytes_total",
        "loraplane_upload_rejections_total", "loraplane_redis_up", "loraplane_controlplane_up",
        "loraplane_tokens_total", "loraplane_metered_requests_total", "loraplane_rate_limited_total",
        "loraplane_queue_depth", "loraplane_queue_wait_seconds", "loraplane_queue_rejected_total",
    )  # fmt: skip
    page = m.render()
    check(page, expected | DATAPLANE_OWN)
    counts = {
        (s.labels["path"], s.labels["status"]): s.value for s in families(page)["loraplane_dataplane_requests_total"][1]
    }
    assert counts == {("/v1/chat/completions", "200"): 1, ("/v1/adapters/{id}", "404"): 1}
    (answered,) = families(page)["loraplane_requests_total"][1]  # inference requests only
    assert answered.labels == {"component": "dataplane", "base_model": "tiny-llama", "status": "200"}


def test_the_control_planes_registry() -> None:
    telemetry.CALLS.inc("controlplane", "", "OK")
    telemetry.LOADS.inc("tiny-llama", "ok")
    telemetry.LOAD_SECONDS.observe("tiny-llama", value=0.2)
    telemetry.EVICTIONS.inc("tiny-llama")
    telemetry.REDIS_UP.set("controlplane", value=1)
    telemetry.AGENTS.set("tiny-llama", value=2)
    assert telemetry.AGENTS.values[("tiny-llama",)] == 2
    telemetry.ENGINES.set("tiny-llama", "crash_loop", value=1)
    expected = dashboard(
        "loraplane_requests_total", "loraplane_adapter_loads_total", "loraplane_adapter_load_seconds",
        "loraplane_adapter_evictions_total", "loraplane_redis_up", "loraplane_agents_connected",
    )  # fmt: skip
    check(metrics.render(telemetry.REGISTRY), expected | CONTROLPLANE_OWN)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "catalog.json"
    Catalog.write(path, [{"name": "tiny-llama", "kind": "chat", "path": str(tmp_path), "lora": False}])
    return Catalog.load(path)


async def test_the_agents_registry_reads_its_gauges_at_each_scrape(tmp_path: Path, catalog: Catalog) -> None:
    settings = AgentSettings(agent_token="t", worker_id="w1", vllm_url="http://127.0.0.1:1", cache_dir=tmp_path)
    agent = Agent(settings, catalog)
    async with aiohttp.ClientSession() as session:
        agent._vllm = VllmClient(agent.local_url, "", "", session)
        agent._vllm.running = 3
        page = metrics.render(agent.metrics)
    expected = dashboard(
        "loraplane_worker_lora_slots_used", "loraplane_worker_lora_slots", "loraplane_worker_requests_running",
        "loraplane_worker_requests_waiting", "loraplane_controlplane_up",
    )  # fmt: skip
    check(page, expected | AGENT_OWN)
    values = {(n, s.labels.get("worker", "")): s.value for n, (_, ss) in families(page).items() for s in ss}
    assert values[("loraplane_worker_requests_running", "w1")] == 3
    assert values[("loraplane_worker_lora_slots", "w1")] == 8


async def test_serve_answers_metrics_and_nothing_else() -> None:
    registry = metrics.CollectorRegistry()
    metrics.Counter(registry, "loraplane_things_total", "Things.").inc()
    server = await metrics.serve(registry, "127.0.0.1:0")
    assert server is not None
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics?x=1") as r:
                assert r.status == 200 and r.headers["content-type"] == metrics.CONTENT_TYPE
                assert families(await r.read())["loraplane_things_total"][1][0].value == 1
            async with session.get(f"http://127.0.0.1:{port}/other") as r:
                assert r.status == 404
    finally:
        server.close()
        await server.wait_closed()
    assert await metrics.serve(registry, "") is None


# What vLLM's /metrics says (prometheus_client's exposition, two engines), trimmed.
VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny-llama"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 4.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="8",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="8",running_lora_adapters="c",waiting_lora_adapters="d"} 1.8e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 123.0
"""


def test_the_agent_reads_vllms_page() -> None:
    assert parse_activity(VLLM_PAGE) == (1.8e9, "c,d", 3.0, 4.0)
    assert parse_activity("") == (0.0, "", 0.0, 0.0)


def test_an_unreadable_page_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_activity('vllm:num_requests_running{model_name="x"} not-a-number\n')
