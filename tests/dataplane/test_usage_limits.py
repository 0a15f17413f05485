"""Usage metering and rate limits through the whole stack: two data plane replicas, a control
plane, Redis, an agent and a vLLM simulator (which reports usage as vLLM does, continuous usage
in every stream event included). What the usage API says is compared with what the answers
said; limits are tried through both replicas at once."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from loraplane.controlplane.v1 import tenant_pb2 as tpb
from loraplane.stack import Stack
from tests.conftest import running_stack, upload
from tests.support import lora_tensors, safetensors_bytes, start_simulator, wait_for

PROMPT_TOKENS = 8  # what the simulator reports for every prompt


@dataclass
class Replicas:
    stack: Stack
    urls: tuple[str, str]

    def tenant(self, name: str, **limits: int) -> tuple[str, dict[str, str]]:
        """A new tenant (its id and auth headers), with these rate limits of its own."""
        created = self.stack.operator().create_tenant(name)
        if limits:
            self.stack.operator().set_limits(created.tenant.id, tpb.RateLimits(**limits))
        return created.tenant.id, {"Authorization": f"Bearer {created.api_key}"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    sim, url, _ = start_simulator("tiny-llama")
    try:
        env = (("LORAPLANE_VLLM_URL", url), ("LORAPLANE_USAGE_FLUSH_S", "0.2"))
        for stack in running_stack(tmp_path_factory.mktemp("usage-stack"), with_worker=True, env=env, dataplanes=2):
            second = f"http://127.0.0.1:{stack.config.second_http_port}"
            yield Replicas(stack, (stack.http_url, second))
    finally:
        sim.terminate()
        sim.wait(10)


def usage_page(url: str, headers: dict[str, str], **params: object) -> httpx.Response:
    return httpx.get(url + "/v1/usage/completions", headers=headers, params=params, timeout=10)  # type: ignore[arg-type]


def totals(url: str, headers: dict[str, str], since: float) -> dict[str, dict[str, int]]:
    """model -> summed counters, over every minute bucket since `since`."""
    out: dict[str, dict[str, int]] = {}
    r = usage_page(url, headers, start_time=int(since) - 60, bucket_width="1m", group_by="model")
    assert r.status_code == 200, r.text
    for bucket in r.json()["data"]:
        for result in bucket["results"]:
            t = out.setdefault(result["model"], {})
            for name in ("input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests"):
                t[name] = t.get(name, 0) + result[name]
    return out


def sse_events(raw: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


def chat(url: str, headers: dict[str, str], **extra: object) -> httpx.Response:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} | extra
    return httpx.post(url + "/v1/chat/completions", headers=headers, json=body, timeout=30)


def test_every_answered_token_is_counted_once_across_replicas(replicas: Replicas) -> None:
    """Chat and completions, whole or streamed (usage asked for or not), through either replica,
    and a stream its client cut off: the usage API's totals are what the answers reported,
    token for token; the cut-off stream counts what was generated until it was cut."""
    _, headers = replicas.tenant("metered")
    key = headers["Authorization"].removeprefix("Bearer ")
    assert upload(replicas.stack, key, "a1", safetensors_bytes(lora_tensors(rank=4))).status_code == 201
    since = time.time()
    expected: dict[str, dict[str, int]] = {}

    def count(model: str, prompt: int, completion: int) -> None:
        t = expected.setdefault(model, dict.fromkeys(("input_tokens", "output_tokens", "num_model_requests"), 0))
        t["input_tokens"] += prompt
        t["output_tokens"] += completion
        t["num_model_requests"] += 1

    requests = [
        ("/v1/chat/completions", "tiny-llama", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
        ("/v1/chat/completions", "tiny-llama:a1", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}),
        ("/v1/completions", "tiny-llama:a1", {"prompt": "hi", "max_tokens": 3}),
    ]
    for i, (path, model, body) in enumerate(requests * 2):
        for stream, options in ((False, None), (True, None), (True, {"include_usage": True})):
            payload = {"model": model, **body, "stream": stream} | ({"stream_options": options} if options else {})
            r = httpx.post(replicas.urls[i % 2] + path, headers=headers, json=payload, timeout=30)
            assert r.status_code == 200, r.text
            if not stream:
                u = r.json()["usage"]
                count(model, u["prompt_tokens"], u["completion_tokens"])
            elif options:
                u = sse_events(r.text)[-1]["usage"]
                count(model, u["prompt_tokens"], u["completion_tokens"])
            else:  # the client saw no usage: what the simulator generates for it
                assert all("usage" not in e for e in sse_events(r.text))
                count(model, PROMPT_TOKENS, body["max_tokens"])  # type: ignore[arg-type]

    # A stream cut off after its first events: counted with what was generated until then.
    cut = {"model": "tiny-llama:a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
           "stream": True, "sim_tokens_per_s": 20}  # fmt: skip
    with httpx.stream("POST", replicas.urls[1] + "/v1/chat/completions", headers=headers, json=cut, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 4:
                break

    def settled() -> bool:
        got = totals(replicas.urls[0], headers, since)
        return got.get("tiny-llama:a1", {}).get("num_model_requests") == 13

    wait_for(settled, 10, f"the cut-off stream is not counted: {totals(replicas.urls[0], headers, since)} {expected}")
    got = totals(replicas.urls[0], headers, since)
    partial = got["tiny-llama:a1"]["output_tokens"] - expected["tiny-llama:a1"]["output_tokens"]
    assert 3 <= partial < 200, got  # the events the client read, and not the tokens never generated
    count("tiny-llama:a1", PROMPT_TOKENS, partial)
    for model, t in expected.items():
        assert {k: got[model][k] for k in t} == t, (model, got[model], t)
    assert got["tiny-llama"]["input_cached_tokens"] == 0  # the simulator caches nothing


def test_streams_carry_usage_only_as_the_client_asked(replicas: Replicas) -> None:
    """The data plane always asks the worker for usage in every event; the client gets none of it
    unless it asked (`include_usage`: the last event only; `continuous_usage_stats`: every one)."""
    _, headers = replicas.tenant("streams")
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    for options, usage_events in ((None, 0), ({"include_usage": True}, 1),
                                  ({"include_usage": True, "continuous_usage_stats": True}, 5)):  # fmt: skip
        payload = body | ({"stream_options": options} if options else {})
        r = httpx.post(replicas.urls[0] + "/v1/chat/completions", headers=headers, json=payload, timeout=30)
        events = sse_events(r.text)
        assert sum("usage" in e for e in events) == usage_events, (options, events)
        assert r.text.endswith("data: [DONE]\n\n") and "\n\n\n" not in r.text
        if usage_events == 1:
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_a_tenant_sees_only_its_own_usage(replicas: Replicas) -> None:
    since = time.time()
    _, mine = replicas.tenant("usage-owner")
    _, other = replicas.tenant("usage-other")
    assert chat(replicas.urls[0], mine).status_code == 200
    wait_for(lambda: "tiny-llama" in totals(replicas.urls[1], mine, since), 10, "usage is not recorded")
    assert totals(replicas.urls[1], other, since) == {}
    page = usage_page(replicas.urls[0], other, start_time=int(since) - 60, bucket_width="1d").json()
    assert page["object"] == "page" and all(b["results"] == [] for b in page["data"])


@pytest.mark.parametrize(
    ("params", "param"),
    [({}, "start_time"), ({"start_time": "soon"}, "start_time"),
     ({"start_time": 1, "bucket_width": "1w"}, "bucket_width"),
     ({"start_time": 1, "group_by": "project_id"}, "group_by"), ({"start_time": 1, "limit": 10_000}, "limit")],
)  # fmt: skip
def test_bad_usage_queries_are_400s_naming_the_parameter(
    replicas: Replicas, params: dict[str, object], param: str
) -> None:
    _, headers = replicas.tenant(f"usage-q-{param}-{len(params)}")
    r = usage_page(replicas.urls[0], headers, **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_requests_per_minute_hold_across_both_replicas(replicas: Replicas) -> None:
    """A tenant allowed 60 requests a minute (its bucket: 5 s of that) sends as fast as it can
    through both replicas: it is admitted the bucket plus the refill, not twice that; the rest
    are OpenAI's 429 with Retry-After; every answer carries OpenAI's rate-limit headers."""
    _, headers = replicas.tenant("rpm", rpm=60)
    started = time.monotonic()
    answers = [chat(replicas.urls[i % 2], headers) for i in range(24)]
    elapsed = time.monotonic() - started
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == len(answers)
    assert 5 <= len(ok) <= 5 + elapsed + 2, (len(ok), elapsed)  # two replicas' slices: one request each
    assert ok[0].headers["x-ratelimit-limit-requests"] == "60"
    assert int(ok[0].headers["x-ratelimit-remaining-requests"]) >= 0
    assert ok[0].headers["x-ratelimit-reset-requests"].endswith("s")
    error = refused[0].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "requests per minute" in error["message"]
    assert int(refused[0].headers["retry-after"]) >= 1
    assert refused[0].headers["x-ratelimit-limit-requests"] == "60"


def test_tokens_per_minute_charge_the_estimate_and_settle_to_the_usage(replicas: Replicas) -> None:
    """Allowed 3000 tokens a minute (a 250-token bucket): a request whose max_tokens alone is over
    the minute's limit is refused at once as too large; requests estimated at 80 tokens (a long
    prompt) that use 9 (the simulator's 8 prompt tokens and 1) are settled to 9, so many more of
    them are admitted than their estimates would allow."""
    _, headers = replicas.tenant("tpm", tpm=3000)
    r = chat(replicas.urls[0], headers, max_tokens=4000)
    assert r.status_code == 429 and "too large" in r.json()["error"]["message"], r.text
    long = [{"role": "user", "content": "x" * 300}]
    admitted = sum(chat(replicas.urls[0], headers, messages=long).status_code == 200 for _ in range(12))
    # Charged 80 each and never settled, at most 250 / 80 + the refill (50 a second) would be.
    assert admitted >= 8, admitted
    assert chat(replicas.urls[0], headers).headers["x-ratelimit-limit-tokens"] == "3000"


def test_concurrency_holds_across_both_replicas(replicas: Replicas) -> None:
    """Two requests in flight allowed: two slow streams (one per replica) take both slots, a
    third request is refused on either replica, and one is admitted again once a stream ends."""
    _, headers = replicas.tenant("concurrent", concurrency=2)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
            "stream": True, "sim_tokens_per_s": 15}  # fmt: skip
    done = threading.Event()

    def slow(url: str) -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=body, timeout=30) as r:
            for _ in r.iter_lines():
                pass
        done.set()

    threads = [threading.Thread(target=slow, args=(u,)) for u in replicas.urls]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both streams admitted
    for url in replicas.urls:
        r = chat(url, headers)
        assert r.status_code == 429, r.text
        assert "in flight" in r.json()["error"]["message"]
    for t in threads:
        t.join(30)
    wait_for(lambda: chat(replicas.urls[0], headers).status_code == 200, 5, "a slot is not freed")
