"""The hot path's failover (`dataplane/inference.py`): a request whose worker fails before any of
its answer reached the client is answered by another worker, once; after that, never. The data
plane runs in this process on a real socket with a real Redis; the failing workers are raw
asyncio peers that write exact bytes (or a real process, frozen, then killed), the healthy one
is the vLLM simulator."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dataplane.app import create_app
from dataplane.settings import Settings
from loraplane.catalog import Catalog
from loraplane.state import keys
from loraplane.state.records import WorkerRecord
from tests.dataplane.peers import Handler, Peer, peer, read_request, reset
from tests.support import RedisServer, start_simulator

KEY = "lp_failover-test-key"
DB = 9  # a Redis database of its own: the routing table here is these tests' workers only
PATH = "/v1/chat/completions"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
EVENT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"tiny-llama","choices":[]}\n\n'
FIRST_EVENT = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)  # one HTTP chunk
# A worker whose process accepts nothing: connections wait in the kernel's backlog.
LISTEN_ONLY = """import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True); time.sleep(60)"""

HangUp = Callable[[asyncio.StreamWriter], None]
HANG_UPS: list[HangUp] = [asyncio.StreamWriter.close, reset]


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    sim, url, _ = start_simulator("tiny-llama")
    yield url
    sim.terminate()
    sim.wait(10)


AccessLines = Callable[[], Awaitable[list[tuple[int, str]]]]


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> AccessLines:
    """The inference requests' access lines as (status, worker id), once there is one: it is
    written as the request ends, a moment after its last byte went out."""
    caplog.set_level(logging.INFO, logger="loraplane.access")

    def lines() -> list[tuple[int, str]]:
        records = [r for r in caplog.records if r.name == "loraplane.access" and r.path == PATH]  # type: ignore[attr-defined]
        return [(r.status, r.worker_id) for r in records]  # type: ignore[attr-defined]

    async def logged() -> bool:
        return bool(lines())

    async def once_logged() -> list[tuple[int, str]]:
        await until(logged)
        return lines()

    return once_logged


async def until(done: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> None:
    """Polls `done` (on this loop, which the data plane shares) until it is true."""
    async with asyncio.timeout(within_s):
        while not await done():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def failing_first(
    redis_server: RedisServer, tmp_path: Path, handler: Handler, then: str | None, upstream_timeout_s: float = 600.0
) -> AsyncIterator[tuple[Peer, httpx.AsyncClient]]:
    """A raw peer running `handler` as worker w1, tried first; `then` (a URL) as w2 if given; a
    data plane in front of them and a client for it."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(peer(handler))
        workers = {"w1": first.url} | ({"w2": then} if then else {})
        yield first, await stack.enter_async_context(dataplane(redis_server, tmp_path, workers, upstream_timeout_s))


@asynccontextmanager
async def dataplane(
    redis_server: RedisServer,
    tmp_path: Path,
    workers: dict[str, str],
    upstream_timeout_s: float = 600.0,
    cors_origins: str = "",
) -> AsyncIterator[httpx.AsyncClient]:
    """A data plane whose routing table is `workers` (id -> endpoint, all tiny-llama), tried in
    the order of their ids; a client for it with the tenant's key."""
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    r = redis.Redis.from_url(url, decode_responses=True)
    await r.flushdb()
    await r.hset(keys.apikey(hashlib.sha256(KEY.encode()).hexdigest()), "tenant_id", "t1")
    await r.hset(keys.tenant("t1"), mapping={"id": "t1", "name": "t1", "tier": "shared", "created_at": "0"})
    for worker_id, endpoint in workers.items():
        await r.set(keys.worker(worker_id), WorkerRecord(worker_id, "tiny-llama", endpoint, 8).to_json())
    await r.sadd(keys.WORKERS, *workers)
    await r.set(keys.ROUTING_VERSION, 1)
    await r.aclose()
    catalog = tmp_path / "catalog.json"
    Catalog.write(
        catalog, [{"name": "tiny-llama", "kind": "chat", "path": str(tmp_path), "lora": False, "tool_parser": "hermes"}]
    )
    settings = Settings(
        redis_url=url,
        catalog_path=catalog,
        controlplane_addr="127.0.0.1:9",
        upstream_timeout_s=upstream_timeout_s,
        cors_origins=cors_origins,
        tier_rate_limits={},  # none
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(create_app(settings), log_config=None, log_level="warning", lifespan="on", ws="none")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as client:

            async def ready() -> bool:
                r = await client.get("/readyz")
                return r.status_code == 200 and r.json()["workers"] == len(workers)

            await until(ready)
            yield client
    finally:
        server.should_exit = True
        await task
        sock.close()


async def chat(client: httpx.AsyncClient, stream: bool, marker: str) -> tuple[httpx.Response, list[str]]:
    """A chat completion and its body's non-empty lines; `marker` (sent as `user`) finds it at the simulator."""
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": stream,
            "user": marker}  # fmt: skip
    r = await client.post(PATH, json=body)
    return r, [line for line in r.text.splitlines() if line]


