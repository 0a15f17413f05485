"""The engine process (vLLM's OpenAI server) as the operating system sees it: started as the
leader of a process group and session of its own, its output in a log file, and reaped whole.

vLLM runs its engine core in a child process that ignores SIGTERM and outlives a killed API
server (as an orphan, holding its memory; on a GPU node, the GPU memory a restarted engine
needs). So the unit the agent starts, watches and stops is the whole group: `reap` ends every
process in it, SIGKILL after a grace, and returns once none is left. The pid file records the
group with its leader's start time, so a restarted agent recognises its predecessor's engine
(and a reused pid is never taken for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
LOG_KEEP_BYTES = 64 << 20  # the engine's log file is cut back to nothing past this size
# The lines worth reporting as the reason an engine failed: vLLM's ERROR/CRITICAL records, the
# last line of a Python traceback ("SomeError: …"), argparse's "prog: error: …".
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|\b\w*(Error|Exception)\b:|: error:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Group:
    """An engine's process group: its leader's pid (= the group's and the session's id) and the
    leader's start time (clock ticks since boot, /proc/PID/stat field 22)."""

    pgid: int
    started: int

    def encode(self) -> str:
        return f"{self.pgid} {self.started}\n"

    @classmethod
    def decode(cls, text: str) -> Group | None:
        parts = text.split()
        try:
            return cls(int(parts[0]), int(parts[1]))
        except (IndexError, ValueError):
            return None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def members(group: Group) -> list[int]:
    """Live processes of the group: in its process group or its session (a child that left the
    group with setpgid stays in the session), and, in an agent that is a subreaper, orphans
    that left the session too (they became the agent's children); zombies excluded."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid, fields = int(entry.name), _stat(int(entry.name))
        if not fields or fields[0] == "Z":
            continue
        escaped = _subreaper and int(fields[1]) == me and pid != group.pgid
        if group.pgid in (int(fields[2]), int(fields[3])) or escaped:
            found.append(pid)
    return sorted(found)


def cpu_seconds(group: Group) -> float:
    """CPU time the group's processes other than its leader (vLLM's engine core and its
    workers; the API server answers the agent's own checks) have used, in seconds."""
    ticks = 0
    for pid in members(group):
        fields = _stat(pid) if pid != group.pgid else None
        if fields:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


_subreaper = False  # this process collects its descendants' orphans (the agent does)


def become_subreaper() -> None:
    """Orphans of the agent's descendants (an engine child that escaped its group and session
    with setsid) become the agent's children rather than init's: `members` finds them, and
    the agent's only children are its engine's."""
    global _subreaper
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _subreaper = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _reap_zombie(pid: int) -> None:
    """Collect the exit of a process reparented to this one (see `become_subreaper`)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


async def kill_group(group: Group, grace_s: float, sig: int = signal.SIGTERM) -> list[int]:
    """Every process of the group gone: `sig` to all, SIGKILL to any left after `grace_s`.
    Returns the pids that were alive when it began."""
    found = members(group)
    if not found:
        return []
    deadline = time.monotonic() + grace_s
    _signal(group, found, sig)
    while left := members(group):
        if time.monotonic() > deadline and sig != signal.SIGKILL:
            log.warning("engine processes %s still alive %.0fs after SIGTERM: SIGKILL", left, grace_s)
            sig = signal.SIGKILL
            _signal(group, left, sig)
        await asyncio.sleep(0.05)
    for pid in found:  # the leader is asyncio's to collect, or not this process's child
        if pid != group.pgid:
            _reap_zombie(pid)
    return found


def _signal(group: Group, pids: Sequence[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group.pgid, sig)
    for pid in pids:  # those that left the group but not the session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class EngineLog:
    """The engine's output file: the agent copies it to its own stderr as it grows (so the
    engine's lines are where the agent's are) and remembers the last error line."""

    def __init__(self, path: Path, echo: bool = True) -> None:
        self.path = path
        self._echo = echo
        self._pos = 0
        self._partial = b""
        self.last_error = ""

    def open_for_engine(self) -> int:
        """A fresh file for a new engine life (the previous one kept as `.1`); its fd, in
        append mode so that `follow` can cut it back while the engine writes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._pos, self._partial, self.last_error = 0, b"", ""
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def skip_to_end(self) -> None:
        """For an adopted engine: what it logged before this agent started was copied already."""
        with contextlib.suppress(OSError):
            self._pos = self.path.stat().st_size

    def follow(self) -> None:
        """Read what the engine wrote since the last call."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._pos:  # cut back (by this agent or by hand)
                    self._pos = 0
                f.seek(self._pos)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return
        self._pos += len(data)
        if not data:
            return
        if self._echo:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.buffer.write(data)
                sys.stderr.buffer.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).strip()
            if _ERROR_LINE.search(line):
                self.last_error = line[-500:]
        if self._pos > LOG_KEEP_BYTES:
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
            self._pos = 0


class Engine:
    """One engine life at a time: `start`, `wait`, `reap`; `adopt` a predecessor's."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], pidfile: Path, log_path: Path) -> None:
        self.args = list(args)
        self._env = dict(env)
        self._pidfile = pidfile
        self.log = EngineLog(log_path)
        self.proc: asyncio.subprocess.Process | None = None
        self.group: Group | None = None

    @property
    def pid(self) -> int | None:
        return self.group.pgid if self.group else None

    async def start(self) -> None:
        fd = self.log.open_for_engine()
        try:
            log.info("starting vLLM: %s", " ".join(self.args))
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, env=self._env, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(fd)
        self.group = Group(self.proc.pid, start_time(self.proc.pid) or 0)
        self._pidfile.parent.mkdir(parents=True, exist_ok=True)
        self._pidfile.write_text(self.group.encode())

    def previous(self) -> Group | None:
        """The group the pid file names, if any process of it is alive and the file is not
        older than its leader's pid (a live leader must have the start time recorded)."""
        with contextlib.suppress(OSError):
            group = Group.decode(self._pidfile.read_text())
            if group is not None and members(group):
                leader_started = start_time(group.pgid)
                if leader_started is None or leader_started == group.started:
                    return group
        return None

    def adopt(self, group: Group) -> None:
        """Watch a predecessor's engine as this agent's own (the agent died, the engine did not)."""
        self.proc, self.group = None, group
        self.log.skip_to_end()
        log.info("adopted the running vLLM (pid %d)", group.pgid)

    def running(self) -> bool:
        """Whether the engine's API server (the group's leader) is alive."""
        if self.proc is not None:
            return self.proc.returncode is None
        return self.group is not None and alive(self.group.pgid)

    async def wait(self) -> int | None:
        """Until the API server exits: its exit code, or None for an adopted one (not our child)."""
        if self.proc is not None:
            return await self.proc.wait()
        while self.running():
            await asyncio.sleep(0.5)
        return None

    async def reap(self, grace_s: float, sig: int = signal.SIGTERM) -> list[int]:
        """Every process of the current engine gone (see `kill_group`); the pids it ended."""
        if self.group is None:
            return []
        ended = await kill_group(self.group, grace_s, sig)
        if self.proc is not None:
            await self.proc.wait()
        self.log.follow()
        self._pidfile.unlink(missing_ok=True)
        return ended
