"""The data plane's Starlette app: routes, and the collaborators they share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dataplane import errors, events
from dataplane.auth import KeyCache
from dataplane.cpclient import ControlPlaneClient
from dataplane.errors import ApiError, BadRequest, TooLarge, Unavailable
from dataplane.proxy import Proxy
from dataplane.resolve import Resolver, Target
from dataplane.routing import RoutingTable, Worker, candidates, least_loaded
from dataplane.settings import Settings
from dataplane.upload import UploadStream
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import adapter_pb2 as apb

log = logging.getLogger(__name__)
STATUS = {apb.ADAPTER_STATUS_PENDING: "pending", apb.ADAPTER_STATUS_READY: "ready", apb.ADAPTER_STATUS_FAILED: "failed"}


@dataclass
class State:
    settings: Settings
    keys: KeyCache
    resolver: Resolver
    routing: RoutingTable
    cp: ControlPlaneClient
    proxy: Proxy
    placing: dict[str, asyncio.Task[apb.PlaceAdapterResponse]]


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
    }


async def _worker_for(st: State, target: Target, key: str) -> Worker:
    """Adapter affinity first, then load; a cold adapter is placed once, whoever asks."""
    pool = candidates(st.routing.workers, target.base.name, target.adapter_id)
    worker = least_loaded(pool, st.routing.in_flight)
    if worker is not None:
        return worker
    if target.adapter_id is None:
        raise Unavailable(f"no worker serves {target.base.name} right now")
    task = st.placing.get(target.adapter_id)
    if task is None:
        task = asyncio.create_task(st.cp.place(key, target.adapter_id, st.settings.place_timeout_s))
        st.placing[target.adapter_id] = task
        task.add_done_callback(lambda _: st.placing.pop(target.adapter_id or "", None))
    placed = await asyncio.shield(task)
    worker = st.routing.get(placed.worker_id)
    if worker is None:
        await st.routing.refresh()
        worker = st.routing.get(placed.worker_id)
    if worker is None:
        raise Unavailable("the adapter's worker is not in the routing table yet")
    return worker


def _completion(path: str) -> Any:
    async def endpoint(request: Request) -> Response:
        st = _state(request)
        tenant_id = await st.keys.tenant_id(request)
        body = await _json_body(request, st.settings.max_body_bytes)
        client_model = body.get("model")
        target = await st.resolver.resolve(tenant_id, client_model)
        assert isinstance(client_model, str)
        worker = await _worker_for(st, target, _key(request))
        in_flight = st.routing.in_flight
        in_flight[worker.id] += 1

        def done() -> None:
            in_flight[worker.id] -= 1

        return await st.proxy.forward(worker.endpoint, path, body, target.upstream_model, client_model, done)

    return endpoint


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
    return JSONResponse({"status": "ok", "routing_version": _state(request).routing.version})


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, State]]:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        catalog = Catalog.load(settings.catalog_path)
        routing = RoutingTable(client)
        keys = KeyCache(client, settings.key_cache_ttl_s)
        resolver = Resolver(client, catalog, settings.adapter_cache_ttl_s)
        follower = asyncio.create_task(events.follow(client, routing, [keys, resolver], settings.routing_refresh_s))
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
            )
            try:
                yield {"lp": state}
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
                await cp.close()
                await client.aclose()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", _completion("/v1/chat/completions"), methods=["POST"]),
        Route("/v1/completions", _completion("/v1/completions"), methods=["POST"]),
        Route("/v1/adapters/upload", upload, methods=["POST"]),
        Route("/v1/adapters", list_adapters, methods=["GET"]),
        Route("/v1/adapters", create_adapter, methods=["POST"]),
        Route("/v1/adapters/{adapter_id}", get_adapter, methods=["GET"]),
        Route("/v1/adapters/{adapter_id}", delete_adapter, methods=["DELETE"]),
    ]
    handlers = {ApiError: errors.handle, HTTPException: errors.handle_http}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


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
