"""The rate limiter on a real Redis: two `Limiter`s are two data plane replicas sharing a
tenant's buckets; one whose Redis does not answer limits alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from dataplane.ratelimit import Limiter, RateLimited, estimate
from loraplane.limits import RateLimits
from loraplane.state import keys
from tests.support import RedisServer, free_port

DB = 5


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}", decode_responses=True)
    await r.flushdb()
    yield r
    await r.aclose()


async def admitted(limiter: Limiter, tenant: str, limits: RateLimits, tokens: int = 1) -> bool:
    try:
        (await limiter.admit(tenant, limits, tokens)).settle(tokens)
    except RateLimited:
        return False
    return True


async def test_two_replicas_share_a_per_minute_limit(client: redis.Redis) -> None:
    """600 a minute (a 50-request bucket, refilled at 10 a second) through two replicas at once:
    the bucket and its refill are admitted, within a slice per replica, not twice that. Slices
    are fractions of a request (2.5 here): each replica may be left holding less than one request
    it cannot use, so as few as 48 may be admitted (seen: 49)."""
    replicas = [Limiter(client), Limiter(client)]
    limits = RateLimits(rpm=600)
    started = time.monotonic()
    ok = 0
    for i in range(200):
        ok += await admitted(replicas[i % 2], "t1", limits)
    elapsed = time.monotonic() - started
    assert 50 - 2 <= ok <= 50 + 10 * elapsed + 2 * 3, (ok, elapsed)


async def test_a_refusal_says_when_to_come_back(client: redis.Redis) -> None:
    limiter = Limiter(client, burst_s=1.0)
    limits = RateLimits(rpm=60)  # a bucket of one
    assert await admitted(limiter, "t1", limits)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("t1", limits, 1)
    assert refused.value.reason == "requests"
    assert 0 < refused.value.retry_after_s <= 1.0
    names = dict(refused.value.headers)
    assert names[b"x-ratelimit-limit-requests"] == b"60" and names[b"x-ratelimit-remaining-requests"] == b"0"


async def test_a_request_over_the_tokens_per_minute_is_too_large(client: redis.Redis) -> None:
    with pytest.raises(RateLimited) as refused:
        await Limiter(client).admit("t1", RateLimits(tpm=1000), 1001)
    assert refused.value.reason == "too_large"


async def test_tokens_are_settled_to_what_was_used(client: redis.Redis) -> None:
    """Charged 200 at admission, 20 used: the rest goes back to the shared bucket."""
    limiter = Limiter(client)
    limits = RateLimits(tpm=6000)  # 100 a second, a bucket of 500
    admission = await limiter.admit("t1", limits, 200)
    level = float(await client.hget(keys.rate_bucket("t1", "tokens"), "level") or 0)
    admission.settle(20)
    await asyncio.sleep(0.1)  # given back in the background
    after = float(await client.hget(keys.rate_bucket("t1", "tokens"), "level") or 0)
    assert after - level >= 180 - 2 * 25 - 1, (level, after)  # all but what the replica keeps (a slice)


async def test_concurrency_is_shared_and_a_dead_replicas_slots_come_back(client: redis.Redis) -> None:
    a, b = Limiter(client), Limiter(client)
    limits = RateLimits(concurrency=2)
    await client.set(keys.data_plane_beat(a.replica), "1", ex=10)
    held = [await a.admit("t1", limits, 1), await a.admit("t1", limits, 1)]
    await client.set(keys.data_plane_beat(b.replica), "1", ex=10)
    with pytest.raises(RateLimited) as refused:
        await b.admit("t1", limits, 1)
    assert refused.value.reason == "concurrency"
    held[0].settle(1)
    await a._return()  # a's spare slot goes back (its background loop, once)
    await asyncio.sleep(1.1)  # ... once it has been idle a moment
    await a._return()
    (await b.admit("t1", limits, 1)).settle(1)
    await client.delete(keys.data_plane_beat(a.replica))  # a died holding its other slot
    assert await admitted(b, "t1", limits) and await admitted(b, "t1", limits)


async def test_without_redis_each_replica_limits_alone() -> None:
    """Redis does not answer: the replica admits what the limit allows it alone, then refuses;
    it never refuses everything."""
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, decode_responses=True)
    limiter = Limiter(client)
    ok = [await admitted(limiter, "t1", RateLimits(rpm=60)) for _ in range(10)]
    assert ok[:5] == [True] * 5 and not ok[-1], ok  # its own bucket of 5
    await client.aclose()


def test_the_estimate_is_the_prompt_and_the_most_it_may_generate() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    assert estimate(chat, "messages", 256) == (400 + 16) // 4 + 2 * 50
    assert estimate({"prompt": "abcd"}, "prompt", 256) == 1 + 256
    assert estimate({"input": ["ab", "cd"]}, "input", 0) == 1


async def test_a_change_of_limits_keeps_the_requests_in_flight_counted(client: redis.Redis) -> None:
    """Limits changed while requests run: those requests free their slots when they end."""
    limiter = Limiter(client)
    await client.set(keys.data_plane_beat(limiter.replica), "1", ex=10)
    running = await limiter.admit("t1", RateLimits(concurrency=1), 1)
    with pytest.raises(RateLimited):
        await limiter.admit("t1", RateLimits(concurrency=1, rpm=600), 1)  # the new limits: still one in flight
    running.settle(1)
    assert await admitted(limiter, "t1", RateLimits(concurrency=1, rpm=600))
