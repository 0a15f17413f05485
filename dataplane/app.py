"""The data plane's Starlette app: routes, and the collaborators they share."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dataplane import errors, events
from dataplane.auth import KeyCache
from dataplane.cpclient import ControlPlaneClient
from dataplane.errors import ApiError, BadRequest, TooLarge, Unavailable, Unreachable
from dataplane.metrics import Metrics, MetricsMiddleware
from dataplane.proxy import Proxy
from dataplane.resolve import Resolver, Target
from dataplane.routing import RoutingTable, Worker, candidates, is_hot, least_loaded
from dataplane.settings import Settings
from dataplane.upload import UploadStream
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import adapter_pb2 as apb

log = logging.getLogger(__name__)
USED_KEY = "lp:used"
REPLICA_LINGER_S = 2.0
STATUS = {apb.ADAPTER_STATUS_PENDING: "pending", apb.ADAPTER_STATUS_READY: "ready", apb.ADAPTER_STATUS_FAILED: "failed"}


@dataclass
class State:
    settings: Settings
    keys: KeyCache
    resolver: Resolver
    routing: RoutingTable
    cp: ControlPlaneClient
    proxy: Proxy
    placing: dict[tuple[str, bool, frozenset[str]], asyncio.Task[apb.PlaceAdapterResponse]]
    used: dict[str, float]  # adapter id -> when last requested here, until flushed to Redis
    metrics: Metrics


def _state(request: Request) -> State:
    return request.state.lp  # type: ignore[no-any-return]


def _key(request: Request) -> str:
    return request.headers["authorization"].partition(" ")[2].strip()


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise TooLarge(f"request body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def adapter_json(a: apb.Adapter) -> dict[str, object]:
    return {
        "id": a.id,
        "object": "adapter",
        "name": a.name,
        "base_model": a.base_model,
        "model": a.model,
        "status": STATUS.get(a.status, "unknown"),
        "status_reason": a.status_reason or None,
        "source": {
            k: v
            for k, v in {
                "kind": a.source.kind,
                "repo": a.source.repo,
                "revision": a.source.revision,
                "commit_sha": a.source.commit_sha,
            }.items()
            if v
        },
        "rank": a.rank,
        "target_modules": list(a.target_modules),
        "lora_alpha": a.lora_alpha,
        "size_bytes": a.size_bytes,
        "sha256": a.sha256,
        "created_at": a.created_at.seconds,
        "placement_error": a.placement_error or None,
    }


async def _worker_for(st: State, target: Target, key: str, avoid: frozenset[str] = frozenset()) -> Worker:
    """Adapter affinity first, then load; a cold adapter is placed once, whoever asks."""
    usable = [w for w in st.routing.usable(st.routing.workers) if w.id not in avoid]
    pool = candidates(usable, target.base.name, target.adapter_id)
    worker = least_loaded(pool, st.routing.in_flight)
    if target.adapter_id is None:
        if worker is None:
            raise Unavailable(f"no worker serves {target.base.name} right now")
        return worker
    st.used[target.adapter_id] = time.time()
    if worker is not None:
        hot = is_hot(st.routing.adapter_in_flight[target.adapter_id] + 1, len(pool), st.settings.replicate_at_in_flight)
        if hot and len(candidates(usable, target.base.name, None)) > len(pool):
            _single_flight(st, key, target.adapter_id, replicate=True)
        return worker
    placed = await asyncio.shield(_single_flight(st, key, target.adapter_id, avoid=avoid))
    worker = st.routing.get(placed.worker_id)
    if worker is None:
        await st.routing.refresh()
        worker = st.routing.get(placed.worker_id)
    if worker is None:
        raise Unavailable("the adapter's worker is not in the routing table yet")
    return worker


def _single_flight(
    st: State, key: str, adapter_id: str, replicate: bool = False, avoid: frozenset[str] = frozenset()
) -> asyncio.Task[apb.PlaceAdapterResponse]:
    """One placement per adapter (and kind) at a time, however many requests want it. A replica
    is asked for in the background and its flight kept a moment longer, so that the routing
    table shows the new copy before the adapter can look hot again."""
    flight = (adapter_id, replicate, avoid)
    task = st.placing.get(flight)
    if task is None:
        task = asyncio.create_task(
            st.cp.place(key, adapter_id, st.settings.place_timeout_s, replicate=replicate, avoid=sorted(avoid))
        )
        st.placing[flight] = task
        linger = REPLICA_LINGER_S if replicate else 0.0

        def landed(t: asyncio.Task[apb.PlaceAdapterResponse]) -> None:
            err = None if t.cancelled() else t.exception()  # retrieved even when nobody waits any more
            if replicate and err is not None:
                log.info("replicating %s: %s", adapter_id, err)
            asyncio.get_running_loop().call_later(linger, st.placing.pop, flight, None)

        task.add_done_callback(landed)
    return task


async def _forward(st: State, worker: Worker, path: str, body: dict[str, Any], target: Target, model: str) -> Response:
    in_flight, adapter_in_flight = st.routing.in_flight, st.routing.adapter_in_flight
    in_flight[worker.id] += 1
    if target.adapter_id:
        adapter_in_flight[target.adapter_id] += 1

    def done() -> None:
        in_flight[worker.id] -= 1
        if target.adapter_id:
            adapter_in_flight[target.adapter_id] -= 1

    return await st.proxy.forward(worker.endpoint, path, body, target.upstream_model, model, done)


def _limit(body: dict[str, Any], settings: Settings) -> None:
    """Request limits, each a clear 400 naming the parameter."""
    for name, most in (("max_tokens", settings.max_tokens), ("max_completion_tokens", settings.max_tokens),
                       ("n", settings.max_n), ("best_of", settings.max_n)):  # fmt: skip
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise BadRequest(f"{name!r} must be an integer from 1 to {most}", param=name)


def cache_salt(secret: str, tenant_id: str) -> str:
    """The same per tenant on every data plane; a tenant's prompts can share vLLM's prefix cache
    with each other, never with another tenant's (whatever `cache_salt` the client sent)."""
    return hmac.new(secret.encode(), f"cache-salt:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def _inference(path: str, kind: str) -> Any:
    """A completion, chat completion or embedding request, routed and proxied."""

    async def endpoint(request: Request) -> Response:
        st = _state(request)
        tenant_id = await st.keys.tenant_id(request)
        body = await _json_body(request, st.settings.max_body_bytes)
        _limit(body, st.settings)
        body["cache_salt"] = cache_salt(st.settings.worker_api_key, tenant_id)
        client_model = body.get("model")
        target = await st.resolver.resolve(tenant_id, client_model)
        assert isinstance(client_model, str)
        if target.base.kind != kind:
            raise BadRequest(f"{target.base.name} is not a {kind} model; {path} serves {kind} models", param="model")

        async def answer() -> Response:
            worker = await _worker_for(st, target, _key(request))
            try:
                return await _forward(st, worker, path, body, target, client_model)
            except Unreachable:  # nothing was sent or answered: once more, elsewhere
                st.routing.suspect(worker.id)
                worker = await _worker_for(st, target, _key(request), avoid=frozenset({worker.id}))
                return await _forward(st, worker, path, body, target, client_model)

        return await _unless_disconnected(request, answer())

    return endpoint


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Until the answer starts, a client that goes away cancels the work (and so the upstream
    request); once it streams, Starlette's StreamingResponse does the same."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # the client left: nobody reads an answer
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()


async def flush_used(client: redis.Redis, used: dict[str, float], every_s: float = 1.0) -> None:
    """When each adapter was last used, for the control plane's LRU eviction: written to Redis
    once a second, not once per request."""
    while True:
        await asyncio.sleep(every_s)
        if not used:
            continue
        batch = dict(used)
        used.clear()
        try:
            await client.hset(USED_KEY, mapping=batch)  # type: ignore[arg-type]
        except redis.RedisError as err:
            log.debug("recording adapter use failed: %s", err)


async def upload(request: Request) -> Response:
    st = _state(request)
    await st.keys.tenant_id(request)
    stream = UploadStream(request, st.resolver.catalog, st.settings.max_adapter_bytes)
    adapter = await stream.send(st.cp.adapters, _key(request), st.settings.upload_timeout_s)
    return JSONResponse(adapter_json(adapter), status_code=201)


async def create_adapter(request: Request) -> Response:
    """Register an adapter from a Hugging Face repo; 202, status pending."""
    st = _state(request)
    await st.keys.tenant_id(request)
    body = await _json_body(request, 64 << 10)
    fields = {}
    for name in ("name", "base_model", "repo", "revision", "hf_token"):
        value = body.get(name, "")
        if not isinstance(value, str):
            raise BadRequest(f"{name!r} must be a string", param=name)
        fields[name] = value
    for name in ("name", "base_model", "repo"):
        if not fields[name]:
            raise BadRequest(f"{name!r} is required", param=name)
    adapter = await st.cp.create_adapter(_key(request), apb.CreateAdapterRequest(**fields))
    return JSONResponse(adapter_json(adapter), status_code=202)


async def delete_adapter(request: Request) -> Response:
    st = _state(request)
    await st.keys.tenant_id(request)
    adapter_id = request.path_params["adapter_id"]
    await st.cp.delete_adapter(_key(request), adapter_id)
    st.resolver.forget_id(adapter_id)  # at once here; other data planes hear it from Redis
    return JSONResponse({"id": adapter_id, "object": "adapter", "deleted": True})


async def list_adapters(request: Request) -> Response:
    st = _state(request)
    await st.keys.tenant_id(request)
    adapters = await st.cp.list_adapters(_key(request))
    return JSONResponse({"object": "list", "data": [adapter_json(a) for a in adapters]})


async def get_adapter(request: Request) -> Response:
    st = _state(request)
    await st.keys.tenant_id(request)
    adapter = await st.cp.get_adapter(_key(request), request.path_params["adapter_id"])
    return JSONResponse(adapter_json(adapter))


async def list_models(request: Request) -> Response:
    st = _state(request)
    await st.keys.tenant_id(request)
    data: list[dict[str, object]] = [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "loraplane", "parent": None}
        for m in st.resolver.catalog.models.values()
    ]
    for a in await st.cp.list_adapters(_key(request)):
        if a.status == apb.ADAPTER_STATUS_READY:
            data.append(
                {
                    "id": a.model,
                    "object": "model",
                    "created": a.created_at.seconds,
                    "owned_by": "tenant",
                    "parent": a.base_model,
                }
            )
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    """The process answers."""
    return JSONResponse({"status": "ok", "routing_version": _state(request).routing.version})


