"""Agent sessions: what workers report, against a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

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
