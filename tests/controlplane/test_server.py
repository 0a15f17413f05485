"""The control plane's gRPC surface, against the real server."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loraplane.controlplane.v1 import adapter_pb2, tenant_pb2, tenant_pb2_grpc
from loraplane.stack import Stack
from tests.conftest import grpc_upload, new_tenant
from tests.support import lora_tensors, safetensors_bytes


def test_health_is_serving_and_reflection_lists_our_services(control_stack: Stack) -> None:
    with grpc.insecure_channel(control_stack.grpc_addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "loraplane.controlplane.v1.AdapterService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {
        "loraplane.controlplane.v1.AdapterService",
        "loraplane.controlplane.v1.TenantService",
        "loraplane.controlplane.v1.WorkerService",
        "loraplane.controlplane.v1.AdminService",
        "grpc.health.v1.Health",
    } <= services


@pytest.mark.parametrize("token", [None, "Bearer wrong-token-0123456789", "Basic abc", "Bearer "])
def test_operator_calls_need_the_operator_token(control_stack: Stack, token: str | None) -> None:
    metadata = (("authorization", token),) if token is not None else ()
    with grpc.insecure_channel(control_stack.grpc_addr) as ch, pytest.raises(grpc.RpcError) as err:
        tenant_pb2_grpc.TenantServiceStub(ch).ListTenants(tenant_pb2.ListTenantsRequest(), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_tenant_key_is_not_an_operator_token(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "not-an-operator")
    with grpc.insecure_channel(control_stack.grpc_addr) as ch, pytest.raises(grpc.RpcError) as err:
        tenant_pb2_grpc.TenantServiceStub(ch).ListTenants(
            tenant_pb2.ListTenantsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_upload_over_grpc_stores_a_ready_adapter(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "grpc-uploader")
    adapter = grpc_upload(control_stack.grpc_addr, key, "g1", safetensors_bytes(lora_tensors(rank=4)))
    assert adapter.status == adapter_pb2.ADAPTER_STATUS_READY
    assert adapter.id.startswith("adp_") and adapter.model == "tiny-llama:g1" and adapter.rank == 4


def test_a_stream_without_metadata_stores_nothing(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "cut-short")
    blobs = control_stack.config.data_dir / "artifacts" / "blobs"
    before = sorted(blobs.rglob("*"))
    with pytest.raises(grpc.RpcError) as err:
        grpc_upload(control_stack.grpc_addr, key, "g1", safetensors_bytes(lora_tensors(rank=5)), send_metadata=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(blobs.rglob("*")) == before
    assert [p for p in (control_stack.config.data_dir / "artifacts" / "tmp").rglob("*") if p.is_file()] == []