async def readyz(request: Request) -> Response:
    """Ready once a routing table has been read: from then on it serves what that table can,
    Redis or control plane down or not."""
    st = _state(request)
    ready = st.routing.version >= 0
    body = {"status": "ready" if ready else "starting", "routing_version": st.routing.version,
            "workers": sum(w.healthy for w in st.routing.workers)}  # fmt: skip
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    st = _state(request)
    gauges = {
        "loraplane_dataplane_routing_version": float(st.routing.version),
        "loraplane_dataplane_healthy_workers": float(sum(w.healthy for w in st.routing.workers)),
        "loraplane_dataplane_placements_waiting": float(len(st.placing)),
    }
    return PlainTextResponse(st.metrics.render(gauges), media_type="text/plain; version=0.0.4")


def create_app(settings: Settings) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, State]]:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        catalog = Catalog.load(settings.catalog_path)
        routing = RoutingTable(client)
        keys = KeyCache(client, settings.key_cache_ttl_s)
        resolver = Resolver(client, catalog, settings.adapter_cache_ttl_s)
        used: dict[str, float] = {}
        background = [
            asyncio.create_task(events.follow(client, routing, [keys, resolver], settings.routing_refresh_s)),
            asyncio.create_task(flush_used(client, used)),
        ]
        cp = ControlPlaneClient(settings.controlplane_addr)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
            state = State(
                settings=settings,
                keys=keys,
                resolver=resolver,
                routing=routing,
                cp=cp,
                proxy=Proxy(http, settings.worker_api_key, settings.upstream_timeout_s),
                placing={},
                used=used,
                metrics=metrics,
            )
            try:
                yield {"lp": state}
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await cp.close()
                await client.aclose()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", _inference("/v1/chat/completions", "chat"), methods=["POST"]),
        Route("/v1/completions", _inference("/v1/completions", "chat"), methods=["POST"]),
        Route("/v1/embeddings", _inference("/v1/embeddings", "embedding"), methods=["POST"]),
        Route("/v1/adapters/upload", upload, methods=["POST"]),
        Route("/v1/adapters", list_adapters, methods=["GET"]),
        Route("/v1/adapters", create_adapter, methods=["POST"]),
        Route("/v1/adapters/{adapter_id}", get_adapter, methods=["GET"]),
        Route("/v1/adapters/{adapter_id}", delete_adapter, methods=["DELETE"]),
    ]
    handlers = {ApiError: errors.handle, HTTPException: errors.handle_http}
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=handlers,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )


def main() -> None:
    import os

    import uvicorn

    logging.basicConfig(
        level=os.environ.get("LORAPLANE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env(os.environ)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
