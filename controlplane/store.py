"""The control plane's writes and reads of the state in Redis: the keys, records and messages
of `loraplane.state`, changed atomically (Lua or WATCH/MULTI)."""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import ParamSpec, TypeVar

import redis.asyncio as redis

from controlplane.errors import AlreadyExists, NotFound, QuotaExceeded
from controlplane.tenantstore import TenantStore
from loraplane.state import keys, messages, queries
from loraplane.state.records import Activity, AdapterRecord, WorkerRecord

FAILED_TTL_S = 7 * 24 * 3600
WATCH_ATTEMPTS = 8
Params = ParamSpec("Params")
Result = TypeVar("Result")


def optimistic(method: Callable[Params, Awaitable[Result]]) -> Callable[Params, Awaitable[Result]]:
    """A WATCH/MULTI transaction run again, after a short random pause, when another writer
    changed a watched key first (many tenants' writes touch shared sets)."""

    @functools.wraps(method)
    async def run(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        for attempt in range(WATCH_ATTEMPTS):
            try:
                return await method(*args, **kwargs)
            except redis.WatchError:
                if attempt == WATCH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
        raise AssertionError("unreachable")

    return run


# Check the name and the quota and take both, in one step.
# KEYS[1] tenant adapters hash, KEYS[2] adapter record key, KEYS[3] tenant ids zset,
# KEYS[4] blob reference set (when ARGV[6] is a sha256), KEYS[5] pending set (when it is "")
# ARGV[1] name, ARGV[2] adapter id, ARGV[3] record JSON, ARGV[4] max adapters, ARGV[5] created_at,
# ARGV[6] sha256 or "" (bytes not there yet)
# Returns 1 on success, -1 if the name is taken, -2 if the quota is used up.
CREATE_ADAPTER = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -2 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
if ARGV[6] ~= '' then redis.call('SADD', KEYS[4], ARGV[2]) else redis.call('SADD', KEYS[5], ARGV[2]) end
return 1
"""


# Pin an adapter within the tenant's allowance, in one step, unless it is no longer ready (a
# delete that came first; its pin would outlive it).
# KEYS[1] tenant pinned set, KEYS[2] pinned hash, KEYS[3] adapter record key; ARGV[1] adapter id,
# ARGV[2] tenant id, ARGV[3] allowance
# Returns the tenant's pins now, -1 when the allowance is used up (an adapter already pinned is
# pinned again: 0 more), or -2 when the adapter is not ready.
PIN = """
local raw = redis.call('GET', KEYS[3])
if not raw or cjson.decode(raw)['status'] ~= 'ready' then return -2 end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
  redis.call('SADD', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return redis.call('SCARD', KEYS[1])
"""


class Store:
    """Over a client made with decode_responses=True."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.tenants = TenantStore(client)
        self._create_adapter = client.register_script(CREATE_ADAPTER)
        self._pin = client.register_script(PIN)

    # adapters

    async def create_adapter(self, rec: AdapterRecord, max_adapters: int) -> None:
        res = await self._create_adapter(
            keys=[
                keys.tenant_adapters(rec.tenant_id),
                keys.adapter(rec.id),
                keys.tenant_ids(rec.tenant_id),
                keys.blob(rec.sha256),
                keys.PENDING,
            ],
            args=[rec.name, rec.id, rec.to_json(), max_adapters, rec.created_at, rec.sha256],
        )
        if res == -1:
            raise AlreadyExists(f"an adapter named {rec.name!r} already exists")
        if res == -2:
            raise QuotaExceeded(f"the tenant's tier allows at most {max_adapters} adapters")

    async def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        raw = await self.r.get(keys.adapter(adapter_id))
        return AdapterRecord.from_json(raw) if raw else None

    async def list_adapters(self, tenant_id: str) -> list[AdapterRecord]:
        ids = await self.r.zrevrange(keys.tenant_ids(tenant_id), 0, -1)
        if not ids:
            return []
        raws = await self.r.mget([keys.adapter(str(i)) for i in ids])
        return [AdapterRecord.from_json(r) for r in raws if r]

    @optimistic
    async def complete_adapter(self, done: AdapterRecord) -> bool:
        """pending -> ready, with its bytes; False if the adapter was deleted meanwhile."""
        key = keys.adapter(done.id)
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or AdapterRecord.from_json(raw).status != "pending":
                await self.r.srem(keys.PENDING, done.id)
                return False
            pipe.multi()
            pipe.set(key, done.to_json())
            pipe.sadd(keys.blob(done.sha256), done.id)
            pipe.srem(keys.PENDING, done.id)
            await pipe.execute()
        await self.invalidate_adapter(done)
        return True

    @optimistic
    async def fail_adapter(self, adapter_id: str, reason: str) -> None:
        """pending -> failed: still visible with its reason; its name and quota are free again."""
        key = keys.adapter(adapter_id)
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            rec = AdapterRecord.from_json(raw) if raw else None
            pipe.multi()
            pipe.srem(keys.PENDING, adapter_id)
            if rec is None or rec.status != "pending":
                await pipe.execute()
                return
            pipe.set(key, replace(rec, status="failed", status_reason=reason).to_json(), ex=FAILED_TTL_S)
            pipe.hdel(keys.tenant_adapters(rec.tenant_id), rec.name)
            await pipe.execute()

    @optimistic
    async def set_placement_error(self, adapter_id: str, reason: str, at: float) -> None:
        """Record (or, with reason "", clear) why the adapter could not be placed."""
        key = keys.adapter(adapter_id)
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or (rec := AdapterRecord.from_json(raw)).status != "ready":
                return
            pipe.multi()
            pipe.set(key, replace(rec, placement_error=reason, placement_failed_at=at if reason else 0.0).to_json())
            await pipe.execute()

    async def touch(self, adapter_id: str, at: float) -> None:
        """A placement asked for the adapter (requests' use is the data planes' to record)."""
        await self.r.hset(keys.PLACED, adapter_id, at)

    async def last_used(self, adapter_ids: list[str]) -> dict[str, float]:
        """When each adapter was last asked for, by a request or a placement."""
        if not adapter_ids:
            return {}
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.USED, adapter_ids)
            pipe.hmget(keys.PLACED, adapter_ids)
            used, placed = await pipe.execute()
        return {
            a: max(float(u or 0), float(p or 0)) for a, u, p in zip(adapter_ids, used, placed, strict=True) if u or p
        }

    @optimistic
    async def mark_deleting(self, rec: AdapterRecord) -> None:
        """The adapter is gone for its tenant at once (name, quota, lists); eviction and
        garbage collection follow. Idempotent."""
        names = keys.tenant_adapters(rec.tenant_id)
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(names)
            owner = await pipe.hget(names, rec.name)
            pipe.multi()
            if owner == rec.id:
                pipe.hdel(names, rec.name)
            pipe.set(keys.adapter(rec.id), replace(rec, status="deleting").to_json())
            pipe.zrem(keys.tenant_ids(rec.tenant_id), rec.id)
            pipe.sadd(keys.DELETING, rec.id)
            pipe.srem(keys.tenant_pinned(rec.tenant_id), rec.id)  # a deleted adapter's pin is freed
            pipe.hdel(keys.PINNED, rec.id)
            await pipe.execute()
        await self.invalidate_adapter(rec)

    async def deleting(self) -> list[AdapterRecord]:
        return await self._members(keys.DELETING)

    async def pending(self) -> list[AdapterRecord]:
        return await self._members(keys.PENDING)

    async def _members(self, key: str) -> list[AdapterRecord]:
        ids = sorted(await self.r.smembers(key))
        raws = await self.r.mget([keys.adapter(str(i)) for i in ids]) if ids else []
        return [AdapterRecord.from_json(r) for r in raws if r]

    async def finish_delete(self, rec: AdapterRecord) -> bool:
        """Forget the adapter; True if no adapter references its bytes any more."""
        blob = keys.blob(rec.sha256)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.adapter(rec.id))
            pipe.hdel(keys.USED, rec.id)
            pipe.hdel(keys.PLACED, rec.id)
            pipe.srem(keys.DELETING, rec.id)
            pipe.srem(blob, rec.id)
            pipe.scard(blob)
            *_, remaining = await pipe.execute()
        return bool(rec.sha256) and remaining == 0

    async def blob_referenced(self, sha256: str) -> bool:
        return bool(await self.r.scard(keys.blob(sha256)))

    async def invalidate_adapter(self, rec: AdapterRecord) -> None:
        message = messages.AdapterChanged(rec.tenant_id, rec.name)
        await self.r.publish(keys.INVALIDATE_CHANNEL, message.encode())

    # workers and routing

    async def put_worker(self, w: WorkerRecord) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(keys.worker(w.id), w.to_json())
            pipe.sadd(keys.WORKERS, w.id)
            pipe.incr(keys.ROUTING_VERSION)
            _, _, version = await pipe.execute()
        await self.r.publish(keys.ROUTING_CHANNEL, messages.encode_routing_version(version))

    @optimistic
    async def abandon_worker(self, seen: WorkerRecord) -> bool:
        """Mark a worker unhealthy and unowned, unless its record changed since `seen` was read
        (its agent registered again meanwhile). True if it was marked."""
        key = keys.worker(seen.id)
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or (now := WorkerRecord.from_json(raw)).updated_at != seen.updated_at or not now.healthy:
                return False
            pipe.multi()
            pipe.set(key, replace(now, healthy=False, owner="", updated_at=time.time()).to_json())
            pipe.incr(keys.ROUTING_VERSION)
            _, version = await pipe.execute()
        await self.r.publish(keys.ROUTING_CHANNEL, messages.encode_routing_version(version))
        return True

    async def list_workers(self) -> list[WorkerRecord]:
        return await queries.read_workers(self.r)

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        return next((w for w in await self.list_workers() if w.id == worker_id), None)

    async def routing_table(self) -> tuple[int, list[WorkerRecord]]:
        return await queries.routing_version(self.r), await self.list_workers()

    async def desire(self, worker_id: str, adapter_id: str, wanted: bool = True) -> int:
        """Change what the worker should hold; returns the worker's new desired-state generation,
        which the command carrying out the change bears."""
        async with self.r.pipeline(transaction=True) as pipe:
            if wanted:
                pipe.sadd(keys.desired(worker_id), adapter_id)
            else:
                pipe.srem(keys.desired(worker_id), adapter_id)
            pipe.incr(keys.generation(worker_id))
            _, generation = await pipe.execute()
        return int(generation)

    async def desired(self, worker_id: str) -> set[str]:
        return {str(a) for a in await self.r.smembers(keys.desired(worker_id))}

    async def put_activity(self, worker_id: str, activity: Activity, ttl_s: int) -> None:
        await self.r.set(keys.activity(worker_id), activity.to_json(), ex=ttl_s)

    async def activity(self, worker_ids: list[str]) -> dict[str, Activity]:
        """What other replicas' workers are busy with."""
        raws = await self.r.mget([keys.activity(w) for w in worker_ids]) if worker_ids else []
        return {wid: Activity.from_json(raw) for wid, raw in zip(worker_ids, raws, strict=True) if raw}

    async def epoch(self) -> tuple[str, bool]:
        """This Redis's data epoch, and whether this call made it: made by the first control
        plane to ask, and gone only when Redis lost its data (restarted without AOF, a wiped
        volume, FLUSHALL)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(keys.EPOCH, uuid.uuid4().hex, nx=True)
            pipe.get(keys.EPOCH)
            made, epoch = await pipe.execute()
        return str(epoch), bool(made)

    # pins and pools

    async def pin(self, rec: AdapterRecord, allowance: int) -> int | None:
        """Pin the adapter; the tenant's pins now, or None when its allowance is used up."""
        n = await self._pin(
            keys=[keys.tenant_pinned(rec.tenant_id), keys.PINNED, keys.adapter(rec.id)],
            args=[rec.id, rec.tenant_id, allowance],
        )
        if n == -2:
            raise NotFound(f"adapter {rec.id!r} does not exist")
        return None if n == -1 else int(n)

    async def unpin(self, rec: AdapterRecord) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.srem(keys.tenant_pinned(rec.tenant_id), rec.id)
            pipe.hdel(keys.PINNED, rec.id)
            await pipe.execute()

    async def pinned(self) -> dict[str, str]:
        """Every pinned adapter's id, with its tenant's."""
        return {str(a): str(t) for a, t in (await self.r.hgetall(keys.PINNED)).items()}

    async def tenant_pinned(self, tenant_id: str) -> list[str]:
        return sorted(str(a) for a in await self.r.smembers(keys.tenant_pinned(tenant_id)))

    async def pools(self) -> dict[str, str]:
        """Worker id -> the tenant whose dedicated pool it is in."""
        return {str(w): str(t) for w, t in (await self.r.hgetall(keys.POOLS)).items()}

    async def set_pool(self, worker: WorkerRecord, tenant_id: str) -> None:
        """Put the worker in the tenant's pool ("": shared again), as a new routing version."""
        async with self.r.pipeline(transaction=True) as pipe:
            if tenant_id:
                pipe.hset(keys.POOLS, worker.id, tenant_id)
            else:
                pipe.hdel(keys.POOLS, worker.id)
            pipe.set(keys.worker(worker.id), replace(worker, updated_at=time.time()).to_json())
            pipe.incr(keys.ROUTING_VERSION)
            *_, version = await pipe.execute()
        await self.r.publish(keys.ROUTING_CHANNEL, messages.encode_routing_version(version))

    async def lead(self, replica: str, ttl_s: int) -> bool:
        """Whether this replica keeps the pinned adapters loaded for the next `ttl_s` seconds:
        the first to ask, until it stops asking."""
        if await self.r.set(keys.PIN_KEEPER, replica, nx=True, ex=ttl_s):
            return True
        if await self.r.get(keys.PIN_KEEPER) == replica:
            await self.r.expire(keys.PIN_KEEPER, ttl_s)
            return True
        return False

    async def set_draining(self, worker_id: str, draining: bool) -> None:
        if draining:
            await self.r.sadd(keys.DRAINING, worker_id)
        else:
            await self.r.srem(keys.DRAINING, worker_id)
