"""Blocking operator calls to the control plane, for the CLI, the embedded stack and tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from loraplane.controlplane.v1 import admin_pb2 as adpb
from loraplane.controlplane.v1 import admin_pb2_grpc, tenant_pb2_grpc, worker_pb2_grpc
from loraplane.controlplane.v1 import tenant_pb2 as tpb
from loraplane.controlplane.v1 import worker_pb2 as wpb


class Operator:
    def __init__(self, addr: str, token: str, timeout: float = 10) -> None:
        self._addr = addr
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def _call(
        self, stub: Callable[[grpc.Channel], Any], method: str, request: Any, timeout: float | None = None
    ) -> Any:
        with grpc.insecure_channel(self._addr) as channel:
            return getattr(stub(channel), method)(request, metadata=self._metadata, timeout=timeout or self._timeout)

    # tenants and keys

    def create_tenant(self, name: str, tier: tpb.Tier = tpb.TIER_SHARED) -> tpb.CreateTenantResponse:
        resp: tpb.CreateTenantResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "CreateTenant", tpb.CreateTenantRequest(name=name, tier=tier)
        )
        return resp

    def list_tenants(self) -> tpb.ListTenantsResponse:
        resp: tpb.ListTenantsResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "ListTenants", tpb.ListTenantsRequest()
        )
        return resp

    def set_tier(self, tenant_id: str, tier: tpb.Tier) -> tpb.Tenant:
        resp: tpb.SetTenantTierResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "SetTenantTier", tpb.SetTenantTierRequest(tenant_id=tenant_id, tier=tier)
        )
        return resp.tenant

    def suspend(self, tenant_id: str, suspended: bool = True) -> tpb.Tenant:
        if suspended:
            resp: Any = self._call(
                tenant_pb2_grpc.TenantServiceStub, "SuspendTenant", tpb.SuspendTenantRequest(tenant_id=tenant_id)
            )
        else:
            resp = self._call(
                tenant_pb2_grpc.TenantServiceStub, "UnsuspendTenant", tpb.UnsuspendTenantRequest(tenant_id=tenant_id)
            )
        tenant: tpb.Tenant = resp.tenant
        return tenant

    def create_key(self, tenant_id: str) -> tpb.CreateApiKeyResponse:
        resp: tpb.CreateApiKeyResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "CreateApiKey", tpb.CreateApiKeyRequest(tenant_id=tenant_id)
        )
        return resp

    def list_keys(self, tenant_id: str) -> list[tpb.ApiKey]:
        resp: tpb.ListApiKeysResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "ListApiKeys", tpb.ListApiKeysRequest(tenant_id=tenant_id)
        )
        return list(resp.keys)

    def revoke_key(self, key_prefix: str) -> None:
        self._call(tenant_pb2_grpc.TenantServiceStub, "RevokeApiKey", tpb.RevokeApiKeyRequest(key_prefix=key_prefix))

    def set_limits(self, tenant_id: str, limits: tpb.RateLimits | None) -> tpb.Tenant:
        """The tenant's own rate limits; None: its tier's."""
        request = tpb.SetTenantLimitsRequest(tenant_id=tenant_id, limits=limits, tier_default=limits is None)
        resp: tpb.SetTenantLimitsResponse = self._call(tenant_pb2_grpc.TenantServiceStub, "SetTenantLimits", request)
        return resp.tenant

    def set_capacity(
        self, tenant_id: str, pinned_slots: int | None = None, tier_default_pins: bool = False,
        spill_over: bool | None = None,
    ) -> tpb.Tenant:  # fmt: skip
        """The tenant's own pinned-adapter allowance (`tier_default_pins`: its tier's again) and
        whether it may spill over to shared workers; None: as it is."""
        request = tpb.SetTenantCapacityRequest(
            tenant_id=tenant_id, pinned_slots=pinned_slots, pinned_slots_tier_default=tier_default_pins,
            spill_over=spill_over,
        )  # fmt: skip
        resp: tpb.SetTenantCapacityResponse = self._call(
            tenant_pb2_grpc.TenantServiceStub, "SetTenantCapacity", request
        )
        return resp.tenant

    def usage(self, start: int, end: int, bucket_width: str, tenant_id: str = "") -> Iterator[tpb.UsageRow]:
        """Every usage row in [start, end), page after page (end 0: now, fixed at the first page)."""
        end = end or int(time.time())
        request = tpb.ExportUsageRequest(start_time=start, end_time=end, bucket_width=bucket_width, tenant_id=tenant_id)
        while True:
            resp: tpb.ExportUsageResponse = self._call(tenant_pb2_grpc.TenantServiceStub, "ExportUsage", request)
            yield from resp.rows
            if not resp.next_page_token:
                return
            request.page_token = resp.next_page_token

    # workers, placements, routing

    def list_workers(self) -> wpb.ListWorkersResponse:
        resp: wpb.ListWorkersResponse = self._call(
            worker_pb2_grpc.WorkerServiceStub, "ListWorkers", wpb.ListWorkersRequest()
        )
        return resp

    def drain(self, worker_id: str, draining: bool = True) -> None:
        if draining:
            self._call(admin_pb2_grpc.AdminServiceStub, "DrainWorker", adpb.DrainWorkerRequest(worker_id=worker_id))
        else:
            self._call(admin_pb2_grpc.AdminServiceStub, "UndrainWorker", adpb.UndrainWorkerRequest(worker_id=worker_id))

    def assign_worker(self, worker_id: str, tenant_id: str) -> adpb.AssignWorkerResponse:
        """Into the tenant's dedicated pool; the other tenants' adapters it holds are evicted."""
        resp: adpb.AssignWorkerResponse = self._call(
            admin_pb2_grpc.AdminServiceStub,
            "AssignWorker",
            adpb.AssignWorkerRequest(worker_id=worker_id, tenant_id=tenant_id),
            timeout=120,
        )
        return resp

    def unassign_worker(self, worker_id: str) -> adpb.UnassignWorkerResponse:
        """Out of its pool: a shared worker again."""
        resp: adpb.UnassignWorkerResponse = self._call(
            admin_pb2_grpc.AdminServiceStub, "UnassignWorker", adpb.UnassignWorkerRequest(worker_id=worker_id)
        )
        return resp

    def force_load(self, adapter_id: str, worker_id: str = "") -> adpb.ForceLoadAdapterResponse:
        resp: adpb.ForceLoadAdapterResponse = self._call(
            admin_pb2_grpc.AdminServiceStub,
            "ForceLoadAdapter",
            adpb.ForceLoadAdapterRequest(adapter_id=adapter_id, worker_id=worker_id),
            timeout=120,
        )
        return resp

    def prefetch(self, adapter_id: str, worker_ids: list[str] | None = None) -> list[str]:
        resp: adpb.PrefetchAdapterResponse = self._call(
            admin_pb2_grpc.AdminServiceStub,
            "PrefetchAdapter",
            adpb.PrefetchAdapterRequest(adapter_id=adapter_id, worker_ids=worker_ids or []),
            timeout=120,
        )
        return list(resp.worker_ids)

    def force_evict(self, adapter_id: str, worker_id: str = "") -> list[str]:
        resp: adpb.ForceEvictAdapterResponse = self._call(
            admin_pb2_grpc.AdminServiceStub,
            "ForceEvictAdapter",
            adpb.ForceEvictAdapterRequest(adapter_id=adapter_id, worker_id=worker_id),
            timeout=120,
        )
        return list(resp.worker_ids)

    def routing_table(self) -> adpb.GetRoutingTableResponse:
        resp: adpb.GetRoutingTableResponse = self._call(
            admin_pb2_grpc.AdminServiceStub, "GetRoutingTable", adpb.GetRoutingTableRequest()
        )
        return resp
