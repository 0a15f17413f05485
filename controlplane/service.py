"""The gRPC servicers: authentication, then the registry, tenants and workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.artifacts import ARTIFACT_MESSAGE, ArtifactStore, OutOfRange, PendingArtifact
from controlplane.errors import (
    BadRequest,
    Context,
    ControlPlaneError,
    InvalidAdapter,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    TooLarge,
    Unauthenticated,
    grpc_errors,
)
from controlplane.keys import bearer, key_hash, same_secret
from controlplane.peers import forwarded
from controlplane.placer import Placer
from controlplane.reconcile import Reconciler
from controlplane.registry import Registry
from controlplane.sessions import AgentSession, Sessions
from controlplane.settings import Settings
from controlplane.store import Store
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.controlplane.v1 import adapter_pb2_grpc, worker_pb2_grpc
from loraplane.controlplane.v1 import worker_pb2 as wpb
from loraplane.limits import NAME
from loraplane.state.records import AdapterRecord, Tenant

log = logging.getLogger(__name__)

STATUS = {
    "pending": apb.ADAPTER_STATUS_PENDING,
    "ready": apb.ADAPTER_STATUS_READY,
    "failed": apb.ADAPTER_STATUS_FAILED,
    "deleting": apb.ADAPTER_STATUS_FAILED,  # never shown: deleted adapters do not exist for tenants
}


class Auth:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    async def tenant(self, context: Context) -> Tenant:
        tenant = await self._store.tenants.for_key(key_hash(bearer(context.invocation_metadata())))
        if tenant is None:
            raise Unauthenticated("missing or invalid credentials")
        if tenant.suspended:
            raise PermissionDenied("the tenant is suspended")
        return tenant

    def operator(self, context: Context) -> None:
        if not same_secret(bearer(context.invocation_metadata()), self._settings.operator_token):
            raise Unauthenticated("missing or invalid credentials")

    def peer(self, context: Context) -> bool:
        """For the verbs replicas forward to each other (ForceLoadAdapter, ForceEvictAdapter,
        PrefetchAdapter):
        the operator token, or the peer token on a forwarded call. True: the call is forwarded."""
        metadata = context.invocation_metadata()
        token, is_forwarded = bearer(metadata), forwarded(metadata)
        if same_secret(token, self._settings.operator_token):
            return is_forwarded
        if is_forwarded and same_secret(token, self._settings.peer_token):
            return True
        raise Unauthenticated("missing or invalid credentials")

    def agent(self, context: Context) -> None:
        if not same_secret(bearer(context.invocation_metadata()), self._settings.agent_token):
            raise Unauthenticated("missing or invalid credentials")


def timestamp(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def adapter_message(rec: AdapterRecord, pinned: bool = False) -> apb.Adapter:
    return apb.Adapter(
        id=rec.id,
        name=rec.name,
        base_model=rec.base_model,
        model=f"{rec.base_model}:{rec.name}",
        status=STATUS[rec.status],
        status_reason=rec.status_reason,
        source=apb.AdapterSource(**rec.source),
        rank=rec.rank,
        target_modules=rec.target_modules,
        lora_alpha=rec.lora_alpha,
        size_bytes=rec.size_bytes,
        sha256=rec.sha256,
        created_at=timestamp(rec.created_at),
        placement_error=rec.placement_error,
        pinned=pinned,
    )


UPLOAD_DRAIN_S = 30.0


class AdapterService(adapter_pb2_grpc.AdapterServiceServicer):
    def __init__(self, settings: Settings, store: Store, registry: Registry, placer: Placer, auth: Auth) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry
        self._placer = placer
        self._auth = auth

    @grpc_errors
    async def UploadAdapter(
        self, request_iterator: AsyncIterator[apb.UploadAdapterRequest], context: Context
    ) -> apb.UploadAdapterResponse:
        it = aiter(request_iterator)
        try:
            tenant = await self._auth.tenant(context)
        except (ControlPlaneError, redis.RedisError):
            await self._drain(it)
            raise
        pending = self._registry.open_temp()
        try:
            meta = await self._receive(it, pending, self._registry.max_bytes(tenant))
            rec = await self._registry.store_upload(
                tenant, meta.name, meta.base_model, pending, meta.adapter_config, meta.lora_alpha or None
            )
        finally:
            pending.discard()
        return apb.UploadAdapterResponse(adapter=adapter_message(rec))

    async def _drain(self, it: AsyncIterator[apb.UploadAdapterRequest]) -> None:
        """Read on (and drop) what the sender has in flight, for a while, before failing the
        call: failing it mid-stream loses its status on the sender's side ("Internal error from
        Core")."""
        with contextlib.suppress(TimeoutError, StopAsyncIteration):
            async with asyncio.timeout(UPLOAD_DRAIN_S):
                while True:
                    await asyncio.wait_for(anext(it), self._settings.upload_idle_timeout_s)

    async def _next(self, it: AsyncIterator[apb.UploadAdapterRequest]) -> apb.UploadAdapterRequest | None:
        try:
            return await asyncio.wait_for(anext(it), self._settings.upload_idle_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise BadRequest("upload stalled: no data within the idle timeout") from None

    async def _receive(
        self, it: AsyncIterator[apb.UploadAdapterRequest], pending: PendingArtifact, max_bytes: int
    ) -> apb.UploadAdapterMetadata:
        meta: apb.UploadAdapterMetadata | None = None
        while (msg := await self._next(it)) is not None:
            if msg.HasField("metadata"):
                if meta is not None:
                    raise BadRequest("metadata sent twice")
                meta = msg.metadata
                self._registry.base_model(meta.name, meta.base_model)
            elif pending.size + len(msg.chunk) > max_bytes:
                pending.discard()
                await self._drain(it)
                raise TooLarge(f"adapter is larger than the tier's limit of {max_bytes} bytes")
            else:
                await asyncio.to_thread(pending.write, msg.chunk)
        if meta is None:
            raise BadRequest("upload has no metadata")
        if pending.size == 0:
            raise BadRequest("upload has no file")
        return meta

    @grpc_errors
    async def CreateAdapter(self, request: apb.CreateAdapterRequest, context: Context) -> apb.CreateAdapterResponse:
        tenant = await self._auth.tenant(context)
        rec = await self._registry.register_hub(
            tenant, request.name, request.base_model, request.repo, request.revision, request.hf_token
        )
        return apb.CreateAdapterResponse(adapter=adapter_message(rec))

    @grpc_errors
    async def DeleteAdapter(self, request: apb.DeleteAdapterRequest, context: Context) -> apb.DeleteAdapterResponse:
        tenant = await self._auth.tenant(context)
        await self._registry.delete(await self._own(tenant, request.id))
        return apb.DeleteAdapterResponse(id=request.id, deleted=True)

    @grpc_errors
    async def ListAdapters(self, request: apb.ListAdaptersRequest, context: Context) -> apb.ListAdaptersResponse:
        tenant = await self._auth.tenant(context)
        recs = await self._store.list_adapters(tenant.id)
        pinned = set(await self._store.tenant_pinned(tenant.id))
        return apb.ListAdaptersResponse(adapters=[adapter_message(r, r.id in pinned) for r in recs])

    async def _own(self, tenant: Tenant, adapter_id: str) -> AdapterRecord:
        rec = await self._store.get_adapter(adapter_id) if adapter_id.startswith("adp_") else None
        if rec is None or rec.tenant_id != tenant.id or rec.status == "deleting":
            raise NotFound(f"adapter {adapter_id!r} does not exist")
        return rec

    @grpc_errors
    async def GetAdapter(self, request: apb.GetAdapterRequest, context: Context) -> apb.GetAdapterResponse:
        tenant = await self._auth.tenant(context)
        rec = await self._own(tenant, request.id)
        pinned = rec.id in await self._store.tenant_pinned(tenant.id)
        return apb.GetAdapterResponse(adapter=adapter_message(rec, pinned))

    @grpc_errors
    async def PinAdapter(self, request: apb.PinAdapterRequest, context: Context) -> apb.PinAdapterResponse:
        """Pinned within the allowance, then loaded; a pin that cannot be loaded is taken back."""
        tenant = await self._auth.tenant(context)
        rec = await self._own(tenant, request.id)
        if rec.status != "ready":
            raise InvalidAdapter(f"adapter is {rec.status}, not ready")
        allowance = tenant.pin_allowance(self._settings.tier_pinned_slots)
        was_pinned = rec.id in await self._store.tenant_pinned(tenant.id)
        pinned = await self._store.pin(rec, allowance)
        if pinned is None:
            whose = f"its {tenant.tier} tier's allowance" if tenant.pinned_slots is None else "its own allowance"
            hint = "unpin one first" if allowance else "the reserved and dedicated tiers have pinned slots"
            raise QuotaExceeded(f"the tenant may pin at most {allowance} adapter(s) ({whose}); {hint}")
        try:
            placed = await self._placer.place(rec)
        except ControlPlaneError:
            if not was_pinned:
                await self._store.unpin(rec)
            raise
        log.info("tenant %s pinned %s on %s (%d of %d)", tenant.id, rec.id, placed.worker_id, pinned, allowance)
        return apb.PinAdapterResponse(
            adapter=adapter_message(rec, pinned=True), worker_id=placed.worker_id, pinned=pinned,
            pinned_slots=allowance,
        )  # fmt: skip

    @grpc_errors
    async def UnpinAdapter(self, request: apb.UnpinAdapterRequest, context: Context) -> apb.UnpinAdapterResponse:
        tenant = await self._auth.tenant(context)
        rec = await self._own(tenant, request.id)
        await self._store.unpin(rec)
        return apb.UnpinAdapterResponse(adapter=adapter_message(rec, pinned=False))

    @grpc_errors
    async def PlaceAdapter(self, request: apb.PlaceAdapterRequest, context: Context) -> apb.PlaceAdapterResponse:
        tenant = await self._auth.tenant(context)
        rec = await self._own(tenant, request.adapter_id)
        if rec.status != "ready":
            raise InvalidAdapter(f"adapter is {rec.status}, not ready")
        placed = await self._placer.place(rec, replicate=request.replicate, avoid=frozenset(request.avoid_worker_ids))
        return apb.PlaceAdapterResponse(
            worker_id=placed.worker_id, already_loaded=placed.already_loaded, load_ms=placed.load_ms
        )


class WorkerService(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self, store: Store, artifacts: ArtifactStore, sessions: Sessions, reconciler: Reconciler, auth: Auth
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._sessions = sessions
        self._reconciler = reconciler
        self._auth = auth

    @grpc_errors
    async def Connect(
        self, request_iterator: AsyncIterator[wpb.ConnectRequest], context: Context
    ) -> AsyncIterator[wpb.ConnectResponse]:
        self._auth.agent(context)
        it = aiter(request_iterator)
        first = await anext(it)
        if not first.HasField("register"):
            raise BadRequest("the first message must be a Register")
        if not NAME.match(first.register.worker_id):
            raise BadRequest("bad worker id")
        session = await self._sessions.attach(first.register)
        reader = asyncio.create_task(self._read(session, it))
        ended = asyncio.create_task(session.ended.wait())
        if session.record.healthy:  # else the first heartbeat of a serving engine converges it
            self._reconciler.converge(session)
        try:
            while True:
                get = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({get, reader, ended}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                yield get.result()
        finally:
            reader.cancel()
            ended.cancel()
            if session.reconciling:
                session.reconciling.cancel()
            await asyncio.shield(self._sessions.detach_soon(session))

    async def _read(self, session: AgentSession, it: AsyncIterator[wpb.ConnectRequest]) -> None:
        """Results are resolved as they come; heartbeats are recorded by `_beats`, newest first
        (a slow Redis never builds a backlog of stale ones, nor makes a live worker look dead)."""
        newest: asyncio.Queue[wpb.Heartbeat] = asyncio.Queue(maxsize=1)
        beats = asyncio.create_task(self._beats(session, newest))
        try:
            async for msg in it:
                if msg.HasField("heartbeat"):
                    session.last_seen = time.monotonic()
                    if newest.full():
                        newest.get_nowait()
                    newest.put_nowait(msg.heartbeat)
                elif msg.HasField("result"):
                    session.resolve(msg.result)
        finally:
            beats.cancel()

    async def _beats(self, session: AgentSession, newest: asyncio.Queue[wpb.Heartbeat]) -> None:
        while True:
            hb = await newest.get()
            try:
                await self._sessions.heartbeat(
                    session, list(hb.resident), hb.healthy, list(hb.busy), hb.requests_in_flight, hb.commands_done,
                    hb.engine if hb.HasField("engine") else None, list(hb.cached),
                )  # fmt: skip
                await self._reconciler.converge_if_drifted(session)
            except redis.RedisError as err:  # the session outlives Redis's absence; the next beat writes
                log.warning("heartbeat of %s not recorded: %s", session.record.id, err)

    @grpc_errors
    async def FetchArtifact(
        self, request: wpb.FetchArtifactRequest, context: Context
    ) -> AsyncIterator[wpb.FetchArtifactResponse]:
        """The blob, or the byte range asked for, in messages of up to ARTIFACT_MESSAGE bytes: read
        on the event loop what is in memory, the rest in a thread."""
        self._auth.agent(context)
        try:
            blob = await asyncio.to_thread(self._artifacts.open_blob, request.sha256, request.offset, request.length)
        except OutOfRange as err:
            raise BadRequest(str(err)) from None
        except ValueError:
            raise BadRequest("sha256 must be 64 hex digits") from None
        except FileNotFoundError:
            raise NotFound("no such artifact") from None
        try:
            while True:
                chunk = blob.read_cached(ARTIFACT_MESSAGE)
                if chunk is None:
                    chunk = await asyncio.to_thread(blob.read, ARTIFACT_MESSAGE)
                if not chunk:
                    break
                yield wpb.FetchArtifactResponse(chunk=chunk)
        finally:
            blob.close()

    @grpc_errors
    async def ListWorkers(self, request: wpb.ListWorkersRequest, context: Context) -> wpb.ListWorkersResponse:
        self._auth.operator(context)
        pinned = await self._store.pinned()
        return wpb.ListWorkersResponse(
            workers=[
                wpb.Worker(
                    worker_id=w.id,
                    base_model=w.base_model,
                    endpoint=w.endpoint,
                    max_adapters=w.max_adapters,
                    resident_adapter_ids=w.resident,
                    healthy=w.healthy and bool(w.owner),
                    engine_state=w.engine_state,
                    engine_last_error=w.engine_error,
                    engine_restarts=w.engine_restarts,
                    pool_tenant_id=w.pool,
                    pinned_adapter_ids=[a for a in w.resident if a in pinned],
                    draining=w.draining,
                    max_concurrency=w.max_concurrency,
                    gpu_slots=w.gpu_slots,
                    cached_adapter_ids=w.cached,
                )
                for w in await self._store.list_workers()
            ]
        )
