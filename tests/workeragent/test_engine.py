"""The engine as processes (`workeragent/engine.py`): whole groups reaped, a predecessor's
group recognised, the last error line found. Real processes throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, wait_for
from tests.vllmsim import ENGINE_CORE
from workeragent.engine import Engine, EngineLog, Group, cpu_seconds, members, start_time

# An API server that starts an engine core (which ignores SIGTERM) and then serves for ever.
SERVER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {ENGINE_CORE!r}]); time.sleep(3600)"


def engine(tmp_path: Path, code: str = SERVER) -> Engine:
    return Engine([sys.executable, "-c", code], os.environ, tmp_path / "vllm.pid", tmp_path / "vllm.log")


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Whatever a failed test leaves is killed."""
    yield
    for group in STARTED:
        for pid in members(group):
            os.kill(pid, signal.SIGKILL)
    STARTED.clear()


STARTED: list[Group] = []


async def started(tmp_path: Path) -> tuple[Engine, Group]:
    e = engine(tmp_path)
    await e.start()
    assert e.group is not None
    group = e.group
    STARTED.append(group)
    await asyncio.to_thread(wait_for, lambda: len(members(group)) == 2, 10, "the engine core")
    return e, group


async def test_reap_ends_an_engine_core_left_by_a_killed_api_server(tmp_path: Path) -> None:
    e, group = await started(tmp_path)
    os.kill(group.pgid, signal.SIGKILL)  # as `kill -9` of vLLM's API server
    assert await e.wait() == -signal.SIGKILL
    core = members(group)
    assert len(core) == 1, "the engine core outlives its API server"
    ended = await e.reap(grace_s=0.5)
    assert ended == core
    assert members(group) == []
    assert not (tmp_path / "vllm.pid").exists()


async def test_reap_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    e, group = await started(tmp_path)
    ended = await e.reap(grace_s=0.3)
    assert len(ended) == 2 and members(group) == []


async def test_a_predecessors_group_is_recognised_and_a_reused_pid_is_not(tmp_path: Path) -> None:
    e, group = await started(tmp_path)
    successor = engine(tmp_path)
    assert successor.previous() == group
    (tmp_path / "vllm.pid").write_text(Group(group.pgid, group.started + 1).encode())  # another process's pid
    assert successor.previous() is None
    (tmp_path / "vllm.pid").write_text(group.encode())
    successor.adopt(group)
    assert successor.running()
    await successor.reap(grace_s=0.3)
    assert members(group) == [] and not successor.running()
    await e.wait()


async def test_a_group_whose_leader_died_is_still_recognised(tmp_path: Path) -> None:
    e, group = await started(tmp_path)
    os.kill(group.pgid, signal.SIGKILL)
    await e.wait()
    successor = engine(tmp_path)
    assert successor.previous() == group  # the orphaned engine core: reaped before a new start
    successor.adopt(group)
    assert not successor.running()
    await successor.reap(grace_s=0.3)
    assert members(group) == []


def test_start_time_is_the_kernels(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t = start_time(proc.pid)
        assert t is not None and t > 0 and start_time(os.getpid()) is not None
    finally:
        proc.kill()
        proc.wait()
    assert start_time(proc.pid) is None


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        # vLLM's own records and a traceback's last line: the traceback wins, being later
        (
            [
                "INFO 11-30 13:00:00 [api_server.py:100] vLLM API server version 0.32.0",
                "(EngineCore_DP0 pid=42) ERROR 11-30 13:00:05 [core.py:700] EngineCore failed to start.",
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            ],
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (
            ["usage: api_server.py [-h] ...", "api_server.py: error: argument --max-loras: invalid int value: 'x'"],
            "api_server.py: error: argument --max-loras: invalid int value: 'x'",
        ),
        (["\x1b[1;31mERROR\x1b[0m 11-30 13:00:05 [core.py:1] boom"], "ERROR 11-30 13:00:05 [core.py:1] boom"),
        (["INFO all is well", "WARNING a warning"], ""),
    ],
)
def test_the_last_error_line(tmp_path: Path, lines: list[str], error: str) -> None:
    log = EngineLog(tmp_path / "vllm.log", echo=False)
    fd = log.open_for_engine()
    os.write(fd, "".join(line + "\n" for line in lines).encode())
    os.close(fd)
    log.follow()
    assert log.last_error == error


def test_a_new_life_gets_a_new_log_and_keeps_the_last(tmp_path: Path) -> None:
    log = EngineLog(tmp_path / "vllm.log", echo=False)
    os.close(log.open_for_engine())
    (tmp_path / "vllm.log").write_text("ERROR first life\n")
    log.follow()
    assert log.last_error == "ERROR first life"
    os.close(log.open_for_engine())
    assert log.last_error == ""
    assert (tmp_path / "vllm.log.1").read_text() == "ERROR first life\n"


# In its own process (the agent's role: a subreaper): an engine whose child leaves its group and
# session (setsid) before the API server is killed; the reap still ends it.
ESCAPE = """
import asyncio, os, signal, sys, time
from pathlib import Path
from workeragent.engine import Engine, become_subreaper, members, alive

tmp = Path(sys.argv[1])
child = "import os, time; os.setsid(); open(%r, 'w').write(str(os.getpid())); time.sleep(3600)" % str(tmp / "escapee")
server = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(3600)"

async def main() -> None:
    become_subreaper()
    e = Engine([sys.executable, "-c", server], os.environ, tmp / "vllm.pid", tmp / "vllm.log")
    await e.start()
    while not (tmp / "escapee").exists() or not (tmp / "escapee").read_text():
        await asyncio.sleep(0.05)
    escapee = int((tmp / "escapee").read_text())
    os.kill(e.group.pgid, signal.SIGKILL)
    await e.wait()
    while os.getppid() and Path(f"/proc/{escapee}/stat").read_text().rpartition(")")[2].split()[1] != str(os.getpid()):
        await asyncio.sleep(0.05)  # reparented to this process
    assert escapee in members(e.group)
    await e.reap(grace_s=0.2)
    print("escapee left:", alive(escapee))

asyncio.run(main())
"""


def test_a_child_that_left_the_session_is_reaped_by_a_subreaper_agent(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", ESCAPE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.stdout.strip() == "escapee left: False", run.stderr


async def test_an_engine_that_computes_uses_cpu_and_a_stopped_one_does_not(tmp_path: Path) -> None:
    """What tells a long engine step (a first compile, a big prefill) from a stopped engine."""
    e = engine(tmp_path, SERVER.replace(repr(ENGINE_CORE), repr("while True: pass")))
    await e.start()
    assert e.group is not None
    STARTED.append(e.group)
    group = e.group
    await asyncio.to_thread(wait_for, lambda: len(members(group)) == 2, 10, "the engine core")
    before = cpu_seconds(group)
    await asyncio.sleep(0.5)
    assert cpu_seconds(group) - before > 0.1  # the leader, which only sleeps, is not counted either way
    (core,) = [p for p in members(group) if p != group.pgid]
    os.kill(core, signal.SIGSTOP)
    await asyncio.sleep(0.1)
    stopped = cpu_seconds(group)
    await asyncio.sleep(0.5)
    assert cpu_seconds(group) - stopped < 0.02
    await e.reap(grace_s=0.2)
