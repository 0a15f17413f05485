"""Keeps the data plane's in-process state fresh from Redis pub/sub.

`lp:routing` carries routing table versions; `lp:invalidate` names a cached adapter or
key to drop at once (a deleted adapter, a revoked key). The table is also re-read every
`refresh_s` in case a message was missed. While Redis is down nothing changes: the last
table, keys and adapters keep serving. After a reconnect the caches are dropped, since
invalidations may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import redis.asyncio as redis

from dataplane.routing import RoutingTable

log = logging.getLogger(__name__)
ROUTING = "lp:routing"
INVALIDATE = "lp:invalidate"
RETRY_S = 0.1  # first retry after Redis was unreachable; doubling up to refresh_s


class Cache(Protocol):
    def invalidate(self, what: str) -> None: ...

    def clear(self) -> None: ...


async def follow(client: redis.Redis, routing: RoutingTable, caches: list[Cache], refresh_s: float) -> None:
    failures = 0
    while True:
        try:
            async with client.pubsub() as ps:
                await ps.subscribe(ROUTING, INVALIDATE)
                for cache in caches:
                    cache.clear()
                await routing.refresh()
                failures = 0
                while True:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=refresh_s)
                    if msg is not None and msg["channel"] == INVALIDATE:
                        for cache in caches:
                            cache.invalidate(str(msg["data"]))
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
