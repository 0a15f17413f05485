"""The supervisor's bookkeeping, in process, with engines that cannot run or exit at once (real
processes; no vLLM needed): crash loops, backoff, the error line, the restart count."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from loraplane import metrics
from loraplane.state.records import CRASH_LOOP
from tests.support import free_port
from workeragent.engine import Engine
from workeragent.supervisor import Supervisor, Timing
from workeragent.vllm import VllmClient

FAST = Timing(probe_s=0.05, hang_s=1, stable_s=1, backoff_cap_s=0.1, exit_grace_s=0.2, gpu_release_s=0)


async def supervise(tmp_path: Path, command: list[str], until: float = 10) -> Supervisor:
    """A supervisor of `command`, run until it reports a crash loop (or `until` seconds)."""
    async with aiohttp.ClientSession() as http:
        client = VllmClient(f"http://127.0.0.1:{free_port()}", "", "", http)
        engine = Engine(command, os.environ, tmp_path / "vllm.pid", tmp_path / "vllm.log")
        changes: list[str] = []
        sup = Supervisor(engine, client, "m", FAST, metrics.CollectorRegistry(), "w", lambda: changes.append(sup.state))
        task = asyncio.create_task(sup.run())
        try:
            async with asyncio.timeout(until):
                while sup.state != CRASH_LOOP:
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sup.stop()
        assert changes, "every change of state was announced"
        return sup


async def test_an_engine_that_dies_at_start_is_a_crash_loop_with_its_error_line(tmp_path: Path) -> None:
    code = "import sys; print('ValueError: No available memory for the cache blocks.', file=sys.stderr); sys.exit(1)"
    sup = await supervise(tmp_path, [sys.executable, "-c", code])
    assert sup.last_error == "ValueError: No available memory for the cache blocks."
    assert sup.restarts >= 2 and sup.failures >= 3 and not sup.serving


async def test_a_command_that_cannot_run_is_a_crash_loop_too(tmp_path: Path) -> None:
    sup = await supervise(tmp_path, [str(tmp_path / "no-such-vllm")])
    assert sup.last_error.startswith("vLLM could not be started: [Errno 2] No such file or directory")
