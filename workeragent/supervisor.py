"""Keeping the engine up: one life at a time, each watched until it exits or hangs, then
reaped whole before the next starts; backoff and a crash-loop state for an engine that keeps
failing; the state and the engine's last error line for the agent to report.

Liveness: an engine is alive while it answers `/health` and makes progress: its token
counters move, or (idle) a one-token probe completes. vLLM's `/health` alone answers 200 while
its engine core is stopped or wedged, so progress is what tells.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplane import metrics
from loraplane.state.records import CRASH_LOOP, ENGINE_STATES, HUNG, RESTARTING, SERVING, STARTING
from workeragent import gpu
from workeragent.engine import Engine, cpu_seconds
from workeragent.vllm import VllmClient

log = logging.getLogger(__name__)
CRASH_LOOP_AFTER = 3  # consecutive lives that never served `stable_s`
BUSY_CPU_SHARE = 0.1  # an engine using this share of a core (or more) is working, not hung


@dataclass(frozen=True)
class Timing:
    probe_s: float = 1.0  # between liveness checks
    hang_s: float = 6.0  # no sign of life this long: hung
    stable_s: float = 30.0  # a life that served this long was not a crash
    backoff_cap_s: float = 60.0
    stop_grace_s: float = 10.0  # SIGTERM to SIGKILL when the agent stops the engine
    exit_grace_s: float = 2.0  # the same for what is left of an engine whose API server exited
    gpu_release_s: float = 60.0  # most to wait for the GPUs to be free before the next start
    startup_s: float = 300.0  # most a life may take to answer for the first time


class Supervisor:
    def __init__(
        self,
        engine: Engine,
        client: VllmClient,
        served_model: str,
        timing: Timing,
        registry: metrics.CollectorRegistry,
        worker_id: str,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self._client = client
        self._model = served_model
        self._t = timing
        self._changed = changed
        self.state = STARTING
        self.last_error = ""
        self.restarts = 0
        self.failures = 0  # consecutive lives that did not serve `stable_s`
        self.commands = 0  # the agent's load and unload calls in flight on the engine
        self.answering = False  # the last /health check's result (once a second)
        self._served_since: float | None = None
        self._worker = worker_id
        self._restarts = metrics.Counter(
            registry, "loraplane_worker_engine_restarts_total", "Engine restarts, by why.", ("worker", "reason")
        )
        self._reaped = metrics.Counter(
            registry,
            "loraplane_worker_engine_processes_reaped_total",
            "Processes of ended engines the agent killed (an engine core left behind is one).",
            ("worker",),
        )
        metrics.Sampled(
            registry,
            "loraplane_worker_engine_state",
            "1 for the engine's current state (serving, starting, hung, restarting, crash_loop).",
            ("worker", "state"),
            lambda: {(worker_id, s): float(s == self.state) for s in ENGINE_STATES},
        )

    @property
    def serving(self) -> bool:
        """Serving and answering its health check when last asked (a second ago at most)."""
        return self.state == SERVING and self.answering

    def _set(self, state: str) -> None:
        if state != self.state:
            log.info("engine: %s -> %s", self.state, state, extra={"engine_state": state})
            self.state = state
            self._changed()

    async def run(self) -> None:
        """Start (or adopt) the engine and keep it up until cancelled."""
        adopted = await self._adopt()
        while True:
            self._served_since = None
            try:
                if not adopted:
                    await self.engine.start()
                adopted = False
                reason, hung = await self._watch()
            except OSError as err:  # the command cannot run (a wrong LORAPLANE_VLLM_COMMAND): a failed life
                reason, hung = f"could not be started: {err}", False
            except Exception as err:  # this loop keeps the engine up: it must outlive any one failure
                log.exception("supervising the engine failed")
                reason, hung = f"was given up on after an error in its agent: {err}", False
            await self._end_life(reason, hung)
            delay = min(self._t.backoff_cap_s, 2.0 ** (self.failures - 1)) if self.failures else 0.0
            log.error("engine %s; starting again in %.0fs", reason, delay)
            await asyncio.sleep(delay)
            self.restarts += 1
            self._restarts.inc(self._worker, "hung" if hung else "exited")

    async def _adopt(self) -> bool:
        """Whether a previous agent's engine serves and is now this agent's; one that does not
        answer is ended first, so that nothing of it is left when the next one starts."""
        previous = self.engine.previous()
        if previous is None:
            return False
        self.engine.adopt(previous)
        if self.engine.running() and await self._client.healthy():
            return True
        log.warning("the previous agent's engine (pid %d) does not answer: ending it", previous.pgid)
        await self._reap(self._t.exit_grace_s)
        return False

    async def stop(self) -> None:
        await self.engine.reap(self._t.stop_grace_s)

    async def _watch(self) -> tuple[str, bool]:
        """Until the current life ends: why, and whether it hung (rather than exited).

        Hung: `/health` unanswered for `hang_s` (the API server), or no progress for `hang_s`
        (the engine): its token counters still, no one-token probe completed, and its engine
        processes not computing (a long step, a first compile, is progress: it uses the CPU; a
        stopped or deadlocked engine does not)."""
        began = answered = progressed = time.monotonic()
        self._set(CRASH_LOOP if self.failures >= CRASH_LOOP_AFTER else STARTING)
        tokens: float | None = None
        cpu = self._engine_cpu()
        probe: asyncio.Task[float | None] | None = None  # its result: when it completed
        try:
            while True:
                self.engine.log.follow()
                if not self.engine.running():
                    code = await self.engine.wait()
                    return (f"exited with code {code}" if code is not None else "exited"), False
                # Each check within half the hang time, both at once: a verdict is never late by much.
                wait = self._t.hang_s / 2
                checked = time.monotonic()
                healthy, counted = await asyncio.gather(self._client.healthy(wait), self._client.tokens(wait))
                self.answering = healthy
                now, was, cpu = time.monotonic(), cpu, self._engine_cpu()
                if healthy:
                    answered = now
                if self._served_since is None:  # not answered yet in this life
                    if healthy:
                        self._served_since = progressed = now
                        if self.state != CRASH_LOOP:
                            self._set(SERVING)
                    elif now - began > self._t.startup_s:
                        return f"did not answer within {self._t.startup_s:.0f}s of starting", True
                    await asyncio.sleep(self._t.probe_s)
                    continue
                computing = cpu - was >= BUSY_CPU_SHARE * (now - checked + self._t.probe_s)
                # a LoRA load may hold the engine's loop a while
                if (counted is not None and counted != tokens) or computing or self.commands:
                    tokens, progressed = counted, now
                if probe is not None and probe.done():
                    progressed = max(progressed, probe.result() or 0.0)
                    probe = None
                if probe is None and now - progressed > self._t.hang_s / 3:
                    probe = asyncio.create_task(self._probe())
                if now - answered > self._t.hang_s:
                    return f"hung: no answer to its health check for {self._t.hang_s:.0f}s", True
                if now - progressed > self._t.hang_s:
                    return (
                        f"hung: no progress, no CPU use and no answer to a one-token probe for {self._t.hang_s:.0f}s",
                        True,
                    )
                if self.state == CRASH_LOOP and now - self._served_since >= self._t.stable_s:
                    self.failures = 0
                    self._set(SERVING)
                if self.last_error and now - self._served_since >= self._t.stable_s:
                    self.last_error = ""
                    self._changed()
                await asyncio.sleep(self._t.probe_s)
        finally:
            if probe is not None:
                probe.cancel()

    def _engine_cpu(self) -> float:
        return cpu_seconds(self.engine.group) if self.engine.group else 0.0

    async def _probe(self) -> float | None:
        """When the engine completed a one-token request, if it did within the hang time."""
        return time.monotonic() if await self._client.probe(self._model, self._t.hang_s) else None

    async def _end_life(self, reason: str, hung: bool) -> None:
        served = self._served_since is not None and time.monotonic() - self._served_since >= self._t.stable_s
        self.failures = 0 if served else self.failures + 1
        self.engine.log.follow()
        self.last_error = (reason if hung else self.engine.log.last_error or f"vLLM {reason}")[:500]
        if self.failures >= CRASH_LOOP_AFTER:
            self._set(CRASH_LOOP)
        else:
            self._set(HUNG if hung else RESTARTING)
        self._changed()  # the error line, even when the state stays the same
        # A hung engine gets no grace: it would not act on SIGTERM.
        await self._reap(0.0 if hung else self._t.exit_grace_s, signal.SIGKILL if hung else signal.SIGTERM)

    async def _reap(self, grace_s: float, sig: int = signal.SIGTERM) -> None:
        ended = await self.engine.reap(grace_s, sig)
        if ended:
            log.warning("ended %d engine processes: %s", len(ended), ended)
            self._reaped.inc(self._worker, by=len(ended))
        await gpu.wait_released(self._t.gpu_release_s)
