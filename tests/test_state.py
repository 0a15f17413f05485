"""The shared state's contract: keys built only in `loraplane/state`, each in the schema with one
writer and in docs/architecture.md's table; records and messages that read back what was written;
the data plane and the control plane agreeing through a real Redis."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from controlplane.keys import key_hash, key_prefix, new_api_key
from controlplane.store import Store
from dataplane.auth import KeyCache
from dataplane.breaker import Breaker
from dataplane.errors import Forbidden, NotFound
from dataplane.resolve import Resolver
from dataplane.routing import RoutingTable
from loraplane.catalog import BaseModel, Catalog
from loraplane.state import client as state_client
from loraplane.state import keys, messages, queries
from loraplane.state.records import Activity, AdapterRecord, ApiKey, Tenant, WorkerRecord
from tests.support import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("controlplane", "dataplane", "workeragent", "loraplane", "bench", "scripts", "tests")
# A Redis key or channel written out: "lp:…" in any quoting, outside loraplane/state.
KEY_LITERAL = re.compile(r"""[rbf]?["']lp:""")


def test_no_module_outside_the_state_package_writes_a_key_or_channel_name() -> None:
    here = Path(__file__).resolve()
    found = []
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            if path == here or (ROOT / "loraplane" / "state") in path.parents:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_LITERAL.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


def builders() -> dict[str, str]:
    """Every key builder in `keys`, called with its parameter's name as a placeholder."""
    built = {}
    for name, func in inspect.getmembers(keys, inspect.isfunction):
        if func.__module__ == keys.__name__:
            params = list(inspect.signature(func).parameters)
            built[name] = func(*(f"<{p}>" for p in params))
    return built


def test_every_key_is_in_the_schema_with_one_writer() -> None:
    patterns = {k.pattern for k in keys.SCHEMA}
    assert len(patterns) == len(keys.SCHEMA), "a key is listed twice"
    shape = {re.sub(r"<[^>]+>", "<>", p) for p in patterns}
    constants = [v for n, v in vars(keys).items() if n.isupper() and isinstance(v, str) and v != keys.PREFIX]
    constants = [v for v in constants if v.startswith(keys.PREFIX)]
    channels = {keys.ROUTING_CHANNEL, keys.INVALIDATE_CHANNEL}
    for built in [*builders().values(), *constants]:
        if built in channels:
            continue
        assert built.startswith(keys.PREFIX)
        assert re.sub(r"<[^>]+>", "<>", built.removeprefix(keys.PREFIX)) in shape, f"{built} is not in SCHEMA"
    assert {k.writer for k in keys.SCHEMA} <= {keys.CONTROL_PLANE, keys.DATA_PLANE}


def test_the_architecture_doc_lists_every_key_with_its_writer() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for k in keys.SCHEMA:
        assert f"| `{k.pattern}` | {k.type} | {k.writer} | {k.holds} |" in doc, k.pattern
    for channel in (keys.ROUTING_CHANNEL, keys.INVALIDATE_CHANNEL):
        assert f"| `{channel}` |" in doc


def adapter(tenant_id: str = "ten_a", name: str = "v1", status: str = "ready") -> AdapterRecord:
    return AdapterRecord(
        id="adp_" + name, tenant_id=tenant_id, name=name, base_model="tiny-llama", status=status, status_reason="",
        source={"kind": "upload"}, rank=8, target_modules=["q_proj"], lora_alpha=16.0, size_bytes=3,
        sha256="0" * 64, created_at=1.5, adapter_config="{}",
    )  # fmt: skip


def test_records_read_back_what_was_written() -> None:
    rec = adapter()
    assert AdapterRecord.from_json(rec.to_json()) == rec
    worker = WorkerRecord("w1", "tiny-llama", "http://w", 8, ["adp_v1"], healthy=False, updated_at=2.0, owner="cp")
    assert WorkerRecord.from_json(worker.to_json()) == worker
    newer = worker.to_json()[:-1] + ', "a_later_field": 1}'  # a newer writer's, mid rolling upgrade
    assert WorkerRecord.from_json(newer) == worker
    activity = Activity(frozenset({"adp_b", "adp_a"}), 3, owner="cp-1:50051")
    assert Activity.from_json(activity.to_json()) == activity
    assert Activity.from_json('{"busy": ["adp_a"], "in_flight": 1}') == Activity(frozenset({"adp_a"}), 1, owner="")
    key = ApiKey("lp_abcdefgh", "ten_a", 3.25)
    assert ApiKey.from_hash(key.to_hash()) == key
    tenant = {"id": "ten_a", "name": "acme", "tier": "shared", "created_at": "4.5", "suspended": "1"}
    assert Tenant.from_hash(tenant) == Tenant("ten_a", "acme", "shared", 4.5, suspended=True)


