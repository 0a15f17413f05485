"""API key checks against key hashes in Redis, cached in-process."""

from __future__ import annotations

import asyncio
import hashlib
import time

import redis.asyncio as redis

from dataplane.breaker import Breaker
from dataplane.errors import Forbidden, Unauthorized, Unavailable
from loraplane.state import queries
from loraplane.state.messages import Invalidation, KeyChanged, TenantChanged
from loraplane.state.records import Tenant

MAX_HEADER = 512


class KeyCache:
    def __init__(self, client: redis.Redis, ttl_s: float, redis_down: Breaker) -> None:
        self._r = self.client = client
        self.redis_down = redis_down
        self._ttl = ttl_s
        self._cache: dict[str, tuple[Tenant, float]] = {}
        # One Redis lookup per key at a time: a burst of requests with a key not cached (after a
        # restart, or the caches cleared) waits for the one lookup rather than each asking.
        self._asking: dict[str, asyncio.Future[Tenant | None]] = {}

    def invalidate(self, message: Invalidation) -> None:
        if isinstance(message, KeyChanged):
            self._cache.pop(message.key_hash, None)
        elif isinstance(message, TenantChanged):  # its tier or limits: read again at its next request
            for digest in [d for d, (t, _) in self._cache.items() if t.id == message.tenant_id]:
                del self._cache[digest]

    def clear(self) -> None:
        self._cache.clear()

    async def tenant_id(self, header: str) -> str:
        """The tenant whose key is in this `Authorization` header; Unauthorized otherwise."""
        return (await self.tenant(header)).id

    async def tenant(self, header: str) -> Tenant:
        """The tenant (its record) whose key is in this `Authorization` header; Unauthorized otherwise."""
        scheme, _, key = header.partition(" ")
        if len(header) > MAX_HEADER or scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized()
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit and (hit[1] > now or self.redis_down.open):
            return hit[0]
        try:
            tenant = await self._lookup(digest)
        except (redis.ConnectionError, redis.TimeoutError):
            self.redis_down.trip()
            if hit:  # Redis is down: a key we knew stays good until Redis is back.
                return hit[0]
            raise Unavailable("authentication is unavailable right now") from None
        if tenant is None:
            self._cache.pop(digest, None)
            raise Unauthorized()
        if tenant.suspended:
            self._cache.pop(digest, None)
            raise Forbidden("this tenant is suspended")
        self._cache[digest] = (tenant, now + self._ttl)
        return tenant

    async def _lookup(self, digest: str) -> Tenant | None:
        asking = self._asking.get(digest)
        if asking is not None:
            return await asyncio.shield(asking)  # one caller leaving does not cancel the others' lookup
        asking = self._asking[digest] = asyncio.ensure_future(queries.key_tenant(self._r, digest))
        try:
            return await asyncio.shield(asking)
        finally:
            if asking.done():
                del self._asking[digest]
            else:  # the first caller left: the lookup finishes for the others, then is forgotten
                asking.add_done_callback(lambda _: self._asking.pop(digest, None))
