"""The host-memory tier on the control plane's side: a worker's GPU slots and node cache as its
agent reports them, kept in its record (written only when they change), placement preferring the
fastest tier, and ListWorkers and `worker list` showing them."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest

from controlplane import server
from controlplane.peers import Peers
from controlplane.placement import Decision, WorkerView, decide
from controlplane.placer import Placer
from controlplane.sessions import Sessions
from controlplane.store import Store
from loraplane import cli
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.controlplane.v1 import worker_pb2_grpc
from loraplane.state.records import WorkerRecord
from tests.controlplane.test_peers import eventually
from tests.controlplane.test_service import AGENT, OPERATOR
from tests.controlplane.test_store import record


def w(
    wid: str,
    resident: set[str],
    cached: Iterable[str] = (),
    max_adapters: int = 2,
    in_flight: int = 0,
    draining: bool = False,
) -> WorkerView:
    return WorkerView(wid, "m", True, max_adapters, frozenset(resident), cached=frozenset(cached),
                      in_flight=in_flight, draining=draining)  # fmt: skip


@pytest.mark.parametrize(
    ("intent", "workers", "last_used", "expected"),
    [
        (
            "a free slot where the node cache holds the bytes beats a less used worker",
            [w("a", set()), w("b", {"p"}, cached={"x"})],
            {},
            Decision("b", False),
        ),
        (
            "... and a less loaded one",
            [w("a", set(), max_adapters=4), w("b", {"p", "q"}, cached={"x"}, max_adapters=4, in_flight=9)],
            {},
            Decision("b", False),
        ),
        ("resident beats cached", [w("a", set(), cached={"x"}), w("b", {"x"})], {}, Decision("b", True)),
        (
            "a free slot elsewhere beats evicting where it is cached",
            [w("a", {"p", "q"}, cached={"x"}), w("b", {"r"})],
            {"p": 1.0, "q": 2.0},
            Decision("b", False),
        ),
        (
            "a draining worker's cache does not count",
            [w("a", set(), cached={"x"}, draining=True), w("b", {"p"})],
            {},
            Decision("b", False),
        ),
        (
            "all full: evict where it is cached, even on a busier worker",
            [w("a", {"p", "q"}), w("b", {"r", "s"}, cached={"x"}, in_flight=3)],
            {"p": 1.0, "q": 2.0, "r": 3.0, "s": 4.0},
            Decision("b", False, evict="r"),
        ),
        (
            "eviction stays least recently used (host memory's adapters before the GPU slots')",
            [w("a", {"gpu1", "gpu2", "host1", "host2"}, cached={"x"}, max_adapters=4)],
            {"gpu1": 9.0, "gpu2": 8.0, "host1": 2.0, "host2": 1.0},
            Decision("a", False, evict="host2"),
        ),
    ],
)
def test_placement_prefers_the_fastest_tier(
    intent: str, workers: list[WorkerView], last_used: dict[str, float], expected: Decision
) -> None:
    assert decide(workers, "m", "x", last_used) == expected, intent


async def test_a_worker_reports_its_slots_and_cache_written_only_when_changed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Register records the GPU slots; heartbeats the node cache, sorted; an unchanged heartbeat
    writes nothing; reports that do not know the cache (a command's result, liveness) keep it, and
    so does a heartbeat measured before a result already applied."""
    sessions = Sessions(store, "cp-test", 5, 10)
    writes: list[WorkerRecord] = []
    put = store.put_worker

    async def counted(rec: WorkerRecord) -> None:
        writes.append(rec)
        await put(rec)

    monkeypatch.setattr(store, "put_worker", counted)
    register = pb.Register(worker_id="ht-w", base_model="m", endpoint="http://w", max_adapters=32, gpu_slots=8,
                           resident=["adp_a"])  # fmt: skip
    session = await sessions.attach(register)
    stored = await store.get_worker("ht-w")
    assert stored is not None and (stored.max_adapters, stored.gpu_slots, stored.cached) == (32, 8, [])

    await sessions.heartbeat(session, ["adp_a"], True, [], cached=["adp_c", "adp_b"])
    stored = await store.get_worker("ht-w")
    assert stored is not None and stored.cached == ["adp_b", "adp_c"]
    assert session.view(False).cached == frozenset({"adp_b", "adp_c"})
    written = len(writes)
    await sessions.heartbeat(session, ["adp_a"], True, [], cached=["adp_b", "adp_c"])
    await sessions.heartbeat(session, ["adp_a"], True, [], cached=["adp_c", "adp_b"])
    assert len(writes) == written, "an unchanged heartbeat wrote the record"

    await sessions.report(session, ["adp_a", "adp_b"], True)  # a load's result
    await sessions.report(session, ["adp_a", "adp_b"], False, seen=False)  # liveness
    stored = await store.get_worker("ht-w")
    assert stored is not None and stored.cached == ["adp_b", "adp_c"] and not stored.healthy

    session.resolve(pb.CommandResult(command_id="c1", ok=True))
    await sessions.heartbeat(session, ["adp_a"], True, [], commands_done=0, cached=[])  # older news
    assert session.record.cached == ["adp_b", "adp_c"]
    await sessions.heartbeat(session, ["adp_a"], True, [], commands_done=1, cached=["adp_b"])
    stored = await store.get_worker("ht-w")
    assert stored is not None and stored.cached == ["adp_b"]


async def test_an_older_agent_registers_without_gpu_slots(store: Store) -> None:
    sessions = Sessions(store, "cp-test", 5, 10)
    await sessions.attach(pb.Register(worker_id="old-w", base_model="m", endpoint="http://w", max_adapters=8))
    stored = await store.get_worker("old-w")
    assert stored is not None and (stored.gpu_slots, stored.cached) == (0, [])


