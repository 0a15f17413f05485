"""Tenants and API keys in Redis (keys and records: `loraplane.state`). A change that must reach
data planes at once is published as an invalidation: `KeyChanged` for a key, `TenantChanged` for
a tenant's tier or rate limits."""

from __future__ import annotations

import time

import redis.asyncio as redis

from controlplane.errors import AlreadyExists, NotFound
from loraplane.limits import RateLimits
from loraplane.state import keys, queries
from loraplane.state.messages import KeyChanged, TenantChanged
from loraplane.state.records import ApiKey, Tenant, limits_to_json

# KEYS[1] tenants-by-name hash, KEYS[2] tenant hash, KEYS[3] api key hash, KEYS[4] key prefix,
# KEYS[5] tenant keys set
# ARGV[1] name, ARGV[2] tenant id, ARGV[3] tier, ARGV[4] created_at, ARGV[5] key prefix, ARGV[6] key hash
# Returns 1 on success, -1 if the name is taken.
CREATE_TENANT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'name', ARGV[1], 'tier', ARGV[3], 'created_at', ARGV[4], 'suspended', '0')
redis.call('HSET', KEYS[3], 'tenant_id', ARGV[2], 'prefix', ARGV[5], 'created_at', ARGV[4])
redis.call('SET', KEYS[4], ARGV[6])
redis.call('SADD', KEYS[5], ARGV[5])
return 1
"""


UNCHANGED = -1  # `set_capacity`'s pinned_slots: leave it as it is


class TenantStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._create = client.register_script(CREATE_TENANT)

    async def create(self, tenant: Tenant, key_hash: str, key_prefix: str) -> None:
        res = await self._create(
            keys=[
                keys.TENANTS,
                keys.tenant(tenant.id),
                keys.apikey(key_hash),
                keys.keyprefix(key_prefix),
                keys.tenant_keys(tenant.id),
            ],
            args=[tenant.name, tenant.id, tenant.tier, tenant.created_at, key_prefix, key_hash],
        )
        if res == -1:
            raise AlreadyExists(f"tenant {tenant.name!r} already exists")

    async def get(self, tenant_id: str) -> Tenant | None:
        h = await self.r.hgetall(keys.tenant(tenant_id))
        return Tenant.from_hash(h) if h else None

    async def require(self, tenant_id: str) -> Tenant:
        tenant = await self.get(tenant_id) if tenant_id else None
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist")
        return tenant

    async def all(self) -> list[Tenant]:
        tenants = [await self.get(str(t)) for t in await self.r.hvals(keys.TENANTS)]
        return sorted((t for t in tenants if t), key=lambda t: t.name)

    async def for_key(self, key_hash: str) -> Tenant | None:
        return await queries.key_tenant(self.r, key_hash)

    async def set_tier(self, tenant_id: str, tier: str) -> Tenant:
        await self.require(tenant_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.tenant(tenant_id), "tier", tier)
            pipe.publish(keys.INVALIDATE_CHANNEL, TenantChanged(tenant_id).encode())
            await pipe.execute()
        return await self.require(tenant_id)

    async def set_limits(self, tenant_id: str, limits: RateLimits | None) -> Tenant:
        """The tenant's own rate limits; None: its tier's from now on."""
        await self.require(tenant_id)
        async with self.r.pipeline(transaction=True) as pipe:
            if limits is None:
                pipe.hdel(keys.tenant(tenant_id), "limits")
            else:
                pipe.hset(keys.tenant(tenant_id), "limits", limits_to_json(limits))
            pipe.publish(keys.INVALIDATE_CHANNEL, TenantChanged(tenant_id).encode())
            await pipe.execute()
        return await self.require(tenant_id)

    async def set_capacity(self, tenant_id: str, pinned_slots: int | None, spill: bool | None) -> Tenant:
        """Its own pinned-adapter allowance (None: its tier's; UNCHANGED) and whether it may
        spill over to shared workers (None: unchanged)."""
        await self.require(tenant_id)
        key = keys.tenant(tenant_id)
        async with self.r.pipeline(transaction=True) as pipe:
            if pinned_slots is None:
                pipe.hdel(key, "pinned_slots")
            elif pinned_slots != UNCHANGED:
                pipe.hset(key, "pinned_slots", str(pinned_slots))
            if spill is not None:
                pipe.hset(key, "spill", "1" if spill else "0")
            pipe.publish(keys.INVALIDATE_CHANNEL, TenantChanged(tenant_id).encode())
            await pipe.execute()
        return await self.require(tenant_id)

    async def set_suspended(self, tenant_id: str, suspended: bool) -> Tenant:
        await self.require(tenant_id)
        await self.r.hset(keys.tenant(tenant_id), "suspended", "1" if suspended else "0")
        for info in await self.keys(tenant_id):
            await self._invalidate_prefix(info.prefix)
        return await self.require(tenant_id)

    async def add_key(self, tenant_id: str, key_hash: str, key_prefix: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.apikey(key_hash), mapping=ApiKey(key_prefix, tenant_id, time.time()).to_hash())  # type: ignore[arg-type]
            pipe.set(keys.keyprefix(key_prefix), key_hash)
            pipe.sadd(keys.tenant_keys(tenant_id), key_prefix)
            await pipe.execute()

    async def keys(self, tenant_id: str) -> list[ApiKey]:
        out = []
        for prefix in sorted(await self.r.smembers(keys.tenant_keys(tenant_id))):
            digest = await self.r.get(keys.keyprefix(str(prefix)))
            h = await self.r.hgetall(keys.apikey(str(digest))) if digest else {}
            if h:
                out.append(ApiKey.from_hash(h))
        return out

    async def revoke(self, key_prefix: str) -> None:
        raw = await self.r.get(keys.keyprefix(key_prefix))
        digest = str(raw) if raw else ""
        tid = await self.r.hget(keys.apikey(digest), "tenant_id") if digest else None
        if not digest or not tid:
            raise NotFound(f"no key with prefix {key_prefix!r}")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.apikey(digest), keys.keyprefix(key_prefix))
            pipe.srem(keys.tenant_keys(str(tid)), key_prefix)
            pipe.publish(keys.INVALIDATE_CHANNEL, KeyChanged(digest).encode())
            await pipe.execute()

    async def _invalidate_prefix(self, key_prefix: str) -> None:
        digest = await self.r.get(keys.keyprefix(key_prefix))
        if digest:
            await self.r.publish(keys.INVALIDATE_CHANNEL, KeyChanged(str(digest)).encode())
