"""Usage metering and rate limits, end to end, in one run on one stack: Redis, a control plane,
two data plane replicas and two agents, each on a vLLM simulator (`tests/vllmsim.py`) serving
tiny-llama. No tier has rate limits; the tenants that have some set their own. Measures:
  1. exactness: `--requests` of mixed kinds (chat and completions; whole; streamed without
     usage, with `include_usage`, with continuous usage; streams their client cuts off after a
     few events) through both replicas, one simulator `kill -9`'d and restarted meanwhile. The
     usage API's totals against what the answers reported (a stream without usage: the tokens
     the simulator generates, 8 prompt and `max_tokens`, or the events read of one the kill
     broke). Cut-off streams are a tenant of their own: their client knows only a lower bound.
  2. limit accuracy: a tenant limited to `--rpm`, driven at 2.5 times that for `--minutes`
     through both replicas (open loop), admitted requests against the limit; then `--tpm` with
     requests of known token costs (the estimate at admission equals the usage). The 429s'
     share and their headers.
  3. the kill -9 loss: a tenant's requests through one data plane, `kill -9`'d under load and
     restarted, a few times (the loss depends on where the kill falls between two usage
     flushes); the usage recorded against what its clients were answered, and the answers of
     the data plane's last second.

The load generator (aiohttp, one event loop) shares this machine's cores with the stack.

    .venv/bin/python bench/usage.py [--requests 600] [--minutes 2] [--rpm 600] [--tpm 60000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplane.controlplane.v1 import tenant_pb2 as tpb  # noqa: E402
from loraplane.limits import RATE_VARS  # noqa: E402
from loraplane.stack import Stack, StackConfig, WorkerSpec, http_ok, wait_until  # noqa: E402
from tests.support import free_port, lora_tensors, safetensors_bytes, start_simulator, with_metadata  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT_TOKENS = 8  # what the simulator reports for every prompt
BURST_S = 5.0  # LORAPLANE_RATE_BURST_S's default: a per-minute limit's bucket holds 5 s of it
EXACT_RATE = 100.0  # requests a second in part 1
STREAM_RATE = 100.0  # tokens a second of part 1's answers (so that some are in flight at the kill)
CUT_RATE = 20.0  # tokens a second of a stream its client cuts off
MAX_IN_FLIGHT = 300  # the open loops' bound: an arrival beyond it is not sent (and counted)
KILL_RATE = 200.0  # requests a second through the data plane that is killed in part 3
WORKERS = ("embedded-tiny-llama", "embedded-tiny-llama-2")
UNLIMITED = tuple((name, "0") for name in RATE_VARS)

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    stream: bool
    options: dict[str, bool] | None = None  # stream_options
    cut: bool = False  # the client closes after a few events


KINDS = (
    Kind("chat", CHAT, False),
    Kind("completion", COMPLETIONS, False),
    Kind("chat stream", CHAT, True),
    Kind("chat stream, include_usage", CHAT, True, {"include_usage": True}),
    Kind("chat stream, continuous usage", CHAT, True, {"include_usage": True, "continuous_usage_stats": True}),
    Kind("completion stream", COMPLETIONS, True),
    Kind("completion stream, include_usage", COMPLETIONS, True, {"include_usage": True}),
    Kind("chat stream, cut off", CHAT, True, cut=True),
    Kind("completion stream, cut off", COMPLETIONS, True, {"include_usage": True}, cut=True),
)


@dataclass
class Answer:
    """One request as its client saw it."""

    url: str  # the data plane's
    kind: str
    model: str
    max_tokens: int
    started: float  # monotonic
    ended: float = 0.0
    status: int = 0  # 0: no answer (connection failed)
    prompt: int = 0  # tokens, as the answer reported them (or as the simulator generates them)
    completion: int = 0
    events: int = 0  # content events read (a stream)
    usage_reported: bool = False  # the answer carried usage (else the client knows what was generated)
    done: bool = False  # whole: a body, or a stream's `data: [DONE]`
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""  # a refusal's error message
    error: str = ""  # the client's exception, when no answer came

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Bench:
    stack: Stack
    urls: tuple[str, str]
    sims: list[subprocess.Popen[bytes]]
    sim_ports: list[int]
    session: aiohttp.ClientSession | None = None

    def tenant(self, name: str, limits: tpb.RateLimits | None = None) -> dict[str, str]:
        """A new tenant's auth headers; with these rate limits of its own."""
        created = self.stack.operator().create_tenant(name)
        if limits is not None:
            self.stack.operator().set_limits(created.tenant.id, limits)
        return {"Authorization": f"Bearer {created.api_key}"}

    def upload(self, headers: dict[str, str], name: str) -> str:
        data = with_metadata(safetensors_bytes(lora_tensors(rank=4)), {"bench": name})
        r = httpx.post(self.urls[0] + "/v1/adapters/upload", headers=headers, data={"name": name,
                       "base_model": "tiny-llama"}, files={"file": ("adapter_model.safetensors", data)},
                       timeout=60)  # fmt: skip
        r.raise_for_status()
        adapter_id: str = r.json()["id"]
        return adapter_id

    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session


