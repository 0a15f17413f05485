"""Blocking operator calls to the control plane, for the CLI and the embedded stack."""

from __future__ import annotations

import grpc

from loraplane.controlplane.v1 import tenant_pb2, tenant_pb2_grpc, worker_pb2, worker_pb2_grpc


class Operator:
    def __init__(self, addr: str, token: str, timeout: float = 10) -> None:
        self._addr = addr
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def create_tenant(
        self, name: str, tier: tenant_pb2.Tier = tenant_pb2.TIER_SHARED
    ) -> tenant_pb2.CreateTenantResponse:
        with grpc.insecure_channel(self._addr) as ch:
            resp: tenant_pb2.CreateTenantResponse = tenant_pb2_grpc.TenantServiceStub(ch).CreateTenant(
                tenant_pb2.CreateTenantRequest(name=name, tier=tier), metadata=self._metadata, timeout=self._timeout
            )
        return resp

    def list_tenants(self) -> tenant_pb2.ListTenantsResponse:
        with grpc.insecure_channel(self._addr) as ch:
            resp: tenant_pb2.ListTenantsResponse = tenant_pb2_grpc.TenantServiceStub(ch).ListTenants(
                tenant_pb2.ListTenantsRequest(), metadata=self._metadata, timeout=self._timeout
            )
        return resp

    def list_workers(self) -> worker_pb2.ListWorkersResponse:
        with grpc.insecure_channel(self._addr) as ch:
            resp: worker_pb2.ListWorkersResponse = worker_pb2_grpc.WorkerServiceStub(ch).ListWorkers(
                worker_pb2.ListWorkersRequest(), metadata=self._metadata, timeout=self._timeout
            )
        return resp
