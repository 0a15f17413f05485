"""Operator servicers: tenants and keys, workers and placements. Operator token only, except
ForceLoadAdapter and ForceEvictAdapter forwarded by another replica, which take the peer token."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from controlplane.errors import BadRequest, Context, FailedPrecondition, NotFound, grpc_errors
from controlplane.keys import key_hash, key_prefix, new_api_key, new_id
from controlplane.placer import Placer
from controlplane.service import Auth, timestamp
from controlplane.settings import Settings
from controlplane.store import Store
from controlplane.tenantstore import UNCHANGED
from loraplane.controlplane.v1 import admin_pb2 as adpb
from loraplane.controlplane.v1 import admin_pb2_grpc, tenant_pb2_grpc
from loraplane.controlplane.v1 import tenant_pb2 as tpb
from loraplane.limits import NAME, RateLimits
from loraplane.state import usage
from loraplane.state.records import AdapterRecord, Tenant

log = logging.getLogger(__name__)

TIERS = {tpb.TIER_SHARED: "shared", tpb.TIER_RESERVED: "reserved", tpb.TIER_DEDICATED: "dedicated"}
TIER_ENUM = {v: k for k, v in TIERS.items()}
PAGE_SIZE, MAX_PAGE_SIZE = 1000, 10_000  # usage rows a page (10,000 rows: ~1 MB)
MAX_BUCKETS = 10_000  # an export's range, in buckets of its width: each is a Redis round trip


def tier_name(tier: int) -> str:
    name = TIERS.get(tier)  # type: ignore[call-overload]
    if name is None:
        raise BadRequest("tier must be TIER_SHARED, TIER_RESERVED or TIER_DEDICATED")
    return str(name)


def rate_limits(message: tpb.RateLimits) -> RateLimits:
    if min(message.rpm, message.tpm, message.concurrency) < 0:
        raise BadRequest("rpm, tpm and concurrency must each be 0 (unlimited) or more")
    return RateLimits(rpm=message.rpm, tpm=message.tpm, concurrency=message.concurrency)


def usage_row(row: usage.Row) -> tpb.UsageRow:
    c = row.counts
    return tpb.UsageRow(
        tenant_id=row.tenant_id, kind=row.kind, start_time=row.start_time, end_time=row.end_time,
        model=row.model, adapter_id=row.adapter_id, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
        input_cached_tokens=c.cached_tokens, num_model_requests=c.requests,
    )  # fmt: skip


class TenantService(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, settings: Settings, store: Store, auth: Auth) -> None:
        self._settings = settings
        self._store = store
        self._tenants = store.tenants
        self._redis = store.r
        self._auth = auth

    async def _message(self, t: Tenant, pools: dict[str, str] | None = None) -> tpb.Tenant:
        """`pools`: worker id -> its pool's tenant, when the caller read them already."""
        limits = t.rate_limits(self._settings.tier_rate_limits)
        pools = await self._store.pools() if pools is None else pools
        pool = sorted(w for w, owner in pools.items() if owner == t.id)
        return tpb.Tenant(
            id=t.id,
            name=t.name,
            tier=TIER_ENUM[t.tier],
            max_adapters=self._settings.tier_limits[t.tier],
            created_at=timestamp(t.created_at),
            suspended=t.suspended,
            limits=tpb.RateLimits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency),
            own_limits=t.limits is not None,
            pinned_slots=t.pin_allowance(self._settings.tier_pinned_slots),
            own_pinned_slots=t.pinned_slots is not None,
            spill_over=t.spill,
            pool_worker_ids=pool,
            pinned_adapter_ids=await self._store.tenant_pinned(t.id),
        )

    async def _pins_fit(self, tenant: Tenant) -> None:
        """A tier or allowance change that would leave the tenant more pins than it allows is
        refused: the operator unpins first (pins are the tenant's choice, not ours to drop)."""
        pinned = await self._store.tenant_pinned(tenant.id)
        allowed = tenant.pin_allowance(self._settings.tier_pinned_slots)
        if len(pinned) > allowed:
            raise FailedPrecondition(
                f"the tenant has {len(pinned)} pinned adapter(s) and would be allowed {allowed}: "
                f"unpin {len(pinned) - allowed} first ({', '.join(sorted(pinned))})"
            )

    @grpc_errors
    async def CreateTenant(self, request: tpb.CreateTenantRequest, context: Context) -> tpb.CreateTenantResponse:
        self._auth.operator(context)
        if not NAME.match(request.name):
            raise BadRequest("tenant name must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
        tier = tier_name(request.tier or tpb.TIER_SHARED)
        tenant = Tenant(id=new_id("ten"), name=request.name, tier=tier, created_at=time.time())
        key = new_api_key()
        await self._tenants.create(tenant, key_hash(key), key_prefix(key))
        log.info("created tenant %s (%s)", tenant.id, tier)
        return tpb.CreateTenantResponse(tenant=await self._message(tenant), api_key=key)

    @grpc_errors
    async def ListTenants(self, request: tpb.ListTenantsRequest, context: Context) -> tpb.ListTenantsResponse:
        self._auth.operator(context)
        pools = await self._store.pools()
        return tpb.ListTenantsResponse(tenants=[await self._message(t, pools) for t in await self._tenants.all()])

    @grpc_errors
    async def SetTenantTier(self, request: tpb.SetTenantTierRequest, context: Context) -> tpb.SetTenantTierResponse:
        self._auth.operator(context)
        tier = tier_name(request.tier)
        pool = [w for w, owner in (await self._store.pools()).items() if owner == request.tenant_id]
        if pool and tier != "dedicated":
            raise FailedPrecondition(
                f"the tenant has {len(pool)} dedicated worker(s) ({', '.join(sorted(pool))}): unassign them first"
            )
        await self._pins_fit(replace(await self._tenants.require(request.tenant_id), tier=tier))
        tenant = await self._tenants.set_tier(request.tenant_id, tier)
        log.info("tenant %s is now %s", tenant.id, tenant.tier)
        return tpb.SetTenantTierResponse(tenant=await self._message(tenant))

    @grpc_errors
    async def SuspendTenant(self, request: tpb.SuspendTenantRequest, context: Context) -> tpb.SuspendTenantResponse:
        self._auth.operator(context)
        tenant = await self._tenants.set_suspended(request.tenant_id, True)
        log.info("tenant %s suspended", tenant.id)
        return tpb.SuspendTenantResponse(tenant=await self._message(tenant))

    @grpc_errors
    async def UnsuspendTenant(
        self, request: tpb.UnsuspendTenantRequest, context: Context
    ) -> tpb.UnsuspendTenantResponse:
        self._auth.operator(context)
        tenant = await self._tenants.set_suspended(request.tenant_id, False)
        log.info("tenant %s unsuspended", tenant.id)
        return tpb.UnsuspendTenantResponse(tenant=await self._message(tenant))

    @grpc_errors
    async def CreateApiKey(self, request: tpb.CreateApiKeyRequest, context: Context) -> tpb.CreateApiKeyResponse:
        self._auth.operator(context)
        await self._tenants.require(request.tenant_id)
        key = new_api_key()
        await self._tenants.add_key(request.tenant_id, key_hash(key), key_prefix(key))
        return tpb.CreateApiKeyResponse(api_key=key, key_prefix=key_prefix(key))

    @grpc_errors
    async def ListApiKeys(self, request: tpb.ListApiKeysRequest, context: Context) -> tpb.ListApiKeysResponse:
        self._auth.operator(context)
        await self._tenants.require(request.tenant_id)
        keys = await self._tenants.keys(request.tenant_id)
        return tpb.ListApiKeysResponse(
            keys=[
                tpb.ApiKey(key_prefix=k.prefix, tenant_id=k.tenant_id, created_at=timestamp(k.created_at)) for k in keys
            ]
        )

    @grpc_errors
    async def RevokeApiKey(self, request: tpb.RevokeApiKeyRequest, context: Context) -> tpb.RevokeApiKeyResponse:
        self._auth.operator(context)
        await self._tenants.revoke(request.key_prefix)
        log.info("revoked key %s", request.key_prefix)
        return tpb.RevokeApiKeyResponse(key_prefix=request.key_prefix)

    @grpc_errors
    async def SetTenantLimits(
        self, request: tpb.SetTenantLimitsRequest, context: Context
    ) -> tpb.SetTenantLimitsResponse:
        self._auth.operator(context)
        limits = None if request.tier_default else rate_limits(request.limits)
        tenant = await self._tenants.set_limits(request.tenant_id, limits)
        log.info("tenant %s rate limits: %s", tenant.id, limits or f"its tier's ({tenant.tier})")
        return tpb.SetTenantLimitsResponse(tenant=await self._message(tenant))

    @grpc_errors
    async def SetTenantCapacity(
        self, request: tpb.SetTenantCapacityRequest, context: Context
    ) -> tpb.SetTenantCapacityResponse:
        self._auth.operator(context)
        has_slots = request.HasField("pinned_slots")
        if has_slots and request.pinned_slots_tier_default:
            raise BadRequest("give pinned_slots or pinned_slots_tier_default, not both")
        if has_slots and request.pinned_slots < 0:
            raise BadRequest("pinned_slots must be 0 or more")
        slots = request.pinned_slots if has_slots else None if request.pinned_slots_tier_default else UNCHANGED
        spill = request.spill_over if request.HasField("spill_over") else None
        if slots != UNCHANGED:
            await self._pins_fit(replace(await self._tenants.require(request.tenant_id), pinned_slots=slots))
        tenant = await self._tenants.set_capacity(request.tenant_id, slots, spill)
        log.info("tenant %s capacity: pinned slots %s, spill-over %s", tenant.id,
                 tenant.pin_allowance(self._settings.tier_pinned_slots), tenant.spill)  # fmt: skip
        return tpb.SetTenantCapacityResponse(tenant=await self._message(tenant))

    @grpc_errors
    async def ExportUsage(self, request: tpb.ExportUsageRequest, context: Context) -> tpb.ExportUsageResponse:
        self._auth.operator(context)
        width = request.bucket_width or "1d"
        if width not in usage.WIDTHS:
            raise BadRequest(f"bucket_width must be one of {', '.join(usage.WIDTHS)}, not {width!r}")
        start, end = request.start_time, request.end_time or int(time.time())
        if not 0 < start < end:
            raise BadRequest(f"start_time ({start}) must be after 0 and before end_time ({end}), in Unix seconds")
        if (end - start) // usage.WIDTHS[width] > MAX_BUCKETS:
            raise BadRequest(f"the range spans more than {MAX_BUCKETS} buckets of {width}: ask for wider buckets")
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise BadRequest(f"page_size must be 0 (the default, {PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        if request.tenant_id:
            await self._tenants.require(request.tenant_id)
        try:
            rows, next_page = await usage.export(
                self._redis, start, end, width, tenant_id=request.tenant_id, page=request.page_token,
                page_size=request.page_size or PAGE_SIZE,
            )  # fmt: skip
        except usage.QueryError as err:  # a page token that is not one of this export's
            raise BadRequest(str(err)) from None
        return tpb.ExportUsageResponse(rows=[usage_row(r) for r in rows], next_page_token=next_page)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: Store, placer: Placer, auth: Auth, prefetch_workers: int = 2) -> None:
        self._store = store
        self._placer = placer
        self._auth = auth
        self._prefetch_workers = prefetch_workers

    @grpc_errors
    async def DrainWorker(self, request: adpb.DrainWorkerRequest, context: Context) -> adpb.DrainWorkerResponse:
        self._auth.operator(context)
        await self._placer.set_draining(request.worker_id, True)
        return adpb.DrainWorkerResponse(worker_id=request.worker_id)

    @grpc_errors
    async def UndrainWorker(self, request: adpb.UndrainWorkerRequest, context: Context) -> adpb.UndrainWorkerResponse:
        self._auth.operator(context)
        await self._placer.set_draining(request.worker_id, False)
        return adpb.UndrainWorkerResponse(worker_id=request.worker_id)

    @grpc_errors
    async def AssignWorker(self, request: adpb.AssignWorkerRequest, context: Context) -> adpb.AssignWorkerResponse:
        self._auth.operator(context)
        tenant = await self._store.tenants.require(request.tenant_id)
        if tenant.tier != "dedicated":
            raise FailedPrecondition(
                f"tenant {tenant.id} is in the {tenant.tier} tier: only a dedicated tenant has workers of its own "
                "(set its tier to dedicated first)"
            )
        owner = (await self._store.pools()).get(request.worker_id, "")
        if owner not in ("", tenant.id):
            raise FailedPrecondition(f"worker {request.worker_id!r} is in tenant {owner}'s pool: unassign it first")
        evicted = await self._placer.assign(request.worker_id, tenant.id)
        return adpb.AssignWorkerResponse(worker_id=request.worker_id, tenant_id=tenant.id, evicted_adapter_ids=evicted)

    @grpc_errors
    async def UnassignWorker(
        self, request: adpb.UnassignWorkerRequest, context: Context
    ) -> adpb.UnassignWorkerResponse:
        self._auth.operator(context)
        was = (await self._store.pools()).get(request.worker_id, "")
        await self._placer.assign(request.worker_id, "")
        return adpb.UnassignWorkerResponse(worker_id=request.worker_id, tenant_id=was)

    async def _ready(self, adapter_id: str) -> AdapterRecord:
        rec = await self._store.get_adapter(adapter_id)
        if rec is None or rec.status != "ready":
            raise NotFound(f"no ready adapter {adapter_id!r}")
        return rec

    @grpc_errors
    async def PrefetchAdapter(
        self, request: adpb.PrefetchAdapterRequest, context: Context
    ) -> adpb.PrefetchAdapterResponse:
        is_forwarded = self._auth.peer(context)
        rec = await self._ready(request.adapter_id)
        done = await self._placer.prefetch(
            rec, self._prefetch_workers, list(request.worker_ids) or None, forwarded=is_forwarded
        )
        return adpb.PrefetchAdapterResponse(worker_ids=done)

    @grpc_errors
    async def ForceLoadAdapter(
        self, request: adpb.ForceLoadAdapterRequest, context: Context
    ) -> adpb.ForceLoadAdapterResponse:
        is_forwarded = self._auth.peer(context)
        rec = await self._ready(request.adapter_id)
        placed = await self._placer.place(rec, worker_id=request.worker_id or None, forwarded=is_forwarded)
        return adpb.ForceLoadAdapterResponse(worker_id=placed.worker_id, already_loaded=placed.already_loaded)

    @grpc_errors
    async def ForceEvictAdapter(
        self, request: adpb.ForceEvictAdapterRequest, context: Context
    ) -> adpb.ForceEvictAdapterResponse:
        is_forwarded = self._auth.peer(context)
        evicted = await self._placer.evict_everywhere(
            request.adapter_id, worker_id=request.worker_id or None, forwarded=is_forwarded
        )
        return adpb.ForceEvictAdapterResponse(worker_ids=evicted)

    @grpc_errors
    async def GetRoutingTable(
        self, request: adpb.GetRoutingTableRequest, context: Context
    ) -> adpb.GetRoutingTableResponse:
        self._auth.operator(context)
        version, workers = await self._store.routing_table()
        pinned = await self._store.pinned()
        return adpb.GetRoutingTableResponse(
            version=version,
            workers=[
                adpb.RoutingEntry(
                    worker_id=w.id,
                    base_model=w.base_model,
                    endpoint=w.endpoint,
                    adapter_ids=w.resident,
                    healthy=w.healthy,
                    draining=w.draining,
                    pool_tenant_id=w.pool,
                    pinned_adapter_ids=[a for a in w.resident if a in pinned],
                    max_concurrency=w.max_concurrency,
                )  # fmt: skip
                for w in workers
            ],
        )
