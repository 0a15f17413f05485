from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis.asyncio as redis

from controlplane.errors import AlreadyExists, NotFound, QuotaExceeded
from controlplane.keys import key_hash, new_api_key, new_id
from controlplane.store import Store
from loraplane.state.records import AdapterRecord, Tenant
from tests.support import RedisServer


def record(tenant_id: str, name: str, sha: str = "0" * 64) -> AdapterRecord:
    return AdapterRecord(
        id=new_id("adp"), tenant_id=tenant_id, name=name, base_model="tiny-llama", status="ready",
        status_reason="", source={"kind": "upload"}, rank=8, target_modules=["q_proj"], lora_alpha=8.0,
        size_bytes=1, sha256=sha, created_at=time.time(), adapter_config="{}",
    )  # fmt: skip


async def test_keys_are_stored_only_as_hashes(store: Store, redis_server: RedisServer) -> None:
    key = new_api_key()
    tenant = Tenant(new_id("ten"), "acme", "shared", time.time())
    await store.tenants.create(tenant, key_hash(key), key[:11])
    assert await store.tenants.for_key(key_hash(key)) == tenant
    raw = redis.Redis.from_url(redis_server.url)
    names = await raw.keys("*")
    values = [await raw.dump(k) for k in names]
    await raw.aclose()
    everything = repr(names).encode() + b"".join(v for v in values if isinstance(v, bytes))
    assert len(everything) > 100 and key.encode() not in everything


async def test_tenant_names_are_unique(store: Store) -> None:
    await store.tenants.create(Tenant(new_id("ten"), "acme", "shared", 0.0), "a" * 64, "p")
    with pytest.raises(AlreadyExists):
        await store.tenants.create(Tenant(new_id("ten"), "acme", "shared", 0.0), "b" * 64, "p")


async def test_adapter_names_are_unique_per_tenant_only(store: Store) -> None:
    await store.create_adapter(record("ten_a", "v3"), 20)
    await store.create_adapter(record("ten_b", "v3"), 20)
    with pytest.raises(AlreadyExists):
        await store.create_adapter(record("ten_a", "v3"), 20)
    assert [a.name for a in await store.list_adapters("ten_a")] == ["v3"]


async def test_racing_creates_admit_exactly_the_quota(store: Store) -> None:
    results = await asyncio.gather(
        *(store.create_adapter(record("ten_q", f"n{i}"), 5) for i in range(30)), return_exceptions=True
    )
    assert sum(r is None for r in results) == 5
    assert all(isinstance(r, QuotaExceeded) for r in results if r is not None)
    assert len(await store.list_adapters("ten_q")) == 5


async def test_blob_references_follow_adapters(store: Store) -> None:
    rec = record("ten_a", "v1", sha="f" * 64)
    assert not await store.blob_referenced(rec.sha256)
    await store.create_adapter(rec, 20)
    assert await store.blob_referenced(rec.sha256)
    assert await store.get_adapter(rec.id) == dataclasses.replace(rec)


async def test_racing_pins_admit_exactly_the_allowance(store: Store) -> None:
    recs = [record("ten_a", f"p{i}") for i in range(10)]
    for r in recs:
        await store.create_adapter(r, 20)
    results = await asyncio.gather(*(store.pin(r, 3) for r in recs))
    assert sorted(n for n in results if n is not None) == [1, 2, 3]
    pinned = await store.tenant_pinned("ten_a")
    assert len(pinned) == 3 and set(await store.pinned()) == set(pinned)
    assert await store.pin(next(r for r in recs if r.id in pinned), 3) == 3  # pinned again: no other slot


async def test_a_pin_never_outlives_its_adapter(store: Store) -> None:
    first, second = record("ten_a", "first"), record("ten_a", "second")
    for r in (first, second):
        await store.create_adapter(r, 20)
    await store.pin(first, 2)
    await store.mark_deleting(first)
    assert await store.tenant_pinned("ten_a") == [] and await store.pinned() == {}
    await store.mark_deleting(second)
    with pytest.raises(NotFound):  # a pin that lost the race with the delete
        await store.pin(second, 2)
    assert await store.tenant_pinned("ten_a") == []
