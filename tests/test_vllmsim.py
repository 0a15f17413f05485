"""The vLLM simulator the fault tests run as workers' engines must refuse what vLLM refuses."""

from __future__ import annotations

import asyncio

import httpx

from tests.vllmsim import SimConfig, create_app


async def test_concurrent_loads_never_take_more_slots_than_max_loras() -> None:
    app = create_app(SimConfig(max_loras=2, load_ms_base=50))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as sim:
        answers = await asyncio.gather(
            *(sim.post("/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": "/none"}) for i in range(4))
        )
        assert sorted(r.status_code for r in answers) == [200, 200, 400, 400]
        assert len((await sim.get("/sim/state")).json()["adapters"]) == 2
