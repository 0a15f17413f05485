"""The agent's life: keep vLLM up, stay connected to the control plane, run commands."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc

from loraplane import config, logs, metrics, nopickle
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import worker_pb2 as pb
from loraplane.controlplane.v1 import worker_pb2_grpc
from loraplane.state.records import DOWN, RECYCLING, SERVING, SLOTS_LEAKED
from workeragent.cache import ArtifactCache, Fetch, IntegrityError, S3Source
from workeragent.concurrency import MAX_NUM_SEQS, detect, engine_max_seqs, flag
from workeragent.engine import Engine, become_subreaper
from workeragent.settings import Settings
from workeragent.slots import Leak, Ledger, SlotLeak, judge
from workeragent.supervisor import Supervisor, Timing
from workeragent.vllm import VllmClient, VllmError, engine_command, engine_env

log = logging.getLogger(__name__)
BACKOFF_CAP_S = 5.0
REGISTER_TIMEOUT_S = 10.0


class Agent:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        model = catalog.get(settings.base_model)
        if model is None:
            raise ValueError(f"base model {settings.base_model!r} is not in the catalog")
        self._s = settings
        self._model = model
        self._metadata = (("authorization", f"Bearer {settings.agent_token}"),)
        self._commands_done = 0  # results sent this session: heartbeats say how fresh their `resident` is
        self._vllm_secret = settings.vllm_agent_secret
        self.engine: Engine | None = None
        self.max_concurrency = settings.max_concurrency  # as registered; an engine started here: see run()
        if not settings.vllm_url:
            self._vllm_secret = _local_secret(settings.cache_dir / "vllm.secret")
            command = engine_command(
                settings.vllm_command,
                model_path=model.path,
                served_name=model.name,
                host=settings.vllm_host,
                port=settings.vllm_port,
                max_loras=model.max_adapters_per_worker,
                max_rank=model.max_rank,
                extra_args=_with_max_num_seqs(settings.vllm_args, settings.max_concurrency),
                tool_parser=model.tool_parser,
                chat_template=model.chat_template,
                max_cpu_loras=model.host_slots,
            )
            env = engine_env(os.environ, settings.vllm_api_key, self._vllm_secret)
            self.engine = Engine(command, env, settings.cache_dir / "vllm.pid", settings.cache_dir / "vllm.log")
        self.supervisor: Supervisor | None = None
        self._beat_now = asyncio.Event()  # set: send a heartbeat now (the engine's state changed)
        self.local_url = settings.vllm_url or f"http://{settings.vllm_host}:{settings.vllm_port}"
        self.endpoint = settings.advertise_url or self.local_url
        self.metrics, self._slots_used = metrics.CollectorRegistry(), 0
        slots, host = model.max_adapters_per_worker, model.host_slots
        # vLLM does not say which of the adapters it holds are in a slot: as many as it has slots,
        # the others (a host-memory tier's) in host memory
        self._gauge(
            "loraplane_worker_lora_slots_used", "LoRA slots holding an adapter.", lambda: min(self._slots_used, slots)
        )
        self._gauge("loraplane_worker_lora_slots", "LoRA slots (--max-loras).", lambda: slots)
        self._gauge(
            "loraplane_worker_lora_host_slots_used",
            "Adapters loaded, in LoRA slots or in host memory.",
            lambda: self._slots_used,
        )
        self._gauge(
            "loraplane_worker_lora_host_slots",
            "Adapters the engine holds loaded at once, in LoRA slots and host memory (--max-cpu-loras).",
            lambda: host,
        )
        self._gauge("loraplane_worker_requests_running", "Requests vLLM is running.", lambda: self._vllm.running)
        self._gauge("loraplane_worker_requests_waiting", "Requests queued in vLLM.", lambda: self._vllm.waiting)
        self._cp_up = metrics.Gauge(
            self.metrics, "loraplane_controlplane_up", "1 while a control plane session is open.", ("component",)
        )
        self._cp_up.set("agent", value=0)
        self._slots = Ledger()
        self._leak: Leak | None = None  # slots leaked in a vLLM this agent attached to, until it is seen restarted
        self._leaks = metrics.Counter(
            self.metrics,
            "loraplane_worker_slot_leaks_total",
            "Loads vLLM refused for lack of a free LoRA slot while it listed fewer adapters than slots.",
            ("worker",),
        )
        self._leaks.inc(settings.worker_id, by=0)

    def _gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge of this worker, read at each scrape."""
        worker = (self._s.worker_id,)
        metrics.Sampled(self.metrics, name, help, ("worker",), lambda: {worker: float(read())})

    async def run(self, stop: asyncio.Event) -> None:
        channel_options = [
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", int(BACKOFF_CAP_S * 1000)),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        async with (
            aiohttp.ClientSession() as http,
            grpc.aio.insecure_channel(self._s.controlplane_addr, options=channel_options) as channel,
        ):
            self._vllm = VllmClient(self.local_url, self._s.vllm_api_key, self._vllm_secret, http)
            self._stub = worker_pb2_grpc.WorkerServiceStub(channel)
            fetch: Fetch = self._fetch
            if self._s.artifact_s3 is not None:  # straight from the bucket, not through the control plane
                fetch = (await asyncio.to_thread(S3Source, self._s.artifact_s3)).fetch
            self._cache = ArtifactCache(self._s.cache_dir, fetch, self._s.cache_max_bytes)
            if self.engine:
                self.max_concurrency = await asyncio.to_thread(engine_max_seqs, self.engine.args, detect)
            metrics_server = await metrics.serve(self.metrics, self._s.metrics_addr)
            tasks = []
            if self.engine:
                timing = Timing(
                    hang_s=self._s.engine_hang_s,
                    stable_s=self._s.engine_stable_s,
                    backoff_cap_s=self._s.engine_backoff_cap_s,
                    gpu_release_s=self._s.engine_gpu_release_s,
                    startup_s=self._s.startup_timeout_s,
                )
                self.supervisor = Supervisor(
                    self.engine, self._vllm, self._model.name, timing, self.metrics, self._s.worker_id,
                    changed=self._beat_now.set,
                )  # fmt: skip
                tasks.append(asyncio.create_task(self.supervisor.run()))
            tasks.append(asyncio.create_task(self._connect_forever()))
            try:
                await stop.wait()
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if metrics_server is not None:
                    metrics_server.close()
                if self.supervisor:
                    await self.supervisor.stop()

    async def _engine(self) -> tuple[bool, pb.EngineStatus]:
        """Whether the engine serves now, and its status as heartbeats report it."""
        if self.supervisor is None:  # a vLLM this agent attached to: it serves, it is down, or its slots leaked
            healthy = await self._vllm.healthy()
            if not healthy and self._leak is not None:
                log.info("the vLLM whose LoRA slots leaked does not answer: taken as restarted")
                self._leak = None
            if self._leak is not None:
                return False, pb.EngineStatus(state=SLOTS_LEAKED, last_error=f"{self._leak}; restart this vLLM")
            return healthy, pb.EngineStatus(state=SERVING if healthy else DOWN)
        sup = self.supervisor
        status = pb.EngineStatus(state=sup.state, last_error=sup.last_error, restarts=sup.restarts)
        return sup.serving, status  # the supervisor asked /health a second ago at most

    async def _connect_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._session()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except (
                grpc.aio.AioRpcError, asyncio.InvalidStateError, aiohttp.ClientError, VllmError, TimeoutError, OSError,
            ) as err:  # fmt: skip
                log.warning("control plane session ended: %s; reconnecting in %.1fs", err, delay)
            except Exception:  # this loop keeps the worker connected: it must outlive any one failure
                log.exception("control plane session failed; reconnecting in %.1fs", delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_CAP_S)

    async def _session(self) -> None:
        outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue(256)
        call = self._stub.Connect(metadata=self._metadata)
        serving, engine = await self._engine()
        register = pb.Register(
            worker_id=self._s.worker_id,
            base_model=self._model.name,
            endpoint=self.endpoint,
            max_adapters=self._model.host_slots,
            resident=await self._vllm.resident() if serving else [],
            engine=engine,
            max_concurrency=self.max_concurrency,
            prefetch=True,
            gpu_slots=self._model.max_adapters_per_worker,
        )
        await asyncio.wait_for(call.write(pb.ConnectRequest(register=register)), REGISTER_TIMEOUT_S)
        log.info("registered %s with the control plane", self._s.worker_id)
        self._cp_up.set("agent", value=1)
        order = CommandOrder()
        self._commands_done = 0  # counted per session, as the control plane counts results
        tasks = {
            asyncio.create_task(self._writer(call, outbox)),
            asyncio.create_task(self._heartbeat(outbox)),
        }
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                task = asyncio.create_task(self._execute(msg, outbox, order))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self._cp_up.set("agent", value=0)
            for t in tasks:
                t.cancel()
            call.cancel()

    async def _writer(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse],
        outbox: asyncio.Queue[pb.ConnectRequest],
    ) -> None:
        while True:
            await call.write(await outbox.get())

    async def _heartbeat(self, outbox: asyncio.Queue[pb.ConnectRequest]) -> None:
        """Every `heartbeat_s`, and at once when the engine's state changes. A vLLM that
        fails a call is reported unhealthy, never a reason for the heartbeats to stop."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self._s.heartbeat_s)
            self._beat_now.clear()
            await self._beat(outbox)

    async def _beat(self, outbox: asyncio.Queue[pb.ConnectRequest]) -> None:
        """One heartbeat: what vLLM holds and does, the engine's state, and the adapters on the
        node's disk cache that vLLM does not hold."""
        done = self._commands_done
        healthy, engine = await self._engine()
        resident: list[str] = []
        busy: set[str] = set()
        in_flight = 0
        if healthy:
            try:
                resident = await self._vllm.resident()
                busy, in_flight = await self._vllm.activity()
            except (VllmError, aiohttp.ClientError, TimeoutError, ValueError) as err:
                log.warning("vLLM did not say what it holds: %s", err)
                healthy, resident, busy, in_flight = False, [], set(), 0
        self._slots_used = len(resident)
        beat = pb.Heartbeat(
            resident=resident, healthy=healthy, busy=sorted(busy), requests_in_flight=in_flight,
            commands_done=done, engine=engine, cached=self._cache.cached(exclude=resident),
        )  # fmt: skip
        await outbox.put(pb.ConnectRequest(heartbeat=beat))

    async def _execute(
        self, msg: pb.ConnectResponse, outbox: asyncio.Queue[pb.ConnectRequest], order: CommandOrder
    ) -> None:
        if msg.HasField("prefetch"):
            result = await self._prefetch(msg.prefetch)
            self._commands_done += 1  # every result counts: the control plane counts them all
            await outbox.put(pb.ConnectRequest(result=result))
            return
        cmd = msg.load if msg.HasField("load") else msg.evict
        logs.REQUEST_ID.set(cmd.request_id if logs.sane(cmd.request_id) else "")  # this task's own context
        async with order.turn(cmd.vllm_name):
            if order.stale(cmd.vllm_name, cmd.generation):
                result = pb.CommandResult(command_id=cmd.command_id, ok=False, error="stale command")
                result.resident.extend(await self._vllm.resident())
            else:
                result = await self._run(msg, cmd)
                if result.ok:
                    order.applied(cmd.vllm_name, cmd.generation)
        verb = "load" if msg.HasField("load") else "evict"
        outcome = ("already done" if result.already_done else "done") if result.ok else f"failed: {result.error}"
        fields = {"command": verb, "vllm_name": cmd.vllm_name, "ok": result.ok, "duration_ms": result.duration_ms}
        log.info("%s %s: %s in %d ms", verb, cmd.vllm_name, outcome, result.duration_ms, extra=fields)
        if not result.ok and self._leaving():  # out of service first, then the failure the placer retries elsewhere
            await self._beat(outbox)
        self._commands_done += 1
        await outbox.put(pb.ConnectRequest(result=result))

    async def _prefetch(self, cmd: pb.PrefetchArtifact) -> pb.CommandResult:
        """The adapter's bytes into the node cache, verified, not loaded: its first load then
        pays no fetch."""
        logs.REQUEST_ID.set(cmd.request_id if logs.sane(cmd.request_id) else "")
        started = time.monotonic()
        result = pb.CommandResult(command_id=cmd.command_id, ok=True)
        try:
            await self._cache.blob(cmd.sha256, cmd.size_bytes)
            if cmd.vllm_name:
                self._cache.name(cmd.vllm_name, cmd.sha256)
        except (IntegrityError, grpc.aio.AioRpcError, OSError, TimeoutError) as err:
            log.warning("prefetch of %s failed: %s", cmd.sha256, err)
            result.ok, result.error = False, str(err)[:500]
        result.duration_ms = int((time.monotonic() - started) * 1000)
        log.info("prefetched %s in %d ms", cmd.sha256, result.duration_ms)
        return result

    @contextlib.contextmanager
    def _engine_busy(self) -> Iterator[None]:
        """Around a LoRA load or unload, which holds the engine's loop: no hang verdict meanwhile."""
        sup = self.supervisor
        if sup is not None:
            sup.commands += 1
        try:
            yield
        finally:
            if sup is not None:
                sup.commands -= 1

    async def _run(self, msg: pb.ConnectResponse, cmd: pb.LoadAdapter | pb.EvictAdapter) -> pb.CommandResult:
        started = time.monotonic()
        result = pb.CommandResult(command_id=cmd.command_id, ok=True)
        try:
            before = await self._vllm.resident()
            if msg.HasField("load"):
                if msg.load.vllm_name in before:
                    result.already_done = True
                elif leaving := self._leaving():
                    raise VllmError(f"the engine takes no new adapter: {leaving}")
                else:
                    d = await self._cache.adapter_dir(
                        msg.load.vllm_name, msg.load.sha256, msg.load.size_bytes, msg.load.adapter_config
                    )
                    await self._load(msg.load.vllm_name, str(d))
            elif msg.evict.vllm_name not in before:
                result.already_done = True
            else:
                await self._drain(msg.evict.vllm_name)
                with self._engine_busy(), self._slots.change():
                    await self._vllm.unload(msg.evict.vllm_name)
                self._cache.forget(msg.evict.vllm_name)
            after = await self._vllm.resident()
            result.resident.extend(after)
            wanted = msg.HasField("load")
            if (cmd.vllm_name in after) != wanted:
                result.ok = False
                result.error = "vLLM does not report the adapter as " + ("loaded" if wanted else "unloaded")
        except (VllmError, IntegrityError, aiohttp.ClientError, grpc.aio.AioRpcError, OSError, TimeoutError) as err:
            # reported to the control plane, which decides what to do next
            log.warning("command %s failed: %s", cmd.command_id, err)
            result.ok = False
            result.error = str(err)[:500]
        result.duration_ms = int((time.monotonic() - started) * 1000)
        return result

    async def _load(self, name: str, path: str) -> None:
        """vLLM's load. One refused that proves LoRA slots leaked (`slots.judge`) takes the engine
        out of service (`_slots_leaked`) and fails: the control plane places the adapter elsewhere."""
        with self._engine_busy(), self._slots.change() as alone:
            try:
                await self._vllm.load(name, path)
            except VllmError as err:
                leak = await judge(err, self._vllm, self._model.max_adapters_per_worker, alone, self._model.host_slots)
                if leak is None:
                    raise
                self._slots_leaked(leak)
                raise SlotLeak(leak) from None

    def _slots_leaked(self, leak: Leak) -> None:
        """The engine takes no new work until it restarts: one this agent started is recycled (its
        requests in flight finish, then it restarts and the control plane loads back what it held);
        one it attached to is reported so until it is seen restarted."""
        self._leaks.inc(self._s.worker_id)
        fields = {"slots": leak.slots, "listed": leak.listed, "leaked": leak.leaked, "capacity": leak.capacity}
        if self.supervisor is None:
            self._leak = leak
            self._beat_now.set()
            log.error("%s; this agent attached to that vLLM and cannot restart it: the worker takes no work "
                      "until it is restarted", leak, extra=fields)  # fmt: skip
        elif self.supervisor.recycle(str(leak), self._s.drain_timeout_s):
            log.warning("%s; recycling the engine: its requests in flight finish (for at most %.0fs), then it "
                        "restarts", leak, self._s.drain_timeout_s, extra=fields)  # fmt: skip

    def _leaving(self) -> str:
        """Why the engine takes no new adapter now (its slots leaked), or ""."""
        if self.supervisor is not None:
            return self.supervisor.last_error if self.supervisor.state == RECYCLING else ""
        return str(self._leak) if self._leak is not None else ""

    async def _drain(self, name: str) -> None:
        """Let the adapter's requests in flight finish before it goes, for at most drain_timeout_s."""
        deadline = time.monotonic() + self._s.drain_timeout_s
        while name in await self._vllm.busy():
            if time.monotonic() > deadline:
                log.warning("evicting %s with requests still in flight after %.0fs", name, self._s.drain_timeout_s)
                return
            await asyncio.sleep(0.1)

    async def _fetch(self, sha256: str, offset: int, length: int) -> AsyncGenerator[bytes]:
        """A byte range of an artifact from the control plane (length 0: up to the end)."""
        metadata = (*self._metadata, *logs.metadata())
        request = pb.FetchArtifactRequest(sha256=sha256, offset=offset, length=length)
        call = self._stub.FetchArtifact(request, metadata=metadata, timeout=600)
        try:
            async for msg in call:
                yield msg.chunk
        finally:
            call.cancel()  # a no-op once the stream ended; else the cache gave up on this range


