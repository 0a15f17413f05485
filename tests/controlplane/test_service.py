"""The worker service on a real control plane in this process, against a real Redis: what
ListWorkers shows of a worker's engine, a crash-looping worker's stream, and artifact fetches."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controlplane import server
from controlplane.artifacts import ARTIFACT_MESSAGE, FileArtifactStore
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.controlplane.v1 import worker_pb2_grpc
from loraplane.state.records import WorkerRecord
from tests.controlplane.test_peers import eventually
from tests.controlplane.test_store import record
from tests.support import free_port

OPERATOR, AGENT, PEER = "o" * 32, "a" * 32, "p" * 32


async def start_control_plane(redis_url: str, tmp_path: Path, port: int = 0, **extra: str) -> server.ControlPlane:
    """A control plane on `port` (0: a free one), with the tokens above, no metrics server and
    the `extra` variables."""
    Catalog.write(tmp_path / "catalog.json", [{"name": "tiny-llama", "path": str(tmp_path), "lora": False}])
    env = {
        "LORAPLANE_GRPC_ADDR": f"127.0.0.1:{port or free_port()}",
        "LORAPLANE_REDIS_URL": redis_url,
        "LORAPLANE_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "LORAPLANE_CATALOG": str(tmp_path / "catalog.json"),
        "LORAPLANE_OPERATOR_TOKEN": OPERATOR,
        "LORAPLANE_AGENT_TOKEN": AGENT,
        "LORAPLANE_PEER_TOKEN": PEER,
        "LORAPLANE_METRICS_ADDR": "",
        "LORAPLANE_HEARTBEAT_TIMEOUT_S": "60",  # the fake agents send heartbeats only when told
    }
    return await server.start(Settings.from_env(env | extra))


async def test_list_workers_shows_the_engine(plane: server.ControlPlane, store: Store) -> None:
    owner = f"127.0.0.1:{plane.port}"
    await store.put_worker(WorkerRecord("w-loop", "tiny-llama", "http://w", 4, healthy=False, updated_at=time.time(),
                                        owner=owner, engine_state="crash_loop", engine_restarts=5,
                                        engine_error="torch.OutOfMemoryError: CUDA out of memory"))  # fmt: skip
    async with grpc.aio.insecure_channel(owner) as channel:
        resp = await worker_pb2_grpc.WorkerServiceStub(channel).ListWorkers(
            pb.ListWorkersRequest(), metadata=(("authorization", f"Bearer {OPERATOR}"),), timeout=5
        )
    [w] = resp.workers
    assert (w.worker_id, w.healthy, w.engine_state, w.engine_restarts) == ("w-loop", False, "crash_loop", 5)
    assert w.engine_last_error == "torch.OutOfMemoryError: CUDA out of memory"


async def test_a_crash_looping_worker_gets_its_adapters_once_its_engine_serves(
    plane: server.ControlPlane, store: Store
) -> None:
    """Nothing is sent to an engine that cannot take it (a failed reload would count against the
    adapter); the first heartbeat of a serving engine brings the worker to its desired state."""
    adapter = record("ten_loop", "a1")
    await store.create_adapter(adapter, 20)
    await store.desire("w-loop", adapter.id)
    outgoing: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
    crash_loop = pb.EngineStatus(state="crash_loop", last_error="RuntimeError: boom", restarts=3)
    register = pb.Register(worker_id="w-loop", base_model="tiny-llama", endpoint="http://w", max_adapters=4,
                           engine=crash_loop)  # fmt: skip
    outgoing.put_nowait(pb.ConnectRequest(register=register))

    async def requests() -> AsyncIterator[pb.ConnectRequest]:
        while True:
            yield await outgoing.get()

    received: asyncio.Queue[pb.ConnectResponse] = asyncio.Queue()

    async def agent() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            stream = worker_pb2_grpc.WorkerServiceStub(channel).Connect(
                requests(), metadata=(("authorization", f"Bearer {AGENT}"),)
            )
            async for msg in stream:
                received.put_nowait(msg)

    connected = asyncio.create_task(agent())

    async def registered() -> bool:
        worker = await store.get_worker("w-loop")
        return worker is not None and worker.engine_state == "crash_loop"

    await eventually(registered, 10, "the agent never registered")
    worker = await store.get_worker("w-loop")
    assert worker is not None and not worker.healthy and worker.engine_error == "RuntimeError: boom"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(received.get(), 0.5)  # no load for an engine in a crash loop
    serving = pb.EngineStatus(state="serving", restarts=3)
    outgoing.put_nowait(pb.ConnectRequest(heartbeat=pb.Heartbeat(healthy=True, engine=serving)))
    load = await asyncio.wait_for(received.get(), 10)
    assert load.load.adapter_id == adapter.id
    worker = await store.get_worker("w-loop")
    assert worker is not None and worker.healthy and (worker.engine_state, worker.engine_error) == ("serving", "")
    connected.cancel()


async def test_fetch_artifact_serves_the_whole_blob_or_the_byte_range_asked_for(
    plane: server.ControlPlane, tmp_path: Path
) -> None:
    data = os.urandom(3 * ARTIFACT_MESSAGE + 5)
    pending = FileArtifactStore(tmp_path / "artifacts").open_temp()  # the control plane's own store
    pending.write(data)
    sha, _ = pending.commit()
    metadata = (("authorization", f"Bearer {AGENT}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)

        async def fetch(request: pb.FetchArtifactRequest) -> list[bytes]:
            return [msg.chunk async for msg in stub.FetchArtifact(request, metadata=metadata, timeout=10)]

        whole = await fetch(pb.FetchArtifactRequest(sha256=sha))  # an older agent's request
        assert b"".join(whole) == data
        assert len(whole) >= 4 and max(len(c) for c in whole) == ARTIFACT_MESSAGE  # under the 4 MiB default
        ranged = pb.FetchArtifactRequest(sha256=sha, offset=ARTIFACT_MESSAGE - 3, length=ARTIFACT_MESSAGE + 10)
        assert b"".join(await fetch(ranged)) == data[ARTIFACT_MESSAGE - 3 : 2 * ARTIFACT_MESSAGE + 7]
        tail = pb.FetchArtifactRequest(sha256=sha, offset=len(data) - 7, length=100)
        assert b"".join(await fetch(tail)) == data[-7:]  # cut at the end
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(pb.FetchArtifactRequest(sha256=sha, offset=len(data), length=1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(pb.FetchArtifactRequest(sha256="0" * 64, offset=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


AGENT_SCRIPT = """
import asyncio, sys
import grpc
from loraplane.controlplane.v1 import worker_pb2 as pb, worker_pb2_grpc

