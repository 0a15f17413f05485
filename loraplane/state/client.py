"""The one way a component opens Redis: a pool that waits for a free connection instead of failing.

redis-py's default pool raises `MaxConnectionsError` (a `ConnectionError`) at its 101st
concurrent command. Every component reads a `ConnectionError` as "Redis is down": the data plane
cleared its caches and answered 503 "authentication unavailable" to a burst of new requests while
Redis was fine (seen in bench/tiers.py on real vLLM). A burst waits here for a connection, bounded
by the socket timeout; Redis really away still fails at once (the connect fails)."""

from __future__ import annotations

import redis.asyncio as redis

MAX_CONNECTIONS = 256  # per process; a burst beyond it queues for a connection


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for `url` whose commands (and waits for a pooled connection) time out after
    `timeout_s`. A pooled connection idle over a second is pinged before use: one left over from
    a Redis that restarted is replaced there, not failed on (a 503) the first time it is used again."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=1,
        decode_responses=True,
    )
    return redis.Redis.from_pool(pool)