@pytest.mark.parametrize(
    "message", [messages.AdapterChanged("ten_a", "my:name.v3"), messages.KeyChanged("ab" * 32)], ids=repr
)
def test_invalidations_read_back_what_was_sent(message: messages.Invalidation) -> None:
    assert messages.decode_invalidation(message.encode()) == message


@pytest.mark.parametrize("raw", ["", "key:", "adapter:no-name", "routing:3", "something"])
def test_an_invalidation_this_version_does_not_know_is_ignored(raw: str) -> None:
    assert messages.decode_invalidation(raw) is None


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await c.flushdb()
    yield c
    await c.aclose()


async def test_the_data_plane_reads_what_the_control_plane_writes(client: redis.Redis) -> None:
    store = Store(client)
    key = new_api_key()
    await store.tenants.create(Tenant("ten_a", "acme", "shared", time.time()), key_hash(key), key_prefix(key))
    await store.create_adapter(adapter(), max_adapters=5)
    await store.create_adapter(adapter(name="later", status="pending"), max_adapters=5)
    await store.put_worker(WorkerRecord("w1", "tiny-llama", "http://w1", 8, ["adp_v1"], updated_at=time.time()))

    breaker = Breaker()
    auth = KeyCache(client, 30, breaker)
    base = BaseModel("tiny-llama", "chat", "/nowhere", lora=True, max_rank=64, max_adapters_per_worker=8)
    resolver = Resolver(client, Catalog({"tiny-llama": base}), 5, breaker)
    routing = RoutingTable(client)
    await routing.refresh()

    assert await auth.tenant_id(f"Bearer {key}") == "ten_a"
    assert (await resolver.resolve("ten_a", "tiny-llama:v1")).adapter_id == "adp_v1"
    for unseen in (("ten_a", "tiny-llama:later"), ("ten_b", "tiny-llama:v1")):  # pending; another tenant's
        with pytest.raises(NotFound):
            await resolver.resolve(*unseen)
    assert [(w.id, w.resident, w.healthy) for w in routing.workers] == [("w1", frozenset({"adp_v1"}), True)]
    assert routing.version == await queries.routing_version(client) > 0

    await store.tenants.set_suspended("ten_a", True)
    auth.invalidate(messages.KeyChanged(key_hash(key)))  # what the suspension published
    with pytest.raises(Forbidden):
        await auth.tenant_id(f"Bearer {key}")


async def test_recency_is_the_later_of_a_request_and_a_placement(client: redis.Redis) -> None:
    store = Store(client)
    await queries.record_use(client, {"adp_a": 10.0, "adp_b": 30.0})  # the data plane's write
    await store.touch("adp_a", 20.0)  # a placement's
    await store.touch("adp_c", 5.0)
    assert await store.last_used(["adp_a", "adp_b", "adp_c", "adp_d"]) == {"adp_a": 20.0, "adp_b": 30.0, "adp_c": 5.0}


async def test_a_burst_beyond_the_pool_waits_for_a_connection(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every component's client queues commands beyond its pool (redis-py's own pool raises
    MaxConnectionsError, which every component reads as Redis down)."""
    monkeypatch.setattr(state_client, "MAX_CONNECTIONS", 3)
    c = state_client.connect(redis_server.url, timeout_s=5)
    try:
        held = await asyncio.gather(*(c.blpop(["lp:test:never"], timeout=0.02) for _ in range(30)))  # each holds one
        assert held == [None] * 30
        assert len(c.connection_pool._available_connections) <= 3
    finally:
        await c.aclose()


async def test_a_burst_of_requests_with_an_uncached_key_asks_redis_once(client: redis.Redis) -> None:
    """After the caches were cleared (Redis flapped, a restart), 200 requests with one key cost
    one lookup, not 200 (which, with each its own connection, exhausted the pool)."""
    key = new_api_key()
    await Store(client).tenants.create(
        Tenant("ten_burst", "acme", "shared", time.time()), key_hash(key), key_prefix(key)
    )
    auth = KeyCache(client, 30, Breaker())
    await client.config_resetstat()
    tenants = await asyncio.gather(*(auth.tenant_id(f"Bearer {key}") for _ in range(200)))
    assert set(tenants) == {"ten_burst"}
    assert (await client.info("commandstats"))["cmdstat_hget"]["calls"] == 1
