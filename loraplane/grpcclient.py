"""Blocking gRPC calls for the command line, with the operator token."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from loraplane.controlplane.v1 import tenant_pb2_grpc, worker_pb2_grpc

STUBS = {
    "CreateTenant": tenant_pb2_grpc.TenantServiceStub,
    "ListTenants": tenant_pb2_grpc.TenantServiceStub,
    "CreateApiKey": tenant_pb2_grpc.TenantServiceStub,
    "ListWorkers": worker_pb2_grpc.WorkerServiceStub,
}


def operator_call(addr: str, token: str, method: str, request: Message, timeout: float = 10) -> Message:
    with grpc.insecure_channel(addr) as channel:
        stub = STUBS[method](channel)
        return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=timeout)  # type: ignore[no-any-return]
