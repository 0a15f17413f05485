"""An open-loop load generator for the benchmarks that drive a whole stack: streamed chat
completions timed to their first token, Poisson arrivals with a bound on requests in flight,
percentiles, and the CPU each process of the run spent.

Run as a script, it is one flood in a process of its own (so that a flood's answers never delay
another client's event loop), until its stdin closes; then its answers as JSON on stdout:

    python bench/loadgen.py '{"url": ..., "headers": {...}, "rate": 400, "bound": 400, ...}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil

CHAT = "/v1/chat/completions"


@dataclass
class Answer:
    """One streamed chat completion as its client saw it (times: monotonic seconds)."""

    started: float
    ttft: float = -1.0  # to the first content token; -1: none came
    ended: float = 0.0
    status: int = 0  # 0: no answer (the connection failed)
    done: bool = False  # the stream's `data: [DONE]` was read
    code: str = ""  # a refusal's error code (`server_overloaded`, `queue_full`, ...)
    error: str = ""  # the client's exception, when no answer came; or what was wrong with the stream
    engine_s: float = -1.0  # the simulator's time stamp on the first token (`sim_t`) less the send time

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.ttft >= 0

    @property
    def outcome(self) -> str:
        if self.ok:
            return "ok"
        if self.status and self.status != 200:
            return f"{self.status} {self.code}".strip()
        return self.error or "incomplete stream"


def chat_body(model: str, content: str, max_tokens: int, **extra: object) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **extra}


async def stream_chat(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                      body: dict[str, Any]) -> Answer:  # fmt: skip
    """POST a streamed chat completion and read it to its end."""
    a = Answer(time.monotonic())
    sent_at = time.time()
    try:
        async with session.post(url + CHAT, json=body, headers=headers) as r:
            a.status = r.status
            if r.status != 200:
                error = (await r.json(content_type=None)).get("error")
                if isinstance(error, dict):  # its code, else the start of its message
                    a.code = str(error.get("code") or error.get("message", ""))[:60]
            else:
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        a.done = True
                    elif a.ttft < 0 and line.startswith(b"data: {"):
                        _first_token(a, orjson.loads(line[6:]), sent_at)
            if a.status == 200 and not a.ok and not a.error:
                a.error = "no token" if a.done else "no [DONE]"
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        a.error = type(err).__name__
    a.ended = time.monotonic()
    return a


def _first_token(a: Answer, event: dict[str, Any], sent_at: float) -> None:
    """Notes the first token's arrival, if the event carries one: vLLM's first event carries only
    the role (and ""); a token may decode to "" (part of a character), and is a token still."""
    if isinstance(event.get("error"), dict):  # an error the engine sent in the stream
        a.error = str(event["error"].get("message", ""))[:200]
        return
    delta = (event.get("choices") or [{}])[0].get("delta") or {}
    if delta.get("content") or ("role" not in delta and delta.get("content") is not None):
        a.ttft = time.monotonic() - a.started
        if "sim_t" in event:
            a.engine_s = event["sim_t"] - sent_at


@dataclass
class Flow:
    """One open loop's requests: those sent (as tasks) and the arrivals not sent for its bound."""

    tasks: list[asyncio.Task[Answer]] = field(default_factory=list)
    not_sent: list[float] = field(default_factory=list)  # when each arrival was dropped
    in_flight: int = 0

    def answers(self) -> list[Answer]:
        return [t.result() for t in self.tasks if t.done() and not t.cancelled()]

    async def finish(self) -> None:
        """Every request sent answered."""
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def cut(self) -> int:
        """The requests still in flight cancelled (their clients leave); how many."""
        pending = [t for t in self.tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


async def poisson(rate: float, fire: Callable[[], Coroutine[Any, Any, Answer]], bound: int, stop: asyncio.Event,
                  rng: random.Random, flow: Flow | None = None) -> Flow:  # fmt: skip
    """Poisson arrivals at `rate` a second until `stop`, whatever the answers take; an arrival that
    finds `bound` requests of this loop in flight is not sent (and noted)."""
    flow = flow or Flow()
    loop = asyncio.get_running_loop()
    at = loop.time()

    def landed(_: asyncio.Task[Answer]) -> None:
        flow.in_flight -= 1

    while not stop.is_set():
        at += rng.expovariate(rate)
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop.is_set():
            break
        if flow.in_flight >= bound:
            flow.not_sent.append(time.monotonic())
            continue
        flow.in_flight += 1
        task = asyncio.create_task(fire())
        task.add_done_callback(landed)
        flow.tasks.append(task)
    return flow


async def closed_loop(
    concurrency: int, seconds: float, fire: Callable[[], Coroutine[Any, Any, Answer]]
) -> list[Answer]:
    """`concurrency` clients each sending its next request as soon as its last is answered."""
    until = time.monotonic() + seconds
    out: list[Answer] = []

    async def client() -> None:
        while time.monotonic() < until:
            out.append(await fire())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


def pct(xs: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..1) of `xs` (not empty)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ttft_ms(answers: list[Answer]) -> dict[str, float | int]:
    """Time to first token of the answers that completed: n, p50, p99, max (ms)."""
    ms = [a.ttft * 1000 for a in answers if a.ok]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(pct(ms, 0.5), 1), "p99_ms": round(pct(ms, 0.99), 1),
            "max_ms": round(max(ms), 1)}  # fmt: skip


