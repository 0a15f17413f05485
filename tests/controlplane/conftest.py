"""Fixtures the control plane's tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from controlplane import server
from controlplane.store import Store
from tests.controlplane.test_service import start_control_plane
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


@pytest.fixture
async def plane(redis_server: RedisServer, store: Store, tmp_path: Path) -> AsyncIterator[server.ControlPlane]:
    """A control plane in this process (`start_control_plane`)."""
    cp = await start_control_plane(redis_server.url, tmp_path)
    yield cp
    await cp.stop(0)
