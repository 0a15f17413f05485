"""The Redis state layer. The control plane is its only writer.

Keys (prefix `lp:`; tenants and keys: see `controlplane/tenantstore.py`):
    adapter:<aid>           string JSON record (status pending | ready | failed | deleting)
    tenant:<tid>:adapters   hash   name -> aid of live (pending or ready) adapters: names and quota
    tenant:<tid>:ids        zset   aid -> created_at of every adapter the tenant sees (+ failed)
    blob:<sha256>           set    ids of the adapters whose bytes are that blob
    pending                 set    ids of adapters whose bytes are still being fetched
    deleting                set    ids being deleted (eviction and garbage collection pending)
    worker:<wid>            string JSON record (endpoint, base model, resident adapter ids)
    workers                 set    worker ids
    draining                set    ids of workers that take no new placements
    desired:<wid>           set    adapter ids the worker should hold; its owner converges it to that
    generation:<wid>        int    bumped with every change of desired:<wid>; commands carry it
    routing:version         int    bumped on every routing change; published on `lp:routing`
    activity:<wid>          string JSON {busy, in_flight} from the worker's last heartbeats (expires)
    used                    hash   aid -> when a request last used it (data planes write it each second)
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import ParamSpec, TypeVar

import redis.asyncio as redis

from controlplane.errors import AlreadyExists, QuotaExceeded
from controlplane.tenantstore import TenantStore

P = "lp:"
ROUTING_CHANNEL = P + "routing"
# Messages "adapter:<tenant id>:<name>" and "key:<key hash>": drop cached entries now.
INVALIDATE_CHANNEL = P + "invalidate"
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


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    tenant_id: str
    name: str
    base_model: str
    status: str
    status_reason: str
    source: dict[str, str]
    rank: int
    target_modules: list[str]
    lora_alpha: float
    size_bytes: int
    sha256: str
    created_at: float
    adapter_config: str  # the clean adapter_config.json workers get
    placement_error: str = ""  # why the last placement failed on every worker tried
    placement_failed_at: float = 0.0

    @property
    def vllm_name(self) -> str:
        return self.id

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> AdapterRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    base_model: str
    endpoint: str
    max_adapters: int
    resident: list[str] = field(default_factory=list)
    healthy: bool = True
    updated_at: float = 0.0
    draining: bool = False  # read from the `draining` set, never from the record
    owner: str = ""  # address of the control plane replica holding the agent's stream

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        return cls(**json.loads(raw))


class Store:
    """Over a client made with decode_responses=True."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.tenants = TenantStore(client)
        self._create_adapter = client.register_script(CREATE_ADAPTER)

    # adapters

    async def create_adapter(self, rec: AdapterRecord, max_adapters: int) -> None:
        res = await self._create_adapter(
            keys=[
                f"{P}tenant:{rec.tenant_id}:adapters",
                f"{P}adapter:{rec.id}",
                f"{P}tenant:{rec.tenant_id}:ids",
                f"{P}blob:{rec.sha256}",
                P + "pending",
            ],
            args=[rec.name, rec.id, rec.to_json(), max_adapters, rec.created_at, rec.sha256],
        )
        if res == -1:
            raise AlreadyExists(f"an adapter named {rec.name!r} already exists")
        if res == -2:
            raise QuotaExceeded(f"the tenant's tier allows at most {max_adapters} adapters")

    async def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        raw = await self.r.get(f"{P}adapter:{adapter_id}")
        return AdapterRecord.from_json(raw) if raw else None

    async def list_adapters(self, tenant_id: str) -> list[AdapterRecord]:
        ids = await self.r.zrevrange(f"{P}tenant:{tenant_id}:ids", 0, -1)
        if not ids:
            return []
        raws = await self.r.mget([P + "adapter:" + str(i) for i in ids])
        return [AdapterRecord.from_json(r) for r in raws if r]

    @optimistic
    async def complete_adapter(self, done: AdapterRecord) -> bool:
        """pending -> ready, with its bytes; False if the adapter was deleted meanwhile."""
        key = f"{P}adapter:{done.id}"
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or AdapterRecord.from_json(raw).status != "pending":
                await self.r.srem(P + "pending", done.id)
                return False
            pipe.multi()
            pipe.set(key, done.to_json())
            pipe.sadd(f"{P}blob:{done.sha256}", done.id)
            pipe.srem(P + "pending", done.id)
            await pipe.execute()
        await self.invalidate_adapter(done)
        return True

    @optimistic
    async def fail_adapter(self, adapter_id: str, reason: str) -> None:
        """pending -> failed: still visible with its reason; its name and quota are free again."""
        key = f"{P}adapter:{adapter_id}"
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            rec = AdapterRecord.from_json(raw) if raw else None
            pipe.multi()
            pipe.srem(P + "pending", adapter_id)
            if rec is None or rec.status != "pending":
                await pipe.execute()
                return
            pipe.set(key, replace(rec, status="failed", status_reason=reason).to_json(), ex=FAILED_TTL_S)
            pipe.hdel(f"{P}tenant:{rec.tenant_id}:adapters", rec.name)
            await pipe.execute()

    @optimistic
    async def set_placement_error(self, adapter_id: str, reason: str, at: float) -> None:
        """Record (or, with reason "", clear) why the adapter could not be placed."""
        key = f"{P}adapter:{adapter_id}"
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or (rec := AdapterRecord.from_json(raw)).status != "ready":
                return
            pipe.multi()
            pipe.set(key, replace(rec, placement_error=reason, placement_failed_at=at if reason else 0.0).to_json())
            await pipe.execute()

    async def touch(self, adapter_id: str, at: float) -> None:
        await self.r.hset(P + "used", adapter_id, at)

    async def last_used(self, adapter_ids: list[str]) -> dict[str, float]:
        if not adapter_ids:
            return {}
        values = await self.r.hmget(P + "used", adapter_ids)
        return {a: float(v) for a, v in zip(adapter_ids, values, strict=True) if v}

    @optimistic
    async def mark_deleting(self, rec: AdapterRecord) -> None:
        """The adapter is gone for its tenant at once (name, quota, lists); eviction and
        garbage collection follow. Idempotent."""
        names = f"{P}tenant:{rec.tenant_id}:adapters"
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(names)
            owner = await pipe.hget(names, rec.name)
            pipe.multi()
            if owner == rec.id:
                pipe.hdel(names, rec.name)
            pipe.set(f"{P}adapter:{rec.id}", replace(rec, status="deleting").to_json())
            pipe.zrem(f"{P}tenant:{rec.tenant_id}:ids", rec.id)
            pipe.sadd(P + "deleting", rec.id)
            await pipe.execute()
        await self.invalidate_adapter(rec)

    async def deleting(self) -> list[AdapterRecord]:
        return await self._members(P + "deleting")

    async def pending(self) -> list[AdapterRecord]:
        return await self._members(P + "pending")

    async def _members(self, key: str) -> list[AdapterRecord]:
        ids = sorted(await self.r.smembers(key))
        raws = await self.r.mget([P + "adapter:" + str(i) for i in ids]) if ids else []
        return [AdapterRecord.from_json(r) for r in raws if r]

    async def finish_delete(self, rec: AdapterRecord) -> bool:
        """Forget the adapter; True if no adapter references its bytes any more."""
        blob = f"{P}blob:{rec.sha256}"
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(f"{P}adapter:{rec.id}")
            pipe.hdel(P + "used", rec.id)
            pipe.srem(P + "deleting", rec.id)
            pipe.srem(blob, rec.id)
            pipe.scard(blob)
            *_, remaining = await pipe.execute()
        return bool(rec.sha256) and remaining == 0

    async def blob_referenced(self, sha256: str) -> bool:
        return bool(await self.r.scard(f"{P}blob:{sha256}"))

    async def invalidate_adapter(self, rec: AdapterRecord) -> None:
        await self.r.publish(INVALIDATE_CHANNEL, f"adapter:{rec.tenant_id}:{rec.name}")

    # workers and routing

    async def put_worker(self, w: WorkerRecord) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(f"{P}worker:{w.id}", w.to_json())
            pipe.sadd(P + "workers", w.id)
            pipe.incr(P + "routing:version")
            _, _, version = await pipe.execute()
        await self.r.publish(ROUTING_CHANNEL, str(version))

    @optimistic
    async def abandon_worker(self, seen: WorkerRecord) -> bool:
        """Mark a worker unhealthy and unowned, unless its record changed since `seen` was read
        (its agent registered again meanwhile). True if it was marked."""
        key = f"{P}worker:{seen.id}"
        async with self.r.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if not raw or (now := WorkerRecord.from_json(raw)).updated_at != seen.updated_at or not now.healthy:
                return False
            pipe.multi()
            pipe.set(key, replace(now, healthy=False, owner="", updated_at=time.time()).to_json())
            pipe.incr(P + "routing:version")
            _, version = await pipe.execute()
        await self.r.publish(ROUTING_CHANNEL, str(version))
        return True

    async def list_workers(self) -> list[WorkerRecord]:
        return await read_workers(self.r)

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        return next((w for w in await self.list_workers() if w.id == worker_id), None)

    async def routing_table(self) -> tuple[int, list[WorkerRecord]]:
        version = int(await self.r.get(P + "routing:version") or 0)
        return version, await self.list_workers()

    async def desire(self, worker_id: str, adapter_id: str, wanted: bool = True) -> int:
        """Change what the worker should hold; returns the worker's new desired-state generation,
        which the command carrying out the change bears."""
        async with self.r.pipeline(transaction=True) as pipe:
            if wanted:
                pipe.sadd(f"{P}desired:{worker_id}", adapter_id)
            else:
                pipe.srem(f"{P}desired:{worker_id}", adapter_id)
            pipe.incr(f"{P}generation:{worker_id}")
            _, generation = await pipe.execute()
        return int(generation)

    async def desired(self, worker_id: str) -> set[str]:
        return {str(a) for a in await self.r.smembers(f"{P}desired:{worker_id}")}

    async def put_activity(self, worker_id: str, busy: frozenset[str], in_flight: int, ttl_s: int = 30) -> None:
        value = json.dumps({"busy": sorted(busy), "in_flight": in_flight})
        await self.r.set(f"{P}activity:{worker_id}", value, ex=ttl_s)

    async def activity(self, worker_ids: list[str]) -> dict[str, tuple[frozenset[str], int]]:
        """What other replicas' workers are busy with: adapters with requests in flight, requests."""
        raws = await self.r.mget([f"{P}activity:{w}" for w in worker_ids]) if worker_ids else []
        out = {}
        for wid, raw in zip(worker_ids, raws, strict=True):
            if raw:
                a = json.loads(raw)
                out[wid] = (frozenset(a["busy"]), int(a["in_flight"]))
        return out

    async def epoch(self) -> tuple[str, bool]:
        """This Redis's data epoch, and whether this call made it: made by the first control
        plane to ask, and gone only when Redis lost its data (restarted without AOF, a wiped
        volume, FLUSHALL)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(P + "epoch", uuid.uuid4().hex, nx=True)
            pipe.get(P + "epoch")
            made, epoch = await pipe.execute()
        return str(epoch), bool(made)

    async def set_draining(self, worker_id: str, draining: bool) -> None:
        if draining:
            await self.r.sadd(P + "draining", worker_id)
        else:
            await self.r.srem(P + "draining", worker_id)


async def read_workers(client: redis.Redis) -> list[WorkerRecord]:
    async with client.pipeline(transaction=False) as pipe:
        pipe.smembers(P + "workers")
        pipe.smembers(P + "draining")
        ids, draining = await pipe.execute()
    if not ids:
        return []
    raws = await client.mget([P + "worker:" + str(i) for i in sorted(ids)])
    records = [WorkerRecord.from_json(r) for r in raws if r]
    return [replace(w, draining=w.id in draining) for w in records]