class CpuMeter:
    """CPU time of named groups of processes (each with its children, but for the groups named in
    `alone`), and of the whole machine, from `start` to `stop`: percent of one core per group; the
    machine's busy share, and what processes outside the groups used."""

    def __init__(self, groups: Mapping[str, list[int]], alone: frozenset[str] = frozenset()) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._alone = alone
        self._t0 = 0.0
        self._used: dict[str, float] = {}
        self._machine: Any = None

    def _spent(self) -> dict[str, float]:
        out = {}
        for name, pids in self._groups.items():
            total = 0.0
            for pid in pids:
                try:
                    top = psutil.Process(pid)
                    procs = [top] if name in self._alone else [top, *top.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        t = p.cpu_times()
                    except psutil.Error:
                        continue
                    total += t.user + t.system
            out[name] = total
        return out

    def add(self, name: str, pid: int) -> None:
        """One more group, before `start`."""
        self._groups[name] = [pid]

    def start(self) -> None:
        self._t0, self._used, self._machine = time.monotonic(), self._spent(), psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        used = self._spent()
        out = {f"{name}_pct_of_a_core": round((used[name] - self._used[name]) / wall * 100, 1) for name in used}
        m0, m1 = self._machine, psutil.cpu_times()
        busy = sum(m1) - sum(m0) - (m1.idle - m0.idle) - (getattr(m1, "iowait", 0) - getattr(m0, "iowait", 0))
        cores = os.cpu_count() or 1
        ours = sum(used[n] - self._used[n] for n in used)
        out["machine_busy_pct"] = round(busy / (wall * cores) * 100, 1)
        out["outside_this_run_pct_of_a_core"] = round(max(0.0, busy - ours) / wall * 100, 1)
        return out


# a flood in a process of its own


async def flood(config: dict[str, Any]) -> dict[str, Any]:
    """`config`: url, headers, model, tokens, extra (in each body), marker (each message: marker
    and a number, unless `prompts` are given: then one of those), rate, bound, seed. Until stdin
    closes; the requests in flight then are cut."""
    stop = asyncio.Event()
    marker = itertools.count()
    connector = aiohttp.TCPConnector(limit=config["bound"] + 16, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=180)) as session:

        async def fire() -> Answer:
            n, prompts = next(marker), config["prompts"]
            content = prompts[n % len(prompts)] if prompts else f"{config['marker']}{n}"
            body = chat_body(config["model"], content, config["tokens"], **config["extra"])
            return await stream_chat(session, config["url"], config["headers"], body)

        async def until_stdin_closes() -> None:
            await asyncio.to_thread(sys.stdin.read)
            stop.set()

        closing = asyncio.create_task(until_stdin_closes())
        flow = await poisson(config["rate"], fire, config["bound"], stop, random.Random(config["seed"]))
        await closing
        cut = await flow.cut()
    return {"answers": [dataclasses.astuple(a) for a in flow.answers()], "not_sent": flow.not_sent, "cut": cut}


def answers_from(rows: list[list[Any]]) -> list[Answer]:
    return [Answer(*row) for row in rows]


if __name__ == "__main__":
    json.dump(asyncio.run(flood(json.loads(sys.argv[1]))), sys.stdout)
