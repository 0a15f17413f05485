"""Keeping the engine up: one life at a time, each watched until it exits or hangs (or the agent
recycles it), then reaped whole before the next starts; backoff and a crash-loop state for an
engine that keeps failing; the state and the engine's last error line for the agent to report.

Liveness: an engine is alive while it answers `/health` and makes progress: its token
counters move, or (idle) a one-token probe completes. vLLM's `/health` alone answers 200 while
its engine core is stopped or wedged, so progress is what tells.

Recycling: an engine that serves but must be restarted (its LoRA slots leaked) leaves service at
once, finishes its requests in flight, then is restarted like a crashed one, without backoff and
without counting towards a crash loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from loraplane import metrics
from loraplane.state.records import CRASH_LOOP, ENGINE_STATES, HUNG, RECYCLING, RESTARTING, SERVING, STARTING
from workeragent import gpu
from workeragent.engine import Engine, cpu_seconds
from workeragent.vllm import VllmClient, VllmError

log = logging.getLogger(__name__)
CRASH_LOOP_AFTER = 3  # consecutive lives that never served `stable_s`
BUSY_CPU_SHARE = 0.1  # an engine using this share of a core (or more) is working, not hung
# Why a life ended (the `reason` label of the restarts counter).
ENDINGS = EXITED, STUCK, RECYCLED = ("exited", "hung", "recycled")
# A recycled engine counts its requests in flight only this long after it left service: time
# for the routing change to reach the data planes, and for requests already sent to arrive.
RECYCLE_SETTLE_S = 1.0


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


@dataclass(frozen=True)
class _Recycle:
    reason: str
    since: float  # when the engine left service (monotonic)
    deadline: float  # when it is restarted whatever it still runs


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
        self._recycle: _Recycle | None = None  # set: the current life ends once its requests finish
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
            "1 for the engine's current state (serving, starting, hung, restarting, crash_loop, recycling).",
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
                reason, ending = await self._watch()
            except OSError as err:  # the command cannot run (a wrong LORAPLANE_VLLM_COMMAND): a failed life
                reason, ending = f"could not be started: {err}", EXITED
            except Exception as err:  # this loop keeps the engine up: it must outlive any one failure
                log.exception("supervising the engine failed")
                reason, ending = f"was given up on after an error in its agent: {err}", EXITED
            await self._end_life(reason, ending)
            self._recycle = None
            delay = min(self._t.backoff_cap_s, 2.0 ** (self.failures - 1)) if self.failures else 0.0
            delay = 0.0 if ending == RECYCLED else delay
            (log.warning if ending == RECYCLED else log.error)("engine %s; starting again in %.0fs", reason, delay)
            await asyncio.sleep(delay)
            self.restarts += 1
            self._restarts.inc(self._worker, ending)

    def recycle(self, reason: str, drain_s: float) -> bool:
        """End a serving engine's life on purpose (`reason`: why, reported as its error line): it
        leaves service at once (RECYCLING: no new requests, no placements), finishes its requests
        in flight (for at most `drain_s`), then is restarted at once, as no failure. False when it
        does not serve now (it is not taking work anyway) or is being recycled already."""
        if self.state != SERVING or self._recycle is not None:
            return False
        now = time.monotonic()
        self._recycle = _Recycle(reason, now, now + drain_s)
        self.last_error = reason[:500]
        self._set(RECYCLING)
        return True

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

    async def _watch(self) -> tuple[str, str]:
        """Until the current life ends: why, and how (EXITED, STUCK or RECYCLED).

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
                    return (f"exited with code {code}" if code is not None else "exited"), EXITED
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
                        return f"did not answer within {self._t.startup_s:.0f}s of starting", STUCK
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
                    return f"hung: no answer to its health check for {self._t.hang_s:.0f}s", STUCK
                if now - progressed > self._t.hang_s:
                    return (
                        f"hung: no progress, no CPU use and no answer to a one-token probe for {self._t.hang_s:.0f}s",
                        STUCK,
                    )
                if self._recycle is not None:
                    if await self._drained(self._recycle, now):
                        return f"was recycled ({self._recycle.reason})", RECYCLED
                elif self.state == CRASH_LOOP and now - self._served_since >= self._t.stable_s:
                    self.failures = 0
                    self._set(SERVING)
                if self.last_error and self._recycle is None and now - self._served_since >= self._t.stable_s:
                    self.last_error = ""
                    self._changed()
                await asyncio.sleep(self._t.probe_s)
        finally:
            if probe is not None:
                probe.cancel()

    async def _drained(self, recycle: _Recycle, now: float) -> bool:
        """Whether an engine being recycled may go: vLLM runs no request and has none waiting (once
        RECYCLE_SETTLE_S has passed since it left service), or its drain time is up."""
        if now - recycle.since < RECYCLE_SETTLE_S:
            return False
        try:
            _, in_flight = await asyncio.wait_for(self._client.activity(), self._t.hang_s / 2)
        except (VllmError, aiohttp.ClientError, TimeoutError):
            in_flight = -1  # not known: it goes when its drain time is up
        if in_flight == 0:
            log.info("engine drained %.1fs after it left service: restarting it", now - recycle.since)
            return True
        if now >= recycle.deadline:
            left = str(in_flight) if in_flight > 0 else "an unknown number of"
            log.warning("restarting the engine with %s requests still in flight after %.0fs",
                        left, recycle.deadline - recycle.since)  # fmt: skip
            return True
        return False

    def _engine_cpu(self) -> float:
        return cpu_seconds(self.engine.group) if self.engine.group else 0.0

    async def _probe(self) -> float | None:
        """When the engine completed a one-token request, if it did within the hang time."""
        return time.monotonic() if await self._client.probe(self._model, self._t.hang_s) else None

    async def _end_life(self, reason: str, ending: str) -> None:
        self.engine.log.follow()
        if ending == RECYCLED:  # ended on purpose: no failure; its state and error line were set by `recycle`
            await self._reap(self._t.stop_grace_s)
            return
        served = self._served_since is not None and time.monotonic() - self._served_since >= self._t.stable_s
        self.failures = 0 if served else self.failures + 1
        hung = ending == STUCK
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