async def counted(client: httpx.AsyncClient) -> dict[str, float]:
    """The data plane's inference requests so far, by status."""
    page = (await client.get("/metrics")).text
    return {s.labels["status"]: s.value for family in text_string_to_metric_families(page) for s in family.samples
            if s.name == "loraplane_requests_total"}  # fmt: skip


async def simulated(simulator: str, marker: str) -> int:
    """How many requests carrying `marker` the simulator was sent."""
    async with httpx.AsyncClient() as client:
        seen = (await client.get(simulator + "/sim/state")).json()["requests"]
    return sum(r.get("user") == marker for r in seen)


def fails(before: bytes, hang_up: HangUp | None) -> Handler:
    """A worker that reads the request, sends `before`, then hangs up (closes or resets); None:
    stays silent until the data plane gives up."""

    async def handle(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.requests.append(await read_request(reader))
        writer.write(before)
        await writer.drain()
        if hang_up is None:
            await read_request(reader)
            return
        await asyncio.sleep(0.05)  # what was sent is read before the hang-up (a reset discards what was not)
        hang_up(writer)

    return handle


@pytest.mark.parametrize("hang_up", HANG_UPS, ids=["close", "reset"])
async def test_a_stream_whose_worker_is_lost_before_its_first_event_is_answered_by_another(
    redis_server: RedisServer, tmp_path: Path, simulator: str, access_lines: AccessLines, hang_up: HangUp
) -> None:
    """vLLM sends a stream's headers at once: an engine that hangs or dies before its first token
    (and is killed by its agent) leaves a stream of which the client has got nothing yet."""
    marker = uuid.uuid4().hex
    async with failing_first(redis_server, tmp_path, fails(SSE_HEAD, hang_up), simulator) as (broken, client):
        r, lines = await chat(client, stream=True, marker=marker)
        logged = await access_lines()
        counts = await counted(client)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and len(lines) == 4  # three tokens, then the end
    assert all('"model":"tiny-llama"' in line for line in lines[:-1])
    assert len(broken.requests) == 1 and await simulated(simulator, marker) == 1
    assert logged == [(200, "w2")] and counts == {"200": 1.0}


async def test_a_stream_whose_worker_stays_silent_after_its_headers_is_answered_by_another_after_the_timeout(
    redis_server: RedisServer, tmp_path: Path, simulator: str
) -> None:
    marker = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    async with failing_first(redis_server, tmp_path, fails(SSE_HEAD, None), simulator, 0.3) as (silent, client):
        started = loop.time()
        r, lines = await chat(client, stream=True, marker=marker)
        took = loop.time() - started
    assert (r.status_code, lines[-1]) == (200, "data: [DONE]")
    assert 0.3 <= took < 1.5
    assert len(silent.requests) == 1 and await simulated(simulator, marker) == 1


@pytest.mark.parametrize("hang_up", HANG_UPS, ids=["close", "reset"])
async def test_a_stream_whose_only_worker_is_lost_before_its_first_event_is_a_503(
    redis_server: RedisServer, tmp_path: Path, access_lines: AccessLines, hang_up: HangUp
) -> None:
    async with failing_first(redis_server, tmp_path, fails(SSE_HEAD, hang_up), None) as (_, client):
        r, _ = await chat(client, stream=True, marker="")
        logged = await access_lines()
        counts = await counted(client)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert logged == [(503, "w1")] and counts == {"503": 1.0}


@pytest.mark.parametrize("hang_up", HANG_UPS, ids=["close", "reset"])
async def test_a_stream_whose_worker_is_lost_after_its_first_event_ends_there_saying_so(
    redis_server: RedisServer, tmp_path: Path, simulator: str, access_lines: AccessLines, hang_up: HangUp
) -> None:
    """The client has part of the answer: another worker's whole answer after it would be a
    second one, so the stream ends there, with OpenAI's error event (the SDKs raise it) so that
    the client does not take what it got for the whole answer."""
    marker = uuid.uuid4().hex
    handler = fails(SSE_HEAD + FIRST_EVENT, hang_up)
    async with failing_first(redis_server, tmp_path, handler, simulator) as (broken, client):
        r, lines = await chat(client, stream=True, marker=marker)
        logged = await access_lines()
    assert r.status_code == 200 and lines[0] == EVENT.decode().strip() and lines[2:] == ["data: [DONE]"]
    error = json.loads(lines[1].removeprefix("data: "))["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", None, None) and "broke off" in error[
        "message"
    ]
    assert len(broken.requests) == 1 and await simulated(simulator, marker) == 0
    assert logged == [(200, "w1")]


RESPONSE_EVENT = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":'
                  b'{"id":"resp_1","object":"response","created_at":1,"model":"tiny-llama","status":"in_progress",'
                  b'"output":[]}}\n\n')  # fmt: skip


