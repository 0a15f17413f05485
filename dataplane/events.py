"""Keeps the data plane's in-process state fresh from Redis pub/sub.

The routing channel carries routing table versions; the invalidation channel names a cached
adapter or key to drop at once (a deleted adapter, a revoked key): see `loraplane.state.messages`.
The table is also re-read every `refresh_s` in case a message was missed. While Redis is down
nothing changes: the last table, keys and adapters keep serving. After a reconnect the caches
are dropped, since invalidations may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import redis.asyncio as redis

from dataplane.routing import RoutingTable
from loraplane.state import keys
from loraplane.state.messages import Invalidation, decode_invalidation

log = logging.getLogger(__name__)
RETRY_S = 0.1  # first retry after Redis was unreachable; doubling up to refresh_s


class Cache(Protocol):
    def invalidate(self, message: Invalidation) -> None: ...

    def clear(self) -> None: ...


async def follow(client: redis.Redis, routing: RoutingTable, caches: list[Cache], refresh_s: float) -> None:
    failures = 0
    while True:
        try:
            async with client.pubsub() as ps:
                await ps.subscribe(keys.ROUTING_CHANNEL, keys.INVALIDATE_CHANNEL)
                for cache in caches:
                    cache.clear()
                await routing.refresh()
                failures = 0
                while True:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=refresh_s)
                    if msg is not None and msg["channel"] == keys.INVALIDATE_CHANNEL:
                        message = decode_invalidation(str(msg["data"]))
                        for cache in caches:
                            if message is not None:
                                cache.invalidate(message)
                    else:  # a routing change, or a quiet period: re-read (same versions are skipped)
                        await routing.refresh()
        except asyncio.CancelledError:
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            failures += 1
            log.warning("Redis unreachable (%s); serving routing version %d", err, routing.version)
            # The idle connections were to the Redis that went away: a restarted one is reached
            # on the next try, not after one failed try per stale connection.
            await client.connection_pool.disconnect(inuse_connections=False)
            await asyncio.sleep(min(refresh_s, RETRY_S * 2 ** (failures - 1)))
