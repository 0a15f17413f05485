"""The supervisor's bookkeeping, in process, with engines that cannot run or exit at once (real
processes; no vLLM needed): crash loops, backoff, the error line, the restart count; and an
engine (the vLLM simulator) recycled on purpose."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp

from loraplane import metrics
from loraplane.state.records import CRASH_LOOP, RECYCLING
from tests.support import ROOT, free_port, unmeasured_env
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


async def test_a_recycled_engine_restarts_at_once_and_never_counts_as_a_crash(tmp_path: Path) -> None:
    """Recycling ends a serving life on purpose: out of service at once, restarted with no
    backoff, its reason as the error line, counted as `recycled`; lives that never served
    `stable_s` end this way three times over and the engine is still no crash loop."""
    port = free_port()
    command = [sys.executable, str(ROOT / "tests" / "vllmsim.py"), "--port", str(port)]
    timing = replace(FAST, hang_s=5, stable_s=60)  # no life here is stable
    registry = metrics.CollectorRegistry()
    async with aiohttp.ClientSession() as http:
        client = VllmClient(f"http://127.0.0.1:{port}", "", "", http)
        engine = Engine(command, unmeasured_env(), tmp_path / "vllm.pid", tmp_path / "vllm.log")
        sup = Supervisor(engine, client, "tiny-llama", timing, registry, "w")
        task = asyncio.create_task(sup.run())
        try:
            for n in range(1, 4):
                async with asyncio.timeout(30):
                    while not sup.serving:
                        await asyncio.sleep(0.02)
                group = engine.group
                assert sup.recycle(f"slots leaked ({n})", drain_s=5)
                assert (sup.state, sup.serving, sup.last_error) == (RECYCLING, False, f"slots leaked ({n})")
                assert not sup.recycle("again", drain_s=5)  # once per life
                async with asyncio.timeout(30):
                    while sup.restarts < n:
                        await asyncio.sleep(0.02)
                assert engine.group != group and sup.failures == 0 and sup.state != CRASH_LOOP
            async with asyncio.timeout(30):
                while not sup.serving:
                    await asyncio.sleep(0.02)
            assert sup.last_error == "slots leaked (3)"  # until the engine has served `stable_s`
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sup.stop()
    page = metrics.render(registry).decode()
    assert 'loraplane_worker_engine_restarts_total{reason="recycled",worker="w"} 3.0' in page


async def test_only_a_serving_engine_is_recycled(tmp_path: Path) -> None:
    code = "import sys; print('ValueError: no memory', file=sys.stderr); sys.exit(1)"
    sup = await supervise(tmp_path, [sys.executable, "-c", code])
    assert not sup.recycle("slots leaked", drain_s=1)
    assert sup.state == CRASH_LOOP