async def test_the_placer_loads_where_the_node_cache_holds_the_bytes(store: Store) -> None:
    """Of two free workers of this replica, the one whose agent reports the adapter in its node
    cache, though it holds more; a remote worker's cache reaches the placer's views too."""
    sessions = Sessions(store, "cp-test", 5, 10)
    placer = Placer(store, sessions, Peers("t" * 32, 5), 30.0)
    adapter = record("ten_ht", "a1")
    await store.create_adapter(adapter, 20)
    empty = await sessions.attach(pb.Register(worker_id="ht-empty", base_model="tiny-llama", endpoint="http://e",
                                              max_adapters=4))  # fmt: skip
    cached = await sessions.attach(pb.Register(worker_id="ht-cached", base_model="tiny-llama", endpoint="http://c",
                                               max_adapters=4, gpu_slots=2, resident=["adp_other"]))  # fmt: skip
    await sessions.heartbeat(cached, ["adp_other"], True, [], cached=[adapter.id])
    await store.put_worker(WorkerRecord("ht-remote", "tiny-llama", "http://r", 4, healthy=True,
                                        updated_at=time.time(), owner="elsewhere:1", cached=[adapter.id]))  # fmt: skip

    async def agent() -> None:
        while True:
            msg = await cached.outbox.get()
            load = msg.load
            cached.resolve(pb.CommandResult(command_id=load.command_id, ok=True,
                                            resident=sorted({"adp_other", load.adapter_id})))  # fmt: skip

    views = {v.id: v for v in (await placer._views())[0]}
    assert views["ht-remote"].cached == frozenset({adapter.id})
    assert views["ht-cached"].cached == frozenset({adapter.id}) and not views["ht-empty"].cached
    await store.put_worker(WorkerRecord("ht-remote", "tiny-llama", "http://r", 4, healthy=False))  # out of the way
    answering = asyncio.create_task(agent())
    try:
        placed = await asyncio.wait_for(placer.place(adapter), 10)
    finally:
        answering.cancel()
    assert placed.worker_id == "ht-cached" and not placed.already_loaded
    assert empty.outbox.empty()


async def test_list_workers_shows_gpu_slots_and_the_node_cache(plane: server.ControlPlane, store: Store) -> None:
    """From the agent's stream: Register's gpu_slots, a heartbeat's cache, to ListWorkers."""
    outgoing: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
    register = pb.Register(worker_id="ht-list", base_model="tiny-llama", endpoint="http://w", max_adapters=32,
                           gpu_slots=8)  # fmt: skip
    outgoing.put_nowait(pb.ConnectRequest(register=register))
    outgoing.put_nowait(pb.ConnectRequest(heartbeat=pb.Heartbeat(healthy=True, cached=["adp_z", "adp_y"])))

    async def requests() -> AsyncIterator[pb.ConnectRequest]:
        while True:
            yield await outgoing.get()

    async def agent() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            stream = worker_pb2_grpc.WorkerServiceStub(channel).Connect(
                requests(), metadata=(("authorization", f"Bearer {AGENT}"),)
            )
            async for _ in stream:
                pass

    connected = asyncio.create_task(agent())
    try:

        async def reported() -> bool:
            worker = await store.get_worker("ht-list")
            return worker is not None and worker.cached == ["adp_y", "adp_z"]

        await eventually(reported, 10, "the heartbeat's cache never reached the record")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            resp = await worker_pb2_grpc.WorkerServiceStub(channel).ListWorkers(
                pb.ListWorkersRequest(), metadata=(("authorization", f"Bearer {OPERATOR}"),), timeout=5
            )
    finally:
        connected.cancel()
    [listed] = resp.workers
    assert (listed.max_adapters, listed.gpu_slots, list(listed.cached_adapter_ids)) == (32, 8, ["adp_y", "adp_z"])


class FakeOperator:
    def __init__(self, workers: list[pb.Worker]) -> None:
        self._workers = workers

    def list_workers(self) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(workers=self._workers)


def test_worker_list_shows_the_host_tier_compactly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its GPU slots only when it has a host-memory tier, its cache only when it holds something:
    a worker without either reads as before."""
    workers = [
        pb.Worker(worker_id="w-tier", base_model="m", endpoint="http://t", max_adapters=32, gpu_slots=8,
                  resident_adapter_ids=["adp_1", "adp_2", "adp_3"], cached_adapter_ids=["adp_4", "adp_5"],
                  healthy=True),
        pb.Worker(worker_id="w-slots", base_model="m", endpoint="http://s", max_adapters=8, gpu_slots=8,
                  healthy=True),
        pb.Worker(worker_id="w-old", base_model="m", endpoint="http://o", max_adapters=8, healthy=True,
                  cached_adapter_ids=["adp_6"]),
    ]  # fmt: skip
    monkeypatch.setattr(cli, "_op", lambda args: FakeOperator(workers))
    cli.cmd_worker_list(argparse.Namespace(json=False))
    assert capsys.readouterr().out.splitlines() == [
        "w-tier  m  healthy  shared  3/32 loaded, 8 gpu, 2 cached  http://t  restarts 0",
        "    adp_1",
        "    adp_2",
        "    adp_3",
        "w-slots  m  healthy  shared  0/8  http://s  restarts 0",
        "w-old  m  healthy  shared  0/8, 1 cached  http://o  restarts 0",
    ]
    cli.cmd_worker_list(argparse.Namespace(json=True))
    tiers = [(x["gpu_slots"], x["cached_adapter_ids"]) for x in json.loads(capsys.readouterr().out)]
    assert tiers == [(8, ["adp_4", "adp_5"]), (8, []), (0, ["adp_6"])]