class CommandOrder:
    """Within one control plane session: commands for one adapter run one at a time, and a
    command older (by desired-state generation) than one already applied for it is stale."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # name -> (lock, commands holding or waiting)
        self._applied: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def turn(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def stale(self, name: str, generation: int) -> bool:
        return generation < self._applied.get(name, 0)

    def applied(self, name: str, generation: int) -> None:
        self._applied[name] = max(generation, self._applied.get(name, 0))


def _with_max_num_seqs(vllm_args: tuple[str, ...], max_concurrency: int) -> tuple[str, ...]:
    """The operator's vLLM arguments, with `--max-num-seqs` from LORAPLANE_MAX_CONCURRENCY when
    they do not have it (when they do, theirs is what vLLM runs with, and what the agent reports)."""
    if not max_concurrency:
        return vllm_args
    given = flag(vllm_args, MAX_NUM_SEQS)
    if given is None:
        return (*vllm_args, MAX_NUM_SEQS, str(max_concurrency))
    if given != max_concurrency:
        log.warning("LORAPLANE_VLLM_ARGS has %s %d: LORAPLANE_MAX_CONCURRENCY=%d is not used",
                    MAX_NUM_SEQS, given, max_concurrency)  # fmt: skip
    return vllm_args


def _local_secret(path: Path) -> str:
    """The secret of the vLLM this agent starts, kept beside its pid file (mode 0600) so that
    an agent that restarts and adopts the running vLLM still holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if len(secret := path.read_text().strip()) >= 32:
            return secret
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


async def serve(settings: Settings) -> None:
    agent = Agent(settings, Catalog.load(settings.catalog_path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)


def main() -> None:
    nopickle.install()
    logs.setup("agent")
    become_subreaper()
    asyncio.run(serve(config.or_exit(lambda: Settings.from_env(os.environ))))


if __name__ == "__main__":
    main()
