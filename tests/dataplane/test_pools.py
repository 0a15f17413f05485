"""A dedicated tenant's pool, as the data plane routes it: the tenant's requests go only to its
pool's workers, nobody else's ever do; its pool down is a 503 that says so, or the shared workers
when it may spill over. The data plane runs in this process against a real Redis, whose routing
table the test writes as the control plane would; the workers are one vLLM simulator under two ids."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as redis

from loraplane.state import keys
from loraplane.state.messages import TenantChanged
from loraplane.state.records import WorkerRecord
from tests.dataplane.test_inference import DB, PATH, dataplane, until
from tests.support import RedisServer, start_simulator

OTHER_KEY = "lp_pool-test-other-key"


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    sim, url, _ = start_simulator("tiny-llama")
    yield url
    sim.terminate()
    sim.wait(10)


async def test_a_pool_serves_its_tenant_alone(
    redis_server: RedisServer, tmp_path: Path, simulator: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loraplane.access")
    async with dataplane(redis_server, tmp_path, {"w1": simulator, "w2": simulator}) as owner:
        r = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{DB}", decode_responses=True)
        await r.hset(keys.apikey(hashlib.sha256(OTHER_KEY.encode()).hexdigest()), "tenant_id", "t2")
        await r.hset(keys.tenant("t2"), mapping={"id": "t2", "name": "t2", "tier": "shared", "created_at": "0"})
        other = {"Authorization": f"Bearer {OTHER_KEY}"}

        async def routing_changed() -> None:
            version = await r.incr(keys.ROUTING_VERSION)
            await r.publish(keys.ROUTING_CHANNEL, str(version))

        async def served(n: int, headers: dict[str, str] | None = None) -> Counter[tuple[int, str]]:
            caplog.clear()
            for _ in range(n):
                body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
                await owner.post(PATH, json=body, headers=headers)

            async def logged() -> bool:
                return len([x for x in caplog.records if x.name == "loraplane.access"]) >= n

            await until(logged)
            return Counter((x.status, x.worker_id) for x in caplog.records if x.name == "loraplane.access")  # type: ignore[attr-defined]

        try:
            assert await served(3) == Counter({(200, "w1"): 3})  # both shared: idle, the first by id
            await r.hset(keys.POOLS, "w2", "t1")  # w2 joins t1's pool
            await routing_changed()

            async def pooled() -> bool:
                return set(await served(1)) == {(200, "w2")}

            await until(pooled)
            assert await served(6) == Counter({(200, "w2"): 6})  # t1's requests: its pool only
            assert await served(6, other) == Counter({(200, "w1"): 6})  # the others': never there

            pool_worker = WorkerRecord("w2", "tiny-llama", simulator, 8, healthy=False)  # its pool down
            await r.set(keys.worker("w2"), pool_worker.to_json())
            await routing_changed()
            caplog.clear()
            refused = []

            async def down() -> bool:
                body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
                refused.append(await owner.post(PATH, json=body))
                return refused[-1].status_code != 200

            await until(down)
            assert refused[-1].status_code == 503 and "dedicated" in refused[-1].json()["error"]["message"]
            assert {x.worker_id for x in caplog.records if x.name == "loraplane.access"} <= {"w2", ""}  # type: ignore[attr-defined]
            assert "spill-over" in refused[-1].json()["error"]["message"]

            await r.hset(keys.tenant("t1"), "spill", "1")  # may spill over: the shared workers serve it
            await r.publish(keys.INVALIDATE_CHANNEL, TenantChanged("t1").encode())

            async def spills() -> bool:
                body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
                return (await owner.post(PATH, json=body)).status_code == 200

            await until(spills)
            assert await served(3) == Counter({(200, "w1"): 3})

            await r.set(keys.worker("w2"), replace(pool_worker, healthy=True).to_json())  # back: its pool again
            await routing_changed()
            await until(pooled)
        finally:
            await r.aclose()
