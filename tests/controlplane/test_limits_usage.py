"""TenantService's rate limits (SetTenantLimits, the limits ListTenants shows) and usage export
(ExportUsage), on a real control plane against a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis

from controlplane.server import ControlPlane
from loraplane.controlplane.v1 import tenant_pb2 as pb
from loraplane.controlplane.v1 import tenant_pb2_grpc
from loraplane.state import keys, usage
from tests.controlplane.test_service import OPERATOR, start_control_plane
from tests.support import RedisServer

AUTH = (("authorization", f"Bearer {OPERATOR}"),)
SHARED = pb.RateLimits(rpm=600, tpm=400_000, concurrency=32)  # loraplane.limits.TIER_RATE_LIMITS
RESERVED = pb.RateLimits(rpm=3_000, tpm=2_000_000, concurrency=128)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await r.flushdb()
    yield r
    await r.aclose()


@pytest.fixture
async def plane(redis_server: RedisServer, client: redis.Redis, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await start_control_plane(redis_server.url, tmp_path)
    yield cp
    await cp.stop(0)


@pytest.fixture
async def tenants(plane: ControlPlane) -> AsyncIterator[tenant_pb2_grpc.TenantServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        yield tenant_pb2_grpc.TenantServiceStub(channel)


@pytest.fixture
async def invalidations(client: redis.Redis) -> AsyncIterator[redis.client.PubSub]:
    """A subscription to the channel data planes drop cached entries on."""
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.INVALIDATE_CHANNEL)
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
    yield pubsub
    await pubsub.aclose()


async def published(pubsub: redis.client.PubSub) -> list[str]:
    """What was published on the channel until it has been quiet for 0.2 s."""
    out = []
    while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
        out.append(message["data"])
    return out


async def create(stub: tenant_pb2_grpc.TenantServiceStub, name: str, tier: pb.Tier = pb.TIER_SHARED) -> pb.Tenant:
    resp: pb.CreateTenantResponse = await stub.CreateTenant(
        pb.CreateTenantRequest(name=name, tier=tier), metadata=AUTH, timeout=5
    )
    return resp.tenant


async def set_limits(
    stub: tenant_pb2_grpc.TenantServiceStub,
    tenant_id: str,
    limits: pb.RateLimits | None = None,
    tier_default: bool = False,
) -> pb.Tenant:
    request = pb.SetTenantLimitsRequest(tenant_id=tenant_id, limits=limits, tier_default=tier_default)
    resp: pb.SetTenantLimitsResponse = await stub.SetTenantLimits(request, metadata=AUTH, timeout=5)
    return resp.tenant


async def test_a_tenant_has_its_tiers_limits_until_it_gets_its_own(
    tenants: tenant_pb2_grpc.TenantServiceStub, client: redis.Redis, invalidations: redis.client.PubSub
) -> None:
    tenant = await create(tenants, "limited")
    assert tenant.limits == SHARED and not tenant.own_limits
    assert await published(invalidations) == []  # a new tenant is in no data plane's cache

    own = pb.RateLimits(rpm=10, tpm=0, concurrency=2)  # tpm 0: unlimited
    changed = await set_limits(tenants, tenant.id, limits=own)
    assert changed.limits == own and changed.own_limits
    assert await published(invalidations) == [f"tenant:{tenant.id}"]
    stored = json.loads(str(await client.hget(keys.tenant(tenant.id), "limits")))
    assert stored == {"rpm": 10, "tpm": 0, "concurrency": 2}
    listed = (await tenants.ListTenants(pb.ListTenantsRequest(), metadata=AUTH, timeout=5)).tenants
    assert [(t.id, t.limits, t.own_limits) for t in listed] == [(tenant.id, own, True)]

    # Its own limits stay its own whatever its tier.
    tier = await tenants.SetTenantTier(
        pb.SetTenantTierRequest(tenant_id=tenant.id, tier=pb.TIER_RESERVED), metadata=AUTH, timeout=5
    )
    assert tier.tenant.limits == own and tier.tenant.own_limits
    assert await published(invalidations) == [f"tenant:{tenant.id}"]

    back = await set_limits(tenants, tenant.id, limits=pb.RateLimits(rpm=1), tier_default=True)
    assert back.limits == RESERVED and not back.own_limits  # tier_default wins over limits
    assert not await client.hexists(keys.tenant(tenant.id), "limits")
    assert await published(invalidations) == [f"tenant:{tenant.id}"]


async def test_a_tier_change_changes_the_limits_of_a_tenant_without_its_own(
    tenants: tenant_pb2_grpc.TenantServiceStub, invalidations: redis.client.PubSub
) -> None:
    tenant = await create(tenants, "grows", pb.TIER_SHARED)
    resp = await tenants.SetTenantTier(
        pb.SetTenantTierRequest(tenant_id=tenant.id, tier=pb.TIER_DEDICATED), metadata=AUTH, timeout=5
    )
    assert resp.tenant.limits == pb.RateLimits() and not resp.tenant.own_limits  # dedicated: unlimited
    assert await published(invalidations) == [f"tenant:{tenant.id}"]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.SetTenantLimitsRequest(tenant_id="TENANT", limits=pb.RateLimits(rpm=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SetTenantLimitsRequest(tenant_id="TENANT", limits=pb.RateLimits(tpm=-5)), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.SetTenantLimitsRequest(tenant_id="TENANT", limits=pb.RateLimits(concurrency=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.SetTenantLimitsRequest(tenant_id="ten_nobody", limits=pb.RateLimits(rpm=1)), grpc.StatusCode.NOT_FOUND),
        (pb.SetTenantLimitsRequest(tenant_id="ten_nobody", tier_default=True), grpc.StatusCode.NOT_FOUND),
        (pb.SetTenantLimitsRequest(limits=pb.RateLimits(rpm=1)), grpc.StatusCode.NOT_FOUND),
    ],
    ids=["rpm", "tpm", "concurrency", "unknown", "unknown-tier-default", "no-tenant"],
)
async def test_bad_limits_are_refused_and_change_nothing(
    tenants: tenant_pb2_grpc.TenantServiceStub,
    client: redis.Redis,
    invalidations: redis.client.PubSub,
    request_: pb.SetTenantLimitsRequest,
    code: grpc.StatusCode,
) -> None:
    tenant = await create(tenants, "careful")
    if request_.tenant_id == "TENANT":
        request_.tenant_id = tenant.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await tenants.SetTenantLimits(request_, metadata=AUTH, timeout=5)
    assert err.value.code() == code, err.value.details()
    assert not await client.hexists(keys.tenant(tenant.id), "limits")
    assert await published(invalidations) == []


async def test_limits_are_operator_calls(tenants: tenant_pb2_grpc.TenantServiceStub) -> None:
    tenant = await create(tenants, "guarded")
    key = (await tenants.CreateApiKey(pb.CreateApiKeyRequest(tenant_id=tenant.id), metadata=AUTH, timeout=5)).api_key
    calls = [
        (tenants.SetTenantLimits, pb.SetTenantLimitsRequest(tenant_id=tenant.id, limits=pb.RateLimits(rpm=1))),
        (tenants.ExportUsage, pb.ExportUsageRequest(start_time=0, end_time=60, bucket_width="1m")),
    ]
    for method, request in calls:
        for metadata in ((), (("authorization", f"Bearer {key}"),)):  # none, and the tenant's own key
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_tiers_limits_come_from_the_environment(redis_server: RedisServer, tmp_path: Path) -> None:
    cp = await start_control_plane(
        redis_server.url, tmp_path, LORAPLANE_TIER_SHARED_RPM="7", LORAPLANE_TIER_SHARED_CONCURRENCY="0"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.port}") as channel:
            tenant = await create(tenant_pb2_grpc.TenantServiceStub(channel), "from-env")
    finally:
        await cp.stop(0)
    assert tenant.limits == pb.RateLimits(rpm=7, tpm=SHARED.tpm, concurrency=0)


async def test_concurrent_changes_each_publish(
    tenants: tenant_pb2_grpc.TenantServiceStub, invalidations: redis.client.PubSub
) -> None:
    tenant = await create(tenants, "busy")
    answers = await asyncio.gather(*(set_limits(tenants, tenant.id, limits=pb.RateLimits(rpm=n)) for n in range(1, 6)))
    assert all(a.own_limits for a in answers)
    assert await published(invalidations) == [f"tenant:{tenant.id}"] * 5


HOUR = 1_764_486_000  # 2025-11-30T07:00:00Z


async def seed_usage(client: redis.Redis, *tenant_ids: str) -> None:
    """Usage as data planes record it: the first tenant in two hours (a base model, an adapter,
    embeddings), the second in the first hour."""
    first, second = tenant_ids
    cells = {
        usage.Cell(first, HOUR + 60, "completions", "tiny-llama", ""): usage.Counts(10, 5, 0, 1),
        usage.Cell(first, HOUR + 120, "completions", "tiny-llama", ""): usage.Counts(20, 7, 4, 2),
        usage.Cell(first, HOUR + 120, "completions", "tiny-llama:v1", "adp_1"): usage.Counts(300, 40, 100, 3),
        usage.Cell(first, HOUR + 3600, "completions", "tiny-llama:v1", "adp_1"): usage.Counts(1, 1, 0, 1),
        usage.Cell(first, HOUR + 3660, "embeddings", "tiny-embed", ""): usage.Counts(50, 0, 0, 5),
        usage.Cell(second, HOUR + 1800, "completions", "tiny-llama", ""): usage.Counts(8, 8, 0, 1),
    }
    assert await usage.record(client, "seed", cells, usage.Retention(0, 0, 0))  # kept: these hours are long gone


def row(tenant_id: str, kind: str, start: int, model: str, adapter_id: str, *counts: int) -> pb.UsageRow:
    i, o, c, n = counts
    return pb.UsageRow(
        tenant_id=tenant_id, kind=kind, start_time=start, end_time=start + 3600, model=model, adapter_id=adapter_id,
        input_tokens=i, output_tokens=o, input_cached_tokens=c, num_model_requests=n,
    )  # fmt: skip


async def export(stub: tenant_pb2_grpc.TenantServiceStub, **request: object) -> pb.ExportUsageResponse:
    resp: pb.ExportUsageResponse = await stub.ExportUsage(
        pb.ExportUsageRequest(**request),  # type: ignore[arg-type]
        metadata=AUTH,
        timeout=5,
    )
    return resp


async def test_usage_is_exported_per_bucket_tenant_kind_model_and_adapter(
    tenants: tenant_pb2_grpc.TenantServiceStub, client: redis.Redis
) -> None:
    a, b = (await create(tenants, "usage-a")).id, (await create(tenants, "usage-b")).id
    await seed_usage(client, a, b)
    later = HOUR + 3600
    everyone = [
        row(a, "completions", HOUR, "tiny-llama", "", 30, 12, 4, 3),
        row(a, "completions", HOUR, "tiny-llama:v1", "adp_1", 300, 40, 100, 3),
        row(b, "completions", HOUR, "tiny-llama", "", 8, 8, 0, 1),
        row(a, "completions", later, "tiny-llama:v1", "adp_1", 1, 1, 0, 1),
        row(a, "embeddings", later, "tiny-embed", "", 50, 0, 0, 5),
    ]
    everyone.sort(key=lambda r: (r.start_time, r.tenant_id, r.kind, r.model, r.adapter_id))
    # From the middle of a bucket: the whole bucket; until the end of the range (exclusive).
    resp = await export(tenants, start_time=HOUR + 59, end_time=HOUR + 7200, bucket_width="1h")
    assert list(resp.rows) == everyone and resp.next_page_token == ""

    only_a = await export(tenants, start_time=HOUR, end_time=HOUR + 7200, bucket_width="1h", tenant_id=a)
    assert list(only_a.rows) == [r for r in everyone if r.tenant_id == a]
    daily = await export(tenants, start_time=HOUR, end_time=HOUR + 7200, tenant_id=b)  # bucket_width: 1d
    day = HOUR - 7 * 3600
    assert [(r.start_time, r.end_time, r.input_tokens) for r in daily.rows] == [(day, day + 86400, 8)]
    minutes = await export(tenants, start_time=HOUR, end_time=HOUR + 180, bucket_width="1m", tenant_id=a)
    assert [(r.start_time, r.model, r.input_tokens) for r in minutes.rows] == [
        (HOUR + 60, "tiny-llama", 10), (HOUR + 120, "tiny-llama", 20), (HOUR + 120, "tiny-llama:v1", 300),
    ]  # fmt: skip
    none = await export(tenants, start_time=HOUR - 7200, end_time=HOUR, bucket_width="1h")
    assert list(none.rows) == [] and none.next_page_token == ""

    pages, token = [], ""
    while True:
        page = await export(
            tenants, start_time=HOUR, end_time=HOUR + 7200, bucket_width="1h", page_size=2, page_token=token
        )
        pages.append(list(page.rows))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1] and [r for p in pages for r in p] == everyone


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ({"bucket_width": "1w"}, grpc.StatusCode.INVALID_ARGUMENT, "bucket_width must be one of 1m, 1h, 1d"),
        ({"start_time": 0}, grpc.StatusCode.INVALID_ARGUMENT, "start_time (0) must be after 0"),
        ({"end_time": HOUR}, grpc.StatusCode.INVALID_ARGUMENT, "before end_time"),
        ({"start_time": HOUR + 1, "end_time": HOUR}, grpc.StatusCode.INVALID_ARGUMENT, "before end_time"),
        ({"start_time": 1, "bucket_width": "1m"}, grpc.StatusCode.INVALID_ARGUMENT, "more than 10000 buckets of 1m"),
        ({"page_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, "page_size must be"),
        ({"page_size": 10_001}, grpc.StatusCode.INVALID_ARGUMENT, "page_size must be"),
        ({"page_token": "not-a-token"}, grpc.StatusCode.INVALID_ARGUMENT, "page is not a page token"),
        ({"tenant_id": "ten_nobody"}, grpc.StatusCode.NOT_FOUND, "ten_nobody"),
    ],
)
async def test_a_bad_export_is_refused(
    tenants: tenant_pb2_grpc.TenantServiceStub, request_: dict[str, object], code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await export(tenants, **({"start_time": HOUR, "end_time": HOUR + 3600} | request_))
    assert err.value.code() == code and message in (err.value.details() or ""), err.value.details()
