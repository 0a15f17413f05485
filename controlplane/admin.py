"""Operator servicers: tenants and keys, workers and placements. Operator token only, except
ForceLoadAdapter and ForceEvictAdapter forwarded by another replica, which take the peer token."""

from __future__ import annotations

import logging
import time

from controlplane.errors import BadRequest, Context, NotFound, grpc_errors
from controlplane.keys import key_hash, key_prefix, new_api_key, new_id
from controlplane.placer import Placer
from controlplane.service import Auth, timestamp
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane.controlplane.v1 import admin_pb2 as adpb
from loraplane.controlplane.v1 import admin_pb2_grpc, tenant_pb2_grpc
from loraplane.controlplane.v1 import tenant_pb2 as tpb
from loraplane.limits import NAME
from loraplane.state.records import Tenant

log = logging.getLogger(__name__)

TIERS = {tpb.TIER_SHARED: "shared", tpb.TIER_RESERVED: "reserved", tpb.TIER_DEDICATED: "dedicated"}
TIER_ENUM = {v: k for k, v in TIERS.items()}


def tier_name(tier: int) -> str:
    name = TIERS.get(tier)  # type: ignore[call-overload]
    if name is None:
        raise BadRequest("tier must be TIER_SHARED, TIER_RESERVED or TIER_DEDICATED")
    return str(name)


class TenantService(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, settings: Settings, store: Store, auth: Auth) -> None:
        self._settings = settings
        self._tenants = store.tenants
        self._auth = auth

    def _message(self, t: Tenant) -> tpb.Tenant:
        return tpb.Tenant(
            id=t.id,
            name=t.name,
            tier=TIER_ENUM[t.tier],
            max_adapters=self._settings.tier_limits[t.tier],
            created_at=timestamp(t.created_at),
            suspended=t.suspended,
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
        return tpb.CreateTenantResponse(tenant=self._message(tenant), api_key=key)

    @grpc_errors
    async def ListTenants(self, request: tpb.ListTenantsRequest, context: Context) -> tpb.ListTenantsResponse:
        self._auth.operator(context)
        return tpb.ListTenantsResponse(tenants=[self._message(t) for t in await self._tenants.all()])

    @grpc_errors
    async def SetTenantTier(self, request: tpb.SetTenantTierRequest, context: Context) -> tpb.SetTenantTierResponse:
        self._auth.operator(context)
        tenant = await self._tenants.set_tier(request.tenant_id, tier_name(request.tier))
        log.info("tenant %s is now %s", tenant.id, tenant.tier)
        return tpb.SetTenantTierResponse(tenant=self._message(tenant))

    @grpc_errors
    async def SuspendTenant(self, request: tpb.SuspendTenantRequest, context: Context) -> tpb.SuspendTenantResponse:
        self._auth.operator(context)
        tenant = await self._tenants.set_suspended(request.tenant_id, True)
        log.info("tenant %s suspended", tenant.id)
        return tpb.SuspendTenantResponse(tenant=self._message(tenant))

    @grpc_errors
    async def UnsuspendTenant(
        self, request: tpb.UnsuspendTenantRequest, context: Context
    ) -> tpb.UnsuspendTenantResponse:
        self._auth.operator(context)
        tenant = await self._tenants.set_suspended(request.tenant_id, False)
        log.info("tenant %s unsuspended", tenant.id)
        return tpb.UnsuspendTenantResponse(tenant=self._message(tenant))

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


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: Store, placer: Placer, auth: Auth) -> None:
        self._store = store
        self._placer = placer
        self._auth = auth

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
    async def ForceLoadAdapter(
        self, request: adpb.ForceLoadAdapterRequest, context: Context
    ) -> adpb.ForceLoadAdapterResponse:
        is_forwarded = self._auth.peer(context)
        rec = await self._store.get_adapter(request.adapter_id)
        if rec is None or rec.status != "ready":
            raise NotFound(f"no ready adapter {request.adapter_id!r}")
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
                )  # fmt: skip
                for w in workers
            ],
        )
