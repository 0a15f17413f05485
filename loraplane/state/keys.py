"""Every Redis key and channel of loraplane, and who writes it.

Keys are built only here; `SCHEMA` lists them with their type and their one writer (the table in
docs/architecture.md is checked against it by tests/test_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "lp:"


@dataclass(frozen=True)
class Key:
    pattern: str  # without PREFIX; <x> marks a part of the name
    type: str  # the Redis type
    writer: str  # the one component that writes it
    holds: str


CONTROL_PLANE = "control plane"
DATA_PLANE = "data plane"

SCHEMA = (
    Key("adapter:<aid>", "string", CONTROL_PLANE, "JSON `AdapterRecord` (status: pending, ready, failed or deleting)"),
    Key(
        "tenant:<tid>:adapters", "hash", CONTROL_PLANE, "name -> aid of live (pending or ready) adapters: names, quota"
    ),
    Key("tenant:<tid>:ids", "zset", CONTROL_PLANE, "aid -> created_at of every adapter the tenant sees (+ failed)"),
    Key("blob:<sha256>", "set", CONTROL_PLANE, "ids of the adapters whose bytes are that blob"),
    Key("pending", "set", CONTROL_PLANE, "ids of adapters whose bytes are still being fetched"),
    Key("deleting", "set", CONTROL_PLANE, "ids being deleted (eviction and garbage collection pending)"),
    Key("worker:<wid>", "string", CONTROL_PLANE, "JSON `WorkerRecord` (endpoint, base model, resident adapter ids)"),
    Key("workers", "set", CONTROL_PLANE, "worker ids"),
    Key("draining", "set", CONTROL_PLANE, "ids of workers that take no new placements"),
    Key("pools", "hash", CONTROL_PLANE, "worker id -> the tenant whose dedicated pool it is in"),
    Key("pinned", "hash", CONTROL_PLANE, "aid -> tenant id of every pinned adapter (never evicted for room)"),
    Key("tenant:<tid>:pinned", "set", CONTROL_PLANE, "ids of the tenant's pinned adapters (its allowance)"),
    Key("pinkeeper", "string", CONTROL_PLANE, "the replica keeping pinned adapters loaded this round (expires)"),
    Key("desired:<wid>", "set", CONTROL_PLANE, "adapter ids the worker should hold; its owner converges it"),
    Key("generation:<wid>", "int", CONTROL_PLANE, "bumped with every change of desired:<wid>; commands carry it"),
    Key("routing:version", "int", CONTROL_PLANE, "bumped on every routing change; published on `lp:routing`"),
    Key("activity:<wid>", "string", CONTROL_PLANE, "JSON `Activity` from the worker's last heartbeats (expires)"),
    Key("placed", "hash", CONTROL_PLANE, "aid -> when a placement last asked for it"),
    Key("used", "hash", DATA_PLANE, "aid -> when a request last used it (each data plane, once a second)"),
    Key("epoch", "string", CONTROL_PLANE, "this Redis's data epoch: made once, gone only if Redis lost its data"),
    Key(
        "tenant:<tid>",
        "hash",
        CONTROL_PLANE,
        "`Tenant`: id, name, tier, created_at, suspended, own limits (JSON), pinned_slots, spill",
    ),
    Key("tenants", "hash", CONTROL_PLANE, "name -> tid"),
    Key("apikey:<sha256(key)>", "hash", CONTROL_PLANE, "`ApiKey`: tenant_id, prefix, created_at (keys only hashed)"),
    Key("keyprefix:<prefix>", "string", CONTROL_PLANE, "sha256(key), to revoke a key by its public prefix"),
    Key("tenant:<tid>:keys", "set", CONTROL_PLANE, "the tenant's key prefixes"),
    Key(
        "usage:<tid>:<kind>:<width>:<start>",
        "hash",
        DATA_PLANE,
        "a usage bucket: `<model>\\t<aid>` -> `<input> <output> <cached> <requests>` tokens (expires)",
    ),
    Key("usage:tenants:<width>:<start>", "set", DATA_PLANE, "tenants with usage in that hour or day (expires)"),
    Key("usage:batch:<id>", "string", DATA_PLANE, "a usage batch applied: each is counted once (expires in 24 h)"),
    Key("ratelimit:<tid>:<dimension>", "hash", DATA_PLANE, "a per-minute limit's token bucket: level, at (expires)"),
    Key("ratelimit:<tid>:slots", "hash", DATA_PLANE, "data plane replica -> concurrency slots it holds"),
    Key("dataplane:<replica>", "string", DATA_PLANE, "a data plane replica's beat, for its slots (expires)"),
    Key("dataplanes", "zset", DATA_PLANE, "replica -> its last beat (unix s): the live replicas share each worker"),
)

# Channels (published by the control plane; see `messages`).
ROUTING_CHANNEL = PREFIX + "routing"  # routing table versions
INVALIDATE_CHANNEL = PREFIX + "invalidate"  # cached entries to drop now

PENDING = PREFIX + "pending"
DELETING = PREFIX + "deleting"
WORKERS = PREFIX + "workers"
DRAINING = PREFIX + "draining"
POOLS = PREFIX + "pools"
PINNED = PREFIX + "pinned"
PIN_KEEPER = PREFIX + "pinkeeper"
ROUTING_VERSION = PREFIX + "routing:version"
PLACED = PREFIX + "placed"
USED = PREFIX + "used"
EPOCH = PREFIX + "epoch"
TENANTS = PREFIX + "tenants"
DATA_PLANES = PREFIX + "dataplanes"


def adapter(adapter_id: str) -> str:
    return PREFIX + "adapter:" + adapter_id


def tenant_adapters(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}:adapters"


def tenant_ids(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}:ids"


def blob(sha256: str) -> str:
    return PREFIX + "blob:" + sha256


def worker(worker_id: str) -> str:
    return PREFIX + "worker:" + worker_id


def desired(worker_id: str) -> str:
    return PREFIX + "desired:" + worker_id


def generation(worker_id: str) -> str:
    return PREFIX + "generation:" + worker_id


def activity(worker_id: str) -> str:
    return PREFIX + "activity:" + worker_id


def tenant(tenant_id: str) -> str:
    return PREFIX + "tenant:" + tenant_id


def tenant_pinned(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}:pinned"


def tenant_keys(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}:keys"


def apikey(key_hash: str) -> str:
    return PREFIX + "apikey:" + key_hash


def keyprefix(prefix: str) -> str:
    return PREFIX + "keyprefix:" + prefix


def rate_bucket(tenant_id: str, dimension: str) -> str:
    return f"{PREFIX}ratelimit:{tenant_id}:{dimension}"


def rate_slots(tenant_id: str) -> str:
    return f"{PREFIX}ratelimit:{tenant_id}:slots"


def data_plane_beat(replica: str) -> str:
    return PREFIX + "dataplane:" + replica


def usage_bucket(tenant_id: str, kind: str, width: str, start: int) -> str:
    return f"{PREFIX}usage:{tenant_id}:{kind}:{width}:{start}"


def usage_tenants(width: str, start: int) -> str:
    return f"{PREFIX}usage:tenants:{width}:{start}"


def usage_batch(batch_id: str) -> str:
    return PREFIX + "usage:batch:" + batch_id
