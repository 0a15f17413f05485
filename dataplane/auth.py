"""API key checks against key hashes in Redis, cached in-process."""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as redis

from dataplane.breaker import Breaker
from dataplane.errors import Forbidden, Unauthorized, Unavailable

MAX_HEADER = 512


class KeyCache:
    def __init__(self, client: redis.Redis, ttl_s: float, redis_down: Breaker) -> None:
        self._r = client
        self.redis_down = redis_down
        self._ttl = ttl_s
        self._cache: dict[str, tuple[str, float]] = {}

    def invalidate(self, what: str) -> None:
        if what.startswith("key:"):
            self._cache.pop(what[4:], None)

    def clear(self) -> None:
        self._cache.clear()

    async def tenant_id(self, header: str) -> str:
        """The tenant whose key is in this `Authorization` header; Unauthorized otherwise."""
        scheme, _, key = header.partition(" ")
        if len(header) > MAX_HEADER or scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized()
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit and (hit[1] > now or self.redis_down.open):
            return hit[0]
        try:
            tid = await self._r.hget(f"lp:apikey:{digest}", "tenant_id")
            suspended = await self._r.hget("lp:tenant:" + str(tid), "suspended") if tid else None
        except (redis.ConnectionError, redis.TimeoutError):
            self.redis_down.trip()
            if hit:  # Redis is down: a key we knew stays good until Redis is back.
                return hit[0]
            raise Unavailable("authentication is unavailable right now") from None
        if tid is None:
            self._cache.pop(digest, None)
            raise Unauthorized()
        if suspended == "1":
            self._cache.pop(digest, None)
            raise Forbidden("this tenant is suspended")
        self._cache[digest] = (str(tid), now + self._ttl)
        return str(tid)
