"""Fixtures the control plane's tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from controlplane.store import Store
from tests.support import RedisServer, health_server


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    """A Store on an emptied Redis database."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=10)
    await client.flushdb()
    yield Store(client)
    await client.aclose()


@pytest.fixture
async def live_replica() -> AsyncIterator[str]:
    """The address of a replica that answers its health check."""
    async with health_server() as addr:
        yield addr