async def test_a_responses_stream_whose_worker_is_lost_midway_ends_with_its_error_event(
    redis_server: RedisServer, tmp_path: Path, simulator: str
) -> None:
    """A Responses stream broken off after its first event ends with the spec's error event, next
    in sequence (vLLM 0.32 sends none when its stream fails: the stream just stopped)."""
    handler = fails(SSE_HEAD + b"%x\r\n%s\r\n" % (len(RESPONSE_EVENT), RESPONSE_EVENT), reset)
    async with failing_first(redis_server, tmp_path, handler, simulator) as (broken, client):
        body = {"model": "tiny-llama", "input": "x", "max_output_tokens": 3, "stream": True}
        r = await client.post("/v1/responses", json=body)
    names = [line.removeprefix("event: ") for line in r.text.splitlines() if line.startswith("event: ")]
    last = json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))
    assert r.status_code == 200 and names == ["response.created", "error"]
    assert last["type"] == "error" and last["sequence_number"] == 1 and "broke off" in last["message"]
    assert len(broken.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("hang_up", HANG_UPS, ids=["close", "reset"])
async def test_a_request_whose_worker_is_lost_before_its_status_line_is_answered_by_another(
    redis_server: RedisServer, tmp_path: Path, simulator: str, hang_up: HangUp, stream: bool
) -> None:
    marker = uuid.uuid4().hex
    async with failing_first(redis_server, tmp_path, fails(b"", hang_up), simulator) as (broken, client):
        r, lines = await chat(client, stream=stream, marker=marker)
    assert r.status_code == 200 and (lines[-1] == "data: [DONE]" if stream else '"tok tok tok"' in lines[0])
    assert len(broken.requests) == 1 and await simulated(simulator, marker) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_request_held_by_a_frozen_worker_is_answered_by_another_once_that_worker_is_killed(
    redis_server: RedisServer, tmp_path: Path, simulator: str, stream: bool
) -> None:
    """A SIGSTOP'd worker's kernel still accepts connections and requests; the request waits
    until its agent kills the worker, whose connections the kernel then resets."""
    frozen = await asyncio.create_subprocess_exec(sys.executable, "-c", LISTEN_ONLY, stdout=asyncio.subprocess.PIPE)
    try:
        assert frozen.stdout is not None
        port = int(await frozen.stdout.readline())
        os.kill(frozen.pid, signal.SIGSTOP)
        marker = uuid.uuid4().hex
        async with dataplane(redis_server, tmp_path, {"w1": f"http://127.0.0.1:{port}", "w2": simulator}) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            loop.call_later(0.3, frozen.kill)  # the agent notices and kills it
            r, lines = await chat(client, stream=stream, marker=marker)
            took = loop.time() - started
        assert r.status_code == 200 and (lines[-1] == "data: [DONE]" if stream else '"tok tok tok"' in lines[0])
        assert 0.3 <= took < 1.5 and await simulated(simulator, marker) == 1
    finally:
        if frozen.returncode is None:
            frozen.kill()
        await frozen.wait()