# the load generator


async def open_loop(rate: float, count: int, fire: Callable[[int], Awaitable[T]],
                    stop: asyncio.Event | None = None) -> tuple[list[T], int]:  # fmt: skip
    """Request i sent at i / rate seconds (a fixed arrival rate, whatever the answers take), at
    most MAX_IN_FLIGHT at once: the answers, and the arrivals not sent for that bound."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[T]] = []
    in_flight, skipped = 0, 0

    async def tracked(i: int) -> T:
        nonlocal in_flight
        try:
            return await fire(i)
        finally:
            in_flight -= 1

    t0 = loop.time()
    for i in range(count):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop is not None and stop.is_set():
            break
        if in_flight >= MAX_IN_FLIGHT:
            skipped += 1
            continue
        in_flight += 1
        tasks.append(asyncio.create_task(tracked(i)))
    return list(await asyncio.gather(*tasks)), skipped


async def send(session: aiohttp.ClientSession, url: str, headers: dict[str, str], kind: Kind, body: dict[str, Any],
               cut_after: int = 0) -> Answer:  # fmt: skip
    """One request; a stream read event by event (closed after `cut_after` content events)."""
    payload = body | {"stream": kind.stream} | ({"stream_options": kind.options} if kind.options else {})
    a = Answer(url, kind.name, body["model"], body["max_tokens"], time.monotonic())
    try:
        async with session.post(url + kind.path, json=payload, headers=headers) as r:
            a.status, a.headers = r.status, {k.lower(): v for k, v in r.headers.items()}
            if r.status != 200:
                a.message = (await r.json(content_type=None)).get("error", {}).get("message", "")
            elif not kind.stream:
                u = (await r.json(content_type=None))["usage"]
                a.prompt, a.completion = u["prompt_tokens"], u["completion_tokens"]
                a.usage_reported = a.done = True
            else:
                await read_stream(r, a, cut_after)
    except (aiohttp.ClientError, TimeoutError) as err:
        a.error = type(err).__name__
    a.ended = time.monotonic()
    return a


async def read_stream(r: aiohttp.ClientResponse, a: Answer, cut_after: int) -> None:
    async for line in r.content:
        if line.startswith(b"data: [DONE]"):
            a.done = True
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("choices"):
            a.events += 1
        elif isinstance(event.get("usage"), dict):  # the usage event: the whole request's
            u = event["usage"]
            a.prompt, a.completion, a.usage_reported = u["prompt_tokens"], u["completion_tokens"], True
        if cut_after and a.events >= cut_after:
            r.close()  # the client leaves
            return


def chat_body(model: str, max_tokens: int, content: str = "hi", **extra: object) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def body_for(kind: Kind, model: str, max_tokens: int, rate: float) -> dict[str, Any]:
    if kind.path == CHAT:
        return chat_body(model, max_tokens, sim_tokens_per_s=rate)
    return {"model": model, "prompt": "hi", "max_tokens": max_tokens, "sim_tokens_per_s": rate}


# the usage API


async def usage_totals(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                       since: float) -> dict[str, dict[str, int]]:  # fmt: skip
    """model -> counters, summed over every minute bucket since `since` (GET /v1/usage/completions)."""
    params = {"start_time": str(int(since) - 60), "bucket_width": "1m", "group_by": "model", "limit": "1440"}
    async with session.get(url + "/v1/usage/completions", headers=headers, params=params) as r:
        r.raise_for_status()
        page = await r.json()
    out: dict[str, dict[str, int]] = {}
    for bucket in page["data"]:
        for result in bucket["results"]:
            t = out.setdefault(result["model"], dict.fromkeys(("input", "output", "requests"), 0))
            t["input"] += result["input_tokens"]
            t["output"] += result["output_tokens"]
            t["requests"] += result["num_model_requests"]
    return out


def summed(by_model: dict[str, dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(("input", "output", "requests"), 0)
    for t in by_model.values():
        for k in total:
            total[k] += t[k]
    return total


async def settled_totals(bench: Bench, headers: dict[str, str], since: float,
                         quiet_s: float = 2.0) -> dict[str, dict[str, int]]:  # fmt: skip
    """The totals once they stopped changing for `quiet_s` (every data plane flushes every 0.5 s)."""
    last, same_since = None, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = await usage_totals(bench.http(), bench.urls[1], headers, since)
        if now != last:
            last, same_since = now, time.monotonic()
        elif time.monotonic() - same_since >= quiet_s:
            break
        await asyncio.sleep(0.25)
    assert last is not None
    return last


# 1. exactness


async def exactness(bench: Bench, n: int) -> dict[str, Any]:
    known = bench.tenant("bench-exact")
    cut = bench.tenant("bench-cutoff")
    adapters = [bench.upload(known, name) for name in ("a1", "a2")]
    op = bench.stack.operator(timeout=120)
    for adapter_id in adapters:  # both on both workers: adapter requests reach the one that dies
        for worker in WORKERS:
            op.force_load(adapter_id, worker)
    models = ["tiny-llama", "tiny-llama:a1", "tiny-llama:a2"]
    rng = random.Random(7)
    plan = [(rng.choice(KINDS), rng.choice(models), rng.randint(1, 32), rng.randint(2, 6)) for _ in range(n)]
    since = time.time()
    kill_at, back_at = n * 0.3 / EXACT_RATE, n * 0.6 / EXACT_RATE
    session = bench.http()

    async def fire(i: int) -> Answer:
        kind, model, max_tokens, cut_after = plan[i]
        if kind.cut:
            body = body_for(kind, "tiny-llama", 200, CUT_RATE)
            return await send(session, bench.urls[i % 2], cut, kind, body, cut_after)
        return await send(session, bench.urls[i % 2], known, kind, body_for(kind, model, max_tokens, STREAM_RATE))

    async def worker_death() -> tuple[float, float]:
        await asyncio.sleep(kill_at)
        killed = time.monotonic()
        bench.sims[1].kill()  # SIGKILL
        await asyncio.to_thread(bench.sims[1].wait)
        await asyncio.sleep(back_at - kill_at)
        back = time.monotonic()
        bench.sims[1], _, _ = await asyncio.to_thread(start_simulator, "tiny-llama", port=bench.sim_ports[1])
        return killed, back

    death = asyncio.create_task(worker_death())
    table = asyncio.create_task(healthy_workers(session, bench.urls[0], n / EXACT_RATE + 30))
    answers, skipped = await open_loop(EXACT_RATE, n, fire)
    killed, back = await death
    known_totals = await settled_totals(bench, known, since)
    cut_totals = await settled_totals(bench, cut, since)
    seen_healthy = await table

    cut_kinds = {k.name for k in KINDS if k.cut}
    whole = [a for a in answers if a.ok and a.kind not in cut_kinds]
    cutoff = [a for a in answers if a.kind in cut_kinds]
    mismatched = 0  # whole streams whose content events are not their completion tokens
    for a in answers:
        if a.ok and a.kind not in cut_kinds and not a.usage_reported:
            # a stream without usage: what the simulator generates; one the kill broke, the events read
            a.prompt, a.completion = PROMPT_TOKENS, a.max_tokens if a.done else a.events
        mismatched += a.ok and a.done and "stream" in a.kind and a.kind not in cut_kinds and a.events != a.completion
    expected = {"input": sum(a.prompt for a in whole), "output": sum(a.completion for a in whole),
                "requests": len(whole)}  # fmt: skip
    recorded = summed(known_totals)
    by_model: dict[str, dict[str, int]] = {}
    for a in whole:
        t = by_model.setdefault(a.model, dict.fromkeys(("input", "output", "requests"), 0))
        t["input"] += a.prompt
        t["output"] += a.completion
        t["requests"] += 1
    in_window = [a for a in answers if killed <= a.started < back]
    at_kill = [a for a in answers if a.started < killed < a.ended]
    cut_ok = [a for a in cutoff if a.ok]
    cut_recorded = summed(cut_totals)
    return {
        "requests": n,
        "not_sent_in_flight_bound": skipped,
        "kinds": dict(Counter(a.kind for a in answers)),
        "statuses": dict(Counter(str(a.status or a.error) for a in answers)),
        "known": {
            "answered": len(whole),
            "whole": sum(a.done for a in whole),
            "streams_broken_by_the_kill": sum(not a.done for a in whole),
            "usage_reported_by_answer": sum(a.usage_reported for a in whole),
            "whole_streams_events_not_completion_tokens": mismatched,
            "expected": expected,
            "recorded": recorded,
            "difference": {k: recorded[k] - expected[k] for k in expected},
            "by_model": {m: {"expected": t, "recorded": known_totals.get(m)} for m, t in sorted(by_model.items())},
        },
        "cut_off": {
            "sent": len(cutoff),
            "answered_200": len(cut_ok),
            "counted": cut_recorded["requests"],
            "input_recorded": cut_recorded["input"],
            "input_expected": PROMPT_TOKENS * len(cut_ok),
            "output_recorded": cut_recorded["output"],
            "output_events_read_lower_bound": sum(a.events for a in cut_ok),
            "output_max_tokens_upper_bound": 200 * len(cut_ok),
        },
        "worker_kill": {
            "killed_at_s": round(killed - min(a.started for a in answers), 2),
            "down_s": round(back - killed, 2),
            "in_flight_at_the_kill": len(at_kill),
            "in_flight_at_the_kill_by_outcome": dict(Counter(outcome(a, cut_kinds) for a in at_kill)),
            "sent_while_down": len(in_window),
            "sent_while_down_answered": sum(a.ok for a in in_window),
            "routing_table": table_changes(seen_healthy, killed, back),
        },
    }


def outcome(a: Answer, cut_kinds: set[str]) -> str:
    if not a.ok:
        return f"failed ({a.status or a.error})"
    if a.kind in cut_kinds:
        return "cut off by its client"
    return ("whole" if a.done else "broken") + (" stream" if "stream" in a.kind else "")


async def healthy_workers(session: aiohttp.ClientSession, url: str, until_s: float) -> list[tuple[float, int]]:
    """A data plane's healthy workers (/readyz) every 0.2 s: (when, how many), until both are
    healthy again after they were not (or `until_s`)."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        async with session.get(url + "/readyz") as r:
            seen.append((time.monotonic(), int((await r.json())["workers"])))
        if len(seen) > 1 and seen[-1][1] == 2 and min(n for _, n in seen) < 2:
            break
        await asyncio.sleep(0.2)
    return seen


