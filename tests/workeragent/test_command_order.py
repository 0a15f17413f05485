from __future__ import annotations

import asyncio

from workeragent.agent import CommandOrder


async def test_commands_for_one_adapter_run_one_at_a_time_and_older_ones_are_stale() -> None:
    order = CommandOrder()
    log: list[str] = []

    async def command(name: str, generation: int, hold: float) -> bool:
        async with order.turn(name):
            if order.stale(name, generation):
                log.append(f"{name}@{generation} stale")
                return False
            log.append(f"{name}@{generation} start")
            await asyncio.sleep(hold)
            log.append(f"{name}@{generation} end")
            order.applied(name, generation)
            return True

    # An evict (generation 5) that started first, then a load generated before it (4), and
    # meanwhile another adapter's command, which does not wait for either.
    results = await asyncio.gather(command("a", 5, 0.05), command("a", 4, 0), command("b", 1, 0))
    assert list(results) == [True, False, True]
    assert log == ["a@5 start", "b@1 start", "b@1 end", "a@5 end", "a@4 stale"]
    assert await command("a", 6, 0)  # newer: applied
    assert order._locks == {}  # nothing kept for idle adapters
