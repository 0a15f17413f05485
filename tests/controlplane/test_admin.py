"""The operator surface: gRPC verbs and the `loraplane` CLI, against a real control plane."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import httpx
import pytest

from controlplane.peers import FORWARDED
from loraplane.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from loraplane.stack import Stack
from tests.conftest import new_tenant, upload
from tests.support import lora_tensors, safetensors_bytes, wait_for

ADAPTER = safetensors_bytes(lora_tensors(rank=2))


def cli(stack: Stack, *args: str) -> str:
    env = dict(
        os.environ,
        LORAPLANE_CONTROLPLANE_ADDR=stack.grpc_addr,
        LORAPLANE_OPERATOR_TOKEN=stack.secrets["operator_token"],
    )
    out = subprocess.run(
        [sys.executable, "-m", "loraplane.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def tenant_id_of(stack: Stack, name: str) -> str:
    return next(t.id for t in stack.operator().list_tenants().tenants if t.name == name)


def status(stack: Stack, key: str) -> int:
    return httpx.get(f"{stack.http_url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}).status_code


def wait_for_status(stack: Stack, key: str, expected: int, within_s: float = 5.0) -> float:
    what = f"not {expected} within {within_s}s"
    return wait_for(lambda: status(stack, key) == expected, within_s, what, every_s=0.02)


def test_tenants_through_the_cli(control_stack: Stack) -> None:
    created = cli(control_stack, "tenant", "create", "cli-tenant", "--tier", "shared")
    key = created.split("api key ")[1].split()[0]
    tenant_id = created.split("(")[1].split(")")[0]
    assert status(control_stack, key) == 200
    assert f"{tenant_id}  cli-tenant  shared" in cli(control_stack, "tenant", "list")
    assert '"max_adapters": 200' in cli(control_stack, "tenant", "set-tier", tenant_id, "reserved")
    assert f"{tenant_id}  cli-tenant  reserved" in cli(control_stack, "tenant", "list")

    cli(control_stack, "tenant", "suspend", tenant_id)
    wait_for_status(control_stack, key, 403)
    assert f"{tenant_id}  cli-tenant  reserved  suspended" in cli(control_stack, "tenant", "list")
    cli(control_stack, "tenant", "unsuspend", tenant_id)
    wait_for_status(control_stack, key, 200)


def test_a_revoked_key_stops_working_within_seconds(control_stack: Stack) -> None:
    first = new_tenant(control_stack, "key-owner")
    tenant_id = tenant_id_of(control_stack, "key-owner")
    second = cli(control_stack, "key", "create", tenant_id).split("api key ")[1].split()[0]
    assert status(control_stack, first) == 200 and status(control_stack, second) == 200  # both now cached
    listed = cli(control_stack, "key", "list", tenant_id)
    assert first[:11] in listed and second[:11] in listed and first not in listed

    cli(control_stack, "key", "revoke", second[:11])
    took = wait_for_status(control_stack, second, 401)
    print(f"\nrevoked key refused after {took * 1000:.0f} ms")
    assert status(control_stack, first) == 200
    assert second[:11] not in cli(control_stack, "key", "list", tenant_id)


def test_suspended_tenants_cannot_use_the_control_plane_either(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "suspended-grpc")
    tenant_id = tenant_id_of(control_stack, "suspended-grpc")
    control_stack.operator().suspend(tenant_id)
    assert upload(control_stack, key, "x", ADAPTER).status_code == 403
    control_stack.operator().suspend(tenant_id, suspended=False)
    assert upload(control_stack, key, "x", ADAPTER).status_code == 201


def test_worker_verbs_name_unknown_workers(control_stack: Stack) -> None:
    for verb in ("drain", "undrain"):
        with pytest.raises(grpc.RpcError) as err:
            control_stack.operator().drain("no-such-worker", draining=verb == "drain")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert '"version"' in cli(control_stack, "routing") or cli(control_stack, "routing").strip() == "{}"


def test_tier_changes_apply_to_quotas(control_stack: Stack) -> None:
    key = new_tenant(control_stack, "tier-change")
    tenant_id = tenant_id_of(control_stack, "tier-change")
    control_stack.operator().set_tier(tenant_id, tenant_pb2.TIER_RESERVED)
    for i in range(21):  # one more than the shared tier allows
        assert upload(control_stack, key, f"n{i}", safetensors_bytes(lora_tensors(rank=1 + i % 8))).status_code == 201


def test_the_peer_token_opens_only_what_replicas_forward(control_stack: Stack) -> None:
    """Replicas forward ForceLoadAdapter and ForceEvictAdapter to each other with their own
    token, marked forwarded; that token opens no other verb, and those two only when marked."""
    peer = ("authorization", f"Bearer {control_stack.secrets['peer_token']}")
    forwarded = (peer, (FORWARDED, "1"))
    with grpc.insecure_channel(control_stack.grpc_addr) as ch:
        admin, tenants = admin_pb2_grpc.AdminServiceStub(ch), tenant_pb2_grpc.TenantServiceStub(ch)
        load, evict = admin_pb2.ForceLoadAdapterRequest(adapter_id="adp_x"), admin_pb2.ForceEvictAdapterRequest()
        refused: list[tuple[Callable[..., object], object, tuple[tuple[str, str], ...]]] = [
            (tenants.CreateTenant, tenant_pb2.CreateTenantRequest(name="by-a-peer"), forwarded),
            (tenants.ListTenants, tenant_pb2.ListTenantsRequest(), forwarded),
            (worker_pb2_grpc.WorkerServiceStub(ch).ListWorkers, worker_pb2.ListWorkersRequest(), forwarded),
            (admin.DrainWorker, admin_pb2.DrainWorkerRequest(worker_id="w"), forwarded),
            (admin.GetRoutingTable, admin_pb2.GetRoutingTableRequest(), forwarded),
            (admin.ForceLoadAdapter, load, (peer,)),  # not marked forwarded: an operator's call
            (admin.ForceEvictAdapter, evict, (peer,)),
        ]
        for method, request, metadata in refused:
            with pytest.raises(grpc.RpcError) as err:
                method(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        with pytest.raises(grpc.RpcError) as err:  # let in: the adapter does not exist
            admin.ForceLoadAdapter(load, metadata=forwarded, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(admin.ForceEvictAdapter(evict, metadata=forwarded, timeout=5).worker_ids) == []
    assert "by-a-peer" not in cli(control_stack, "tenant", "list")
