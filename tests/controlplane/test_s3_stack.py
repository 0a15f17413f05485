"""The stack with its artifacts in S3 (moto's server): control plane, data plane and an agent in
front of the vLLM simulator, all given the same LORAPLANE_ARTIFACT_STORE."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from loraplane.controlplane.v1 import worker_pb2, worker_pb2_grpc
from loraplane.stack import Stack, StackConfig, http_ok, wait_until
from tests.conftest import new_tenant, upload
from tests.s3server import MotoServer
from tests.support import ROOT, free_port, lora_tensors, safetensors_bytes, unmeasured_env, wait_for

PREFIX = "prod/artifacts"


@dataclass
class S3Stack:
    stack: Stack
    moto: MotoServer
    bucket: str

    def key(self, sha256: str) -> str:
        return f"{PREFIX}/blobs/{sha256[:2]}/{sha256}"


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Stack]:
    tmp = tmp_path_factory.mktemp("s3-stack")
    moto = MotoServer()
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim = subprocess.Popen(
        [sys.executable, "-m", "tests.vllmsim", "--port", str(sim_port), "--model", "tiny-llama"],
        cwd=ROOT,
        env=unmeasured_env(),
    )
    try:
        wait_until(lambda: http_ok(sim_url + "/health"), 30, "the simulator", sim)
        bucket = moto.new_bucket()
        env = {"LORAPLANE_ARTIFACT_STORE": f"s3://{bucket}/{PREFIX}", "LORAPLANE_VLLM_URL": sim_url, **moto.env()}
        stack = Stack(
            StackConfig(
                data_dir=tmp / "data",
                http_port=free_port(),
                grpc_port=free_port(),
                vllm_port=sim_port,
                log_dir=tmp / "logs",
                extra_env=tuple(env.items()),
            )
        )
        try:
            stack.start()
            yield S3Stack(stack, moto, bucket)
        finally:
            stack.stop()
    finally:
        sim.terminate()
        sim.wait(10)
        moto.stop()


@pytest.fixture(scope="module")
def adapter(s3_stack: S3Stack) -> dict[str, str]:
    key = new_tenant(s3_stack.stack, "s3-tenant")
    r = upload(s3_stack.stack, key, "in-s3", safetensors_bytes(lora_tensors(rank=4)))
    assert r.status_code == 201, r.text
    return {"key": key, "id": r.json()["id"], "sha256": r.json()["sha256"]}


def test_an_upload_lands_in_the_bucket_and_not_on_the_control_planes_disk(
    s3_stack: S3Stack, adapter: dict[str, str]
) -> None:
    assert s3_stack.key(adapter["sha256"]) in s3_stack.moto.keys(s3_stack.bucket)
    local = s3_stack.stack.config.data_dir / "artifacts"
    assert [p for p in local.rglob("*") if p.is_file()] == []  # only the staging area, empty


def test_the_agent_fetches_the_adapter_straight_from_the_bucket(s3_stack: S3Stack, adapter: dict[str, str]) -> None:
    r = httpx.post(
        s3_stack.stack.http_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {adapter['key']}"},
        json={"model": "tiny-llama:in-s3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    sha = adapter["sha256"]
    assert (s3_stack.stack.config.data_dir / "agent-cache" / "blobs" / sha).is_file()
    log = (s3_stack.stack.config.log_dir or Path()) / "agent.log"
    assert f"fetching artifact {sha} from s3://{s3_stack.bucket}/{s3_stack.key(sha)}" in log.read_text()


def test_the_control_plane_still_serves_blobs_to_agents_without_bucket_access(
    s3_stack: S3Stack, adapter: dict[str, str]
) -> None:
    metadata = (("authorization", f"Bearer {s3_stack.stack.secrets['agent_token']}"),)
    with grpc.insecure_channel(s3_stack.stack.grpc_addr) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        chunks = stub.FetchArtifact(
            worker_pb2.FetchArtifactRequest(sha256=adapter["sha256"]), metadata=metadata, timeout=30
        )
        data = b"".join(c.chunk for c in chunks)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchArtifact(worker_pb2.FetchArtifactRequest(sha256="0" * 64), metadata=metadata, timeout=30))
    assert data == safetensors_bytes(lora_tensors(rank=4))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_deleted_adapters_object_is_removed_from_the_bucket(s3_stack: S3Stack) -> None:
    key = new_tenant(s3_stack.stack, "s3-deleter")
    r = upload(s3_stack.stack, key, "short-lived", safetensors_bytes(lora_tensors(rank=6)))
    assert r.status_code == 201, r.text
    object_key = s3_stack.key(r.json()["sha256"])
    assert object_key in s3_stack.moto.keys(s3_stack.bucket)
    deleted = httpx.delete(
        f"{s3_stack.stack.http_url}/v1/adapters/{r.json()['id']}", headers={"Authorization": f"Bearer {key}"}
    )
    assert deleted.status_code == 200, deleted.text
    wait_for(
        lambda: object_key not in s3_stack.moto.keys(s3_stack.bucket),
        30,
        "the deleted adapter's object is still in the bucket",
    )
