from __future__ import annotations

import asyncio

import redis.asyncio as redis

from controlplane.fleet import Fleet
from controlplane.peers import Peers
from controlplane.store import Store
from loraplane.controlplane.v1 import worker_pb2 as pb
from tests.support import RedisServer


async def test_a_heartbeat_measured_before_an_applied_result_does_not_undo_it(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    fleet = Fleet(Store(client), 5, "cp-test", Peers("t" * 32, 5))
    register = pb.Register(worker_id="hb-w", base_model="m", endpoint="http://w", max_adapters=8, resident=["adp_x"])
    session = await fleet.attach(register)
    session.resolve(pb.CommandResult(command_id="c1", ok=True))  # an eviction's result...
    await fleet.report(session, [], healthy=True)  # ...applied: the worker holds nothing
    await fleet.heartbeat(session, ["adp_x"], True, [], 0, commands_done=0)  # measured before that result
    assert session.record.resident == []
    await fleet.heartbeat(session, ["adp_x"], True, [], 0, commands_done=1)  # measured after: believed
    assert session.record.resident == ["adp_x"]
    if session.reconciling:
        await asyncio.wait_for(session.reconciling, 5)
    await client.aclose()
