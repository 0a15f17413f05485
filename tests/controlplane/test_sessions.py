"""Agent sessions: what workers report, against a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from controlplane import telemetry
from controlplane.reconcile import Reconciler
from controlplane.sessions import Sessions
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.support import RedisServer


async def test_a_heartbeat_measured_before_an_applied_result_does_not_undo_it(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    sessions = Sessions(store, "cp-test", 5, 10)
    reconciler = Reconciler(store, sessions)
    register = pb.Register(worker_id="hb-w", base_model="m", endpoint="http://w", max_adapters=8, resident=["adp_x"])
    session = await sessions.attach(register)
    session.resolve(pb.CommandResult(command_id="c1", ok=True))  # an eviction's result...
    await sessions.report(session, [], healthy=True)  # ...applied: the worker holds nothing
    await sessions.heartbeat(session, ["adp_x"], True, [], 0, commands_done=0)  # measured before that result
    await reconciler.converge_if_drifted(session)
    assert session.record.resident == []
    await sessions.heartbeat(session, ["adp_x"], True, [], 0, commands_done=1)  # measured after: believed
    await reconciler.converge_if_drifted(session)
    assert session.record.resident == ["adp_x"]
    if session.reconciling:
        await asyncio.wait_for(session.reconciling, 5)
    await client.aclose()


async def test_a_crash_looping_engine_is_unhealthy_with_its_last_error(redis_server: RedisServer) -> None:
    """What the agent says of its engine reaches the worker's record (and the gauge of engine
    states): a crash loop registers unhealthy, each restart is written, serving makes it healthy."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(client)
    sessions = Sessions(store, "cp-test", 5, 10)
    oom = "torch.OutOfMemoryError: CUDA out of memory"
    crash_loop = pb.EngineStatus(state="crash_loop", last_error=oom, restarts=3)
    register = pb.Register(worker_id="loop-w", base_model="engine-m", endpoint="http://w", max_adapters=8,
                           engine=crash_loop)  # fmt: skip
    session = await sessions.attach(register)
    stored = await store.get_worker("loop-w")
    assert stored is not None and not stored.healthy
    assert (stored.engine_state, stored.engine_error, stored.engine_restarts) == ("crash_loop", oom, 3)
    assert (await store.activity(["loop-w"]))["loop-w"].owner == "cp-test"
    assert telemetry.ENGINES.values[("engine-m", "crash_loop")] == 1

    crash_loop.restarts = 4  # nothing else changed: still written
    await sessions.heartbeat(session, [], False, [], engine=crash_loop)
    stored = await store.get_worker("loop-w")
    assert stored is not None and stored.engine_restarts == 4

    serving = pb.EngineStatus(state="serving", restarts=4)
    await sessions.heartbeat(session, [], True, [], engine=serving)
    stored = await store.get_worker("loop-w")
    assert stored is not None and stored.healthy
    assert (stored.engine_state, stored.engine_error, stored.engine_restarts) == ("serving", "", 4)
    assert telemetry.ENGINES.values[("engine-m", "crash_loop")] == 0
    assert telemetry.ENGINES.values[("engine-m", "serving")] == 1

    await sessions.heartbeat(session, [], True, [], engine=pb.EngineStatus(state="hung", restarts=4))
    assert session.record.engine_state == "hung" and not session.record.healthy  # whatever `healthy` said
    await sessions.detach(session)
    assert telemetry.ENGINES.values[("engine-m", "hung")] == 0
    await client.aclose()