async def main(addr, token, worker_id):
    serving = pb.EngineStatus(state="serving")
    register = pb.Register(worker_id=worker_id, base_model="tiny-llama", endpoint="http://127.0.0.1:1",
                           max_adapters=4, engine=serving)

    async def requests():
        yield pb.ConnectRequest(register=register)
        while True:
            yield pb.ConnectRequest(heartbeat=pb.Heartbeat(healthy=True, engine=serving))
            await asyncio.sleep(0.05)

    async with grpc.aio.insecure_channel(addr) as channel:
        stream = worker_pb2_grpc.WorkerServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {token}"),))
        async for _ in stream:
            pass

asyncio.run(main(*sys.argv[1:]))
"""


async def test_killed_agents_workers_leave_routing_at_once(plane: server.ControlPlane, store: Store) -> None:
    """Agents killed with SIGKILL: each one's worker is out of routing as soon as its stream
    breaks, every time (heartbeats would only time out after 60 s here). Found in CI: gRPC
    cancelled a stream's handler during its cleanup, the detach's Redis write was cut short, and
    the worker stayed routable, unwatched, for the 30 s an unowned worker's agent is waited for."""

    async def routable(ids: list[str]) -> list[str]:
        workers = [await store.get_worker(wid) for wid in ids]
        return [w.id for w in workers if w is not None and (w.healthy or w.owner)]

    addr = f"127.0.0.1:{plane.port}"
    for round_ in range(6):
        ids = [f"w-killed-{round_}-{i}" for i in range(8)]
        agents = [await asyncio.create_subprocess_exec(sys.executable, "-c", AGENT_SCRIPT, addr, AGENT, w) for w in ids]

        async def registered(ids: list[str] = ids) -> bool:
            return len(await routable(ids)) == len(ids)

        try:
            await eventually(registered, 30, "the agents never registered")
        finally:
            for agent in agents:
                agent.kill()
            for agent in agents:
                await agent.wait()
        deadline = time.monotonic() + 3
        while (left := await routable(ids)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not left, f"round {round_}: killed agents' workers still in routing"


async def test_a_background_loop_that_fails_unexpectedly_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control plane's loops (liveness watch, pin keeper, registry maintenance) catch the
    errors they expect; one that stops on anything else is not left dead in silence."""
    runs: list[int] = []
    again = asyncio.Event()

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise KeyError("unexpected")
        again.set()
        await asyncio.Event().wait()

    kept = asyncio.create_task(server._kept("the test loop", loop, pause_s=0.01))
    await asyncio.wait_for(again.wait(), 5)
    kept.cancel()
    with pytest.raises(asyncio.CancelledError):
        await kept
    assert runs == [0, 1] and "the test loop stopped on an unexpected error" in caplog.text
