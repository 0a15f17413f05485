"""The reads that more than one component makes, and the data plane's one write.

Over clients made with decode_responses=True.
"""

from __future__ import annotations

from dataclasses import replace

import redis.asyncio as redis

from loraplane.state import keys
from loraplane.state.records import AdapterRecord, Tenant, WorkerRecord


async def read_workers(client: redis.Redis) -> list[WorkerRecord]:
    """Every worker record, with `draining` from the draining set and `pool` from the pools hash."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.smembers(keys.WORKERS)
        pipe.smembers(keys.DRAINING)
        pipe.hgetall(keys.POOLS)
        ids, draining, pools = await pipe.execute()
    records = await _workers(client, ids)
    return [replace(w, draining=w.id in draining, pool=str(pools.get(w.id, ""))) for w in records]


async def routing_version(client: redis.Redis) -> int:
    return int(await client.get(keys.ROUTING_VERSION) or 0)


async def routing_table(client: redis.Redis, known_version: int) -> tuple[int, list[WorkerRecord] | None]:
    """The routing version and, unless it is `known_version`, the worker records of that version
    (with `pool`: a pool's change bumps the version too)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(keys.ROUTING_VERSION)
        pipe.smembers(keys.WORKERS)
        pipe.hgetall(keys.POOLS)
        raw_version, ids, pools = await pipe.execute()
    version = int(raw_version or 0)
    if version == known_version:
        return version, None
    return version, [replace(w, pool=str(pools.get(w.id, ""))) for w in await _workers(client, ids)]


async def _workers(client: redis.Redis, ids: set[str]) -> list[WorkerRecord]:
    if not ids:
        return []
    raws = await client.mget([keys.worker(str(i)) for i in sorted(ids)])
    return [WorkerRecord.from_json(r) for r in raws if r]


async def key_tenant(client: redis.Redis, key_hash: str) -> Tenant | None:
    """The tenant the key belongs to (None: no such key, or no such tenant)."""
    tenant_id = await client.hget(keys.apikey(key_hash), "tenant_id")
    if tenant_id is None:
        return None
    h = await client.hgetall(keys.tenant(str(tenant_id)))
    return Tenant.from_hash(h) if h else None


async def adapter_named(client: redis.Redis, tenant_id: str, name: str) -> AdapterRecord | None:
    """The tenant's live adapter of that name."""
    adapter_id = await client.hget(keys.tenant_adapters(tenant_id), name)
    raw = await client.get(keys.adapter(str(adapter_id))) if adapter_id else None
    return AdapterRecord.from_json(raw) if raw else None


async def record_use(client: redis.Redis, used: dict[str, float]) -> None:
    """When each adapter was last asked for by a request (the data plane's write)."""
    await client.hset(keys.USED, mapping=used)  # type: ignore[arg-type]
