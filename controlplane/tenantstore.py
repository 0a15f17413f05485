"""Tenants and API keys in Redis.

Keys (prefix `lp:`):
    tenant:<tid>            hash   id, name, tier, created_at, suspended ("0" | "1")
    tenants                 hash   name -> tid
    apikey:<sha256(key)>    hash   tenant_id, prefix, created_at   (keys are stored only hashed)
    keyprefix:<prefix>      string sha256(key), to revoke a key by its public prefix
    tenant:<tid>:keys       set    the tenant's key prefixes
A change that must reach data planes at once is published on `lp:invalidate` as
"key:<sha256(key)>".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as redis

from controlplane.errors import AlreadyExists, NotFound

P = "lp:"
INVALIDATE_CHANNEL = P + "invalidate"

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


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    tier: str
    created_at: float
    suspended: bool = False


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    tenant_id: str
    created_at: float


class TenantStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._create = client.register_script(CREATE_TENANT)

    async def create(self, tenant: Tenant, key_hash: str, key_prefix: str) -> None:
        res = await self._create(
            keys=[
                P + "tenants",
                f"{P}tenant:{tenant.id}",
                f"{P}apikey:{key_hash}",
                f"{P}keyprefix:{key_prefix}",
                f"{P}tenant:{tenant.id}:keys",
            ],
            args=[tenant.name, tenant.id, tenant.tier, tenant.created_at, key_prefix, key_hash],
        )
        if res == -1:
            raise AlreadyExists(f"tenant {tenant.name!r} already exists")

    async def get(self, tenant_id: str) -> Tenant | None:
        h = await self.r.hgetall(f"{P}tenant:{tenant_id}")
        if not h:
            return None
        return Tenant(
            id=str(h["id"]),
            name=str(h["name"]),
            tier=str(h["tier"]),
            created_at=float(h["created_at"]),
            suspended=h.get("suspended") == "1",
        )

    async def require(self, tenant_id: str) -> Tenant:
        tenant = await self.get(tenant_id) if tenant_id else None
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist")
        return tenant

    async def all(self) -> list[Tenant]:
        tenants = [await self.get(str(t)) for t in await self.r.hvals(P + "tenants")]
        return sorted((t for t in tenants if t), key=lambda t: t.name)

    async def for_key(self, key_hash: str) -> Tenant | None:
        tid = await self.r.hget(f"{P}apikey:{key_hash}", "tenant_id")
        return await self.get(str(tid)) if tid else None

    async def set_tier(self, tenant_id: str, tier: str) -> Tenant:
        await self.require(tenant_id)
        await self.r.hset(f"{P}tenant:{tenant_id}", "tier", tier)
        return await self.require(tenant_id)

    async def set_suspended(self, tenant_id: str, suspended: bool) -> Tenant:
        await self.require(tenant_id)
        await self.r.hset(f"{P}tenant:{tenant_id}", "suspended", "1" if suspended else "0")
        for info in await self.keys(tenant_id):
            await self._invalidate_prefix(info.prefix)
        return await self.require(tenant_id)

    async def add_key(self, tenant_id: str, key_hash: str, key_prefix: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                f"{P}apikey:{key_hash}",
                mapping={"tenant_id": tenant_id, "prefix": key_prefix, "created_at": time.time()},
            )
            pipe.set(f"{P}keyprefix:{key_prefix}", key_hash)
            pipe.sadd(f"{P}tenant:{tenant_id}:keys", key_prefix)
            await pipe.execute()

    async def keys(self, tenant_id: str) -> list[KeyInfo]:
        out = []
        for prefix in sorted(await self.r.smembers(f"{P}tenant:{tenant_id}:keys")):
            digest = await self.r.get(f"{P}keyprefix:{prefix!s}")
            h = await self.r.hgetall(P + "apikey:" + str(digest)) if digest else {}
            if h:
                out.append(KeyInfo(prefix=str(prefix), tenant_id=tenant_id, created_at=float(h["created_at"])))
        return out

    async def revoke(self, key_prefix: str) -> None:
        raw = await self.r.get(f"{P}keyprefix:{key_prefix}")
        digest = str(raw) if raw else ""
        tid = await self.r.hget(P + "apikey:" + digest, "tenant_id") if digest else None
        if not digest or not tid:
            raise NotFound(f"no key with prefix {key_prefix!r}")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(P + "apikey:" + digest, f"{P}keyprefix:{key_prefix}")
            pipe.srem(P + "tenant:" + str(tid) + ":keys", key_prefix)
            pipe.publish(INVALIDATE_CHANNEL, "key:" + digest)
            await pipe.execute()

    async def _invalidate_prefix(self, key_prefix: str) -> None:
        digest = await self.r.get(f"{P}keyprefix:{key_prefix}")
        if digest:
            await self.r.publish(INVALIDATE_CHANNEL, "key:" + str(digest))