def table_changes(seen: list[tuple[float, int]], killed: float, back: float) -> dict[str, float | int | None]:
    """When the routing table lost the killed worker (after the kill) and had it again (after the restart)."""
    lost = next((t for t, n in seen if t >= killed and n < 2), None)
    regained = next((t for t, n in seen if t >= back and n == 2), None)
    return {
        "fewest_healthy_workers": min(n for _, n in seen),
        "worker_out_s_after_kill": round(lost - killed, 2) if lost is not None else None,
        "worker_back_s_after_restart": round(regained - back, 2) if regained is not None else None,
    }


# 2. limit accuracy


def limit_headers_ok(a: Answer, dimension: str) -> bool:
    names = [f"x-ratelimit-{w}-{dimension}" for w in ("limit", "remaining", "reset")]
    return all(name in a.headers for name in names)


async def limit_run(bench: Bench, name: str, limits: tpb.RateLimits, dimension: str, rate: float,
                    seconds: float, costs: list[int]) -> dict[str, Any]:  # fmt: skip
    """`rate` requests a second for `seconds`, alternating replicas, each replica's in turn costing
    each of `costs` tokens (estimate and usage alike: a 16-character message is 8 prompt tokens,
    as the simulator reports every prompt)."""
    headers = bench.tenant(name, limits)
    session = bench.http()
    kind = KINDS[0]

    async def fire(i: int) -> Answer:
        body = chat_body("tiny-llama", costs[i // 2 % len(costs)] - PROMPT_TOKENS, content="x" * 16)
        return await send(session, bench.urls[i % 2], headers, kind, body)

    answers, skipped = await open_loop(rate, round(rate * seconds), fire)
    t0 = min(a.started for a in answers)
    ok = [a for a in answers if a.ok]
    refused = [a for a in answers if a.status == 429]
    limit = limits.rpm if dimension == "requests" else limits.tpm
    admitted = len(ok) if dimension == "requests" else sum(a.prompt + a.completion for a in ok)
    minutes = seconds / 60
    bucket = limit / 60 * BURST_S
    per_10s: Counter[int] = Counter()
    for a in ok:
        per_10s[int((a.started - t0) // 10)] += 1 if dimension == "requests" else a.prompt + a.completion
    after_first_10s = sum(v for k, v in per_10s.items() if k >= 1)
    steady_per_min = after_first_10s / max(1e-9, (seconds - 10) / 60) if seconds > 10 else None
    reasons = Counter("requests" if "requests per minute" in a.message else "tokens" if "tokens per minute" in a.message
                      else a.message for a in refused)  # fmt: skip
    return {
        "limit_per_min": limit,
        "offered_per_min": round(rate * 60 * (1 if dimension == "requests" else sum(costs) / len(costs))),
        "seconds": seconds,
        "sent": len(answers),
        "not_sent_in_flight_bound": skipped,
        "answered_200": len(ok),
        "admitted": admitted,
        "limit_x_minutes": round(limit * minutes),
        "initial_bucket": round(bucket),
        "ratio_to_limit_x_minutes": round(admitted / (limit * minutes), 4),
        "error_pct_vs_limit_x_minutes": round((admitted / (limit * minutes) - 1) * 100, 2),
        "ratio_to_limit_x_minutes_plus_bucket": round(admitted / (limit * minutes + bucket), 4),
        "error_pct_vs_limit_x_minutes_plus_bucket": round((admitted / (limit * minutes + bucket) - 1) * 100, 2),
        "steady_per_min_after_first_10s": round(steady_per_min) if steady_per_min is not None else None,
        "admitted_per_10s": [per_10s[k] for k in range(math.ceil(seconds / 10))],
        "status_429": len(refused),
        "share_429": round(len(refused) / len(answers), 4),
        "429_reasons": dict(reasons),
        "share_429_by_replica": [
            round(sum(a.status == 429 for a in of) / len(of), 3)
            for of in ([a for a in answers if a.url == url] for url in bench.urls)
        ],
        "share_429_by_request_tokens": {
            str(cost + PROMPT_TOKENS): round(sum(a.status == 429 for a in of) / len(of), 3)
            for cost in sorted({a.max_tokens for a in answers})
            if (of := [a for a in answers if a.max_tokens == cost])
        },
        "429_with_retry_after": sum(a.headers.get("retry-after", "").isdigit() for a in refused),
        "429_with_x_ratelimit_headers": sum(limit_headers_ok(a, dimension) for a in refused),
        "200_with_x_ratelimit_headers": sum(limit_headers_ok(a, dimension) for a in ok),
        "other_statuses": dict(Counter(str(a.status or a.error) for a in answers if a.status not in (200, 429))),
    }


# 3. the kill -9 loss


async def kill_loss(bench: Bench, trials: int, load_s: float) -> dict[str, Any]:
    """`trials` kills, each after `load_s` and a random part of a flush period (the loss depends
    on when the kill falls between two flushes): each trial's figures and the worst."""
    rng = random.Random(11)
    runs = [await kill_once(bench, f"bench-killed-{i}", load_s + rng.uniform(0, 0.5)) for i in range(trials)]
    return {
        "trials": runs,
        "most_lost_requests": max(r["lost"]["requests"] for r in runs),
        "most_lost_as_seconds_of_answers": max(r["lost_equals_answers_of_the_last_s"] for r in runs),
    }


async def kill_once(bench: Bench, tenant: str, load_s: float) -> dict[str, Any]:
    headers = bench.tenant(tenant)
    session = bench.http()
    since = time.time()
    stop = asyncio.Event()
    kinds = [KINDS[0], KINDS[1], KINDS[3]]  # whole chats and completions, streams with usage

    async def fire(i: int) -> Answer:
        kind = kinds[i % len(kinds)]
        return await send(session, bench.urls[0], headers, kind, body_for(kind, "tiny-llama", 1 + i % 16, 0))

    async def kill() -> float:
        await asyncio.sleep(load_s)
        bench.stack.procs["dataplane"].kill()  # SIGKILL
        killed = time.monotonic()
        stop.set()
        return killed

    killing = asyncio.create_task(kill())
    answers, _ = await open_loop(KILL_RATE, round(KILL_RATE * (load_s + 5)), fire, stop)
    killed = await killing
    await asyncio.to_thread(bench.stack.procs["dataplane"].wait)
    recorded = summed(await settled_totals(bench, headers, since))
    ok = [a for a in answers if a.ok and a.done]
    answered = {"input": sum(a.prompt for a in ok), "output": sum(a.completion for a in ok), "requests": len(ok)}
    lost = {k: answered[k] - recorded[k] for k in answered}
    before = sorted(killed - a.ended for a in ok)  # seconds before the kill each was answered
    equivalent_s = before[lost["requests"] - 1] if 0 < lost["requests"] <= len(before) else 0.0
    started = time.monotonic()
    bench.stack.restart("dataplane")
    await asyncio.to_thread(wait_until, lambda: http_ok(bench.urls[0] + "/healthz"), 60, "the data plane",
                            bench.stack.procs["dataplane"])  # fmt: skip
    restart_s = time.monotonic() - started
    again = await send(session, bench.urls[0], headers, KINDS[0], chat_body("tiny-llama", 1))
    after = summed(await settled_totals(bench, headers, since, 1.0))
    plus_one = {"input": recorded["input"] + again.prompt, "output": recorded["output"] + again.completion,
                "requests": recorded["requests"] + again.ok}  # fmt: skip
    return {
        "load_s_before_kill": round(load_s, 3),
        "offered_per_s": KILL_RATE,
        "sent": len(answers),
        "answered": answered,
        "recorded": recorded,
        "lost": lost,
        "answered_in_last_0_5s": sum(0 <= b <= 0.5 for b in before),
        "answered_in_last_1s": sum(0 <= b <= 1.0 for b in before),
        "answered_after_the_kill_signal": sum(b < 0 for b in before),
        "lost_equals_answers_of_the_last_s": round(equivalent_s, 3),
        "failed_by_the_kill": sum(not (a.ok and a.done) for a in answers),
        "restart_to_healthy_s": round(restart_s, 2),
        "served_after_restart": again.status,
        "recorded_after_restart_is_recorded_plus_one_answer": after == plus_one,
    }


# the stack


def start(tmp: Path) -> Bench:
    sims, ports = [], []
    for _ in range(2):
        sim, _, port = start_simulator("tiny-llama")
        sims.append(sim)
        ports.append(port)
    second = WorkerSpec(ports[1], env=(("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{ports[1]}"),))
    config = StackConfig(data_dir=tmp / "data", http_port=free_port(), grpc_port=free_port(), vllm_port=ports[0],
                         log_dir=tmp / "logs", second_http_port=free_port(), extra_workers=(second,),
                         extra_env=(("LORAPLANE_VLLM_URL", f"http://127.0.0.1:{ports[0]}"),
                                    ("LORAPLANE_LOG_LEVEL", "WARNING"), *UNLIMITED))  # fmt: skip
    stack = Stack(config)
    bench = Bench(stack, (stack.http_url, f"http://127.0.0.1:{config.second_http_port}"), sims, ports)
    try:
        stack.start()
    except BaseException:
        stop(bench)
        raise
    return bench


def stop(bench: Bench) -> None:
    bench.stack.stop()
    for sim in bench.sims:
        sim.kill()
        sim.wait()


async def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    seconds = args.minutes * 60
    # Idle connections dropped before the data plane's (uvicorn's 5 s): else one it closes may be reused.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        bench.session = session
        out: dict[str, Any] = {"exactness": await exactness(bench, args.requests)}
        rpm = tpb.RateLimits(rpm=args.rpm)
        out["rpm"] = await limit_run(bench, "bench-rpm", rpm, "requests", 2.5 * args.rpm / 60, seconds, [9])
        costs = [20, 50, 100, 230]  # tokens a request: 8 prompt + max_tokens completion
        rate = 2.5 * args.tpm / 60 / (sum(costs) / len(costs))
        out["tpm"] = await limit_run(bench, "bench-tpm", tpb.RateLimits(tpm=args.tpm), "tokens", rate, seconds, costs)
        out["kill"] = await kill_loss(bench, 2 if args.quick else 5, 2.0 if args.quick else 5.0)
    return out


def code_digest() -> dict[str, str]:
    """Which code was measured (dataplane/* is edited by others; the worktree is not committed)."""
    files = ("dataplane/ratelimit.py", "dataplane/metering.py", "dataplane/inference.py")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"head": rev.stdout.strip()} | {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=600, help="part 1's requests")
    ap.add_argument("--minutes", type=float, default=2.0, help="each limit's run")
    ap.add_argument("--rpm", type=int, default=600, help="the requests-per-minute tenant's limit")
    ap.add_argument("--tpm", type=int, default=60_000, help="the tokens-per-minute tenant's limit")
    ap.add_argument("--quick", action="store_true", help="20 s per limit, a shorter kill run")
    args = ap.parse_args()
    if args.quick:
        args.minutes = 20 / 60
    digest = code_digest()
    with tempfile.TemporaryDirectory() as tmp:
        bench = start(Path(tmp))
        try:
            measured = asyncio.run(measure(bench, args))
        finally:
            stop(bench)
    result = {
        "benchmark": "usage",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; load generator, simulators and stack share them",
        "args": vars(args),
        "code": digest,
        **measured,
    }
    out = ROOT / "bench" / "results" / "usage.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"wrote {out.relative_to(ROOT)}")


def report(r: dict[str, Any]) -> None:
    print(f"usage and limits, one run ({r['date']}), {r['machine']}{' [quick]' if r['args']['quick'] else ''}")
    e = r["exactness"]
    k, c, w = e["known"], e["cut_off"], e["worker_kill"]
    print(f"1. exactness: {e['requests']} requests sent over both replicas ({e['not_sent_in_flight_bound']} not sent),"
          f" statuses {e['statuses']}")  # fmt: skip
    print(f"  worker 2's simulator kill -9'd at {w['killed_at_s']} s for {w['down_s']} s: {w['in_flight_at_the_kill']}"
          f" in flight {w['in_flight_at_the_kill_by_outcome']}, {w['sent_while_down']} sent while"
          f" down ({w['sent_while_down_answered']} answered)")  # fmt: skip
    print(f"  the routing table (/readyz): {w['routing_table']}")
    print(f"  usage known to the client: answered {k['answered']} ({k['whole']} whole,"
          f" {k['streams_broken_by_the_kill']} streams broken by the kill),"
          f" counted {k['recorded']['requests']}")  # fmt: skip
    for name in ("input", "output", "requests"):
        print(f"    {name:8} expected {k['expected'][name]:7}  recorded {k['recorded'][name]:7}"
              f"  difference {k['difference'][name]:+d}")  # fmt: skip
    print(f"  cut-off streams (own tenant): sent {c['sent']}, answered {c['answered_200']}, counted {c['counted']};"
          f" input recorded {c['input_recorded']} (8 each: {c['input_expected']}); output recorded"
          f" {c['output_recorded']}, events the clients read {c['output_events_read_lower_bound']} (lower bound),"
          f" max_tokens {c['output_max_tokens_upper_bound']} (upper bound)")  # fmt: skip
    for name, dim in (("rpm", "requests"), ("tpm", "tokens")):
        x = r[name]
        print(f"2. {name} {x['limit_per_min']} over 2 replicas, offered {x['offered_per_min']}/min for"
              f" {x['seconds']:.0f} s ({x['sent']} requests, {x['not_sent_in_flight_bound']} not sent):")  # fmt: skip
        print(f"  admitted {x['admitted']} {dim} vs limit x minutes {x['limit_x_minutes']}: ratio"
              f" {x['ratio_to_limit_x_minutes']} ({x['error_pct_vs_limit_x_minutes']:+.2f}%); vs that plus the initial"
              f" bucket ({x['initial_bucket']}): {x['ratio_to_limit_x_minutes_plus_bucket']}"
              f" ({x['error_pct_vs_limit_x_minutes_plus_bucket']:+.2f}%)")  # fmt: skip
        print(f"  steady rate after the first 10 s: {x['steady_per_min_after_first_10s']}/min; admitted per 10 s:"
              f" {x['admitted_per_10s']}")  # fmt: skip
        print(f"  429s: {x['status_429']} ({x['share_429']:.1%}; by replica: {x['share_429_by_replica']}; by a"
              f" request's tokens: {x['share_429_by_request_tokens']}), reasons {x['429_reasons']}; with Retry-After"
              f" {x['429_with_retry_after']}/{x['status_429']}, with x-ratelimit-*-{dim}"
              f" {x['429_with_x_ratelimit_headers']}/{x['status_429']} (200s: {x['200_with_x_ratelimit_headers']}"
              f"/{x['answered_200']}); other statuses {x['other_statuses']}")  # fmt: skip
    kills = r["kill"]
    print(f"3. data plane kill -9 under load, {len(kills['trials'])} times (a new tenant each): at most"
          f" {kills['most_lost_requests']} requests lost, the answers of the last"
          f" {kills['most_lost_as_seconds_of_answers']} s")  # fmt: skip
    for d in kills["trials"]:
        print(f"  kill after {d['load_s_before_kill']} s at {d['offered_per_s']:.0f} req/s: {d['sent']} sent,"
              f" {d['failed_by_the_kill']} failed by the kill")  # fmt: skip
        print(f"    answered {d['answered']}")
        print(f"    recorded {d['recorded']}")
        print(f"    lost (answered, not recorded) {d['lost']}; answered in the last 0.5 s before the kill"
              f" {d['answered_in_last_0_5s']}, last 1 s {d['answered_in_last_1s']} (after the signal:"
              f" {d['answered_after_the_kill_signal']}); the lost equal the answers of the last"
              f" {d['lost_equals_answers_of_the_last_s']} s")  # fmt: skip
        print(f"    restarted: healthy in {d['restart_to_healthy_s']} s, answered {d['served_after_restart']};"
              f" usage after it = recorded + that answer:"
              f" {d['recorded_after_restart_is_recorded_plus_one_answer']}")  # fmt: skip


if __name__ == "__main__":
    main()
