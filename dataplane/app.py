"""The data plane's ASGI app: the inference hot path, the Starlette routes for the rest, and
the collaborators they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dataplane import access, errors, events, fairshare, httpserver, inference
from dataplane.auth import KeyCache
from dataplane.breaker import Breaker
from dataplane.cpclient import ControlPlaneClient, answering
from dataplane.errors import ApiError, BadRequest, RequestTimeout, TooLarge
from dataplane.fairshare import Gate
from dataplane.inference import State, bearer, read_json
from dataplane.metering import Meter
from dataplane.metrics import Metrics
from dataplane.ratelimit import Limiter
from dataplane.resolve import Resolver
from dataplane.routing import RoutingTable
from dataplane.settings import Settings
from dataplane.upload import UploadStream
from dataplane.upstream import Pool
from loraplane import config, logs, metrics, nopickle
from loraplane.catalog import BaseModel, Catalog
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.state import client as state_client
from loraplane.state import queries, usage

log = logging.getLogger(__name__)
MAX_HEADER_BYTES = 16 << 10
EXCHANGE = "loraplane.exchange"  # the request's access.Exchange, in its scope
REJECTED = {400: "bad_request", 404: "unknown_base_model", 408: "timeout", 409: "name_taken", 413: "too_large",
            422: "invalid_adapter", 429: "quota", 503: "unavailable"}  # fmt: skip
CHANNEL_UP = frozenset({grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE})
STATUS = {apb.ADAPTER_STATUS_PENDING: "pending", apb.ADAPTER_STATUS_READY: "ready", apb.ADAPTER_STATUS_FAILED: "failed"}


def _state(request: Request) -> State:
    return request.state.lp  # type: ignore[no-any-return]


def _key(request: Request) -> str:
    return bearer(request.headers.get("authorization", ""))


async def _tenant(request: Request) -> str:
    tenant_id = await _state(request).keys.tenant_id(request.headers.get("authorization", ""))
    request.scope[access.TENANT] = tenant_id
    return tenant_id


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    timeout = _state(request).settings.body_timeout_s
    return await read_json(request.receive, request.headers.get("content-length", "").encode(), limit, timeout)


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
        "pinned": a.pinned,
    }


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
            await queries.record_use(client, batch)
        except redis.RedisError as err:
            log.debug("recording adapter use failed: %s", err)


async def last_usage(meter: Meter, within_s: float = 5.0) -> None:
    """At shutdown: the usage not written yet, written (tried for a few seconds)."""
    deadline = time.monotonic() + within_s
    while not await meter.flush() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def get_usage(request: Request) -> Response:
    """The tenant's usage in OpenAI's usage API shape: `/v1/usage/completions` (chat,
    completions, Responses) and `/v1/usage/embeddings`; never another tenant's."""
    st = _state(request)
    tenant_id = await _tenant(request)
    kind = request.url.path.rpartition("/")[2]
    try:
        query = usage.parse_query(kind, dict(request.query_params), time.time())
    except usage.QueryError as err:
        raise BadRequest(str(err), param=err.param) from None
    try:
        page = await usage.buckets(st.keys.client, tenant_id, query)
    except redis.RedisError:
        raise errors.Unavailable("usage is unavailable right now") from None
    return JSONResponse(usage.page_json(kind, page))


async def upload(request: Request) -> Response:
    st = _state(request)
    await _tenant(request)
    stream = UploadStream(
        request, st.resolver.catalog, st.settings.max_adapter_bytes, st.settings.upload_idle_timeout_s
    )
    try:
        adapter = await stream.send(st.cp.adapters, _key(request), st.settings.upload_timeout_s)
    except ApiError as err:
        st.metrics.upload_rejections.inc(REJECTED.get(err.status, "other"))
        if not stream.started:  # refused by its headers alone (a declared size over the limit): answered
            err.headers["Connection"] = "close"  # at once, unread (no `100 Continue`), and the connection closed
        elif not isinstance(err, RequestTimeout):  # a client too slow to send its body is not waited for again
            await stream.drain()
        raise
    finally:
        st.metrics.upload_bytes.inc(by=stream.file_bytes)
    return JSONResponse(adapter_json(adapter), status_code=201)


async def create_adapter(request: Request) -> Response:
    """Register an adapter from a Hugging Face repo; 202, status pending."""
    st = _state(request)
    await _tenant(request)
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
    await _tenant(request)
    adapter_id = request.path_params["adapter_id"]
    await st.cp.delete_adapter(_key(request), adapter_id)
    st.resolver.forget_id(adapter_id)  # at once here; other data planes hear it from Redis
    return JSONResponse({"id": adapter_id, "object": "adapter", "deleted": True})


async def pin_adapter(request: Request) -> Response:
    """Pin the adapter into one of the tenant's always-resident slots; answered once it is loaded."""
    st = _state(request)
    await _tenant(request)
    pinned = await st.cp.pin(_key(request), request.path_params["adapter_id"], st.settings.place_timeout_s)
    return JSONResponse(
        adapter_json(pinned.adapter) | {"pinned_slots": {"used": pinned.pinned, "allowed": pinned.pinned_slots}}
    )


async def unpin_adapter(request: Request) -> Response:
    st = _state(request)
    await _tenant(request)
    return JSONResponse(adapter_json(await st.cp.unpin(_key(request), request.path_params["adapter_id"])))


async def list_adapters(request: Request) -> Response:
    st = _state(request)
    await _tenant(request)
    adapters = await st.cp.list_adapters(_key(request))
    return JSONResponse({"object": "list", "data": [adapter_json(a) for a in adapters]})


async def get_adapter(request: Request) -> Response:
    st = _state(request)
    await _tenant(request)
    adapter = await st.cp.get_adapter(_key(request), request.path_params["adapter_id"])
    return JSONResponse(adapter_json(adapter))


def base_model_json(m: BaseModel) -> dict[str, object]:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "loraplane", "parent": None}


def adapter_model_json(a: apb.Adapter) -> dict[str, object]:
    return {"id": a.model, "object": "model", "created": a.created_at.seconds, "owned_by": "tenant",
            "parent": a.base_model}  # fmt: skip


async def list_models(request: Request) -> Response:
    st = _state(request)
    await _tenant(request)
    data = [base_model_json(m) for m in st.resolver.catalog.models.values()]
    adapters = await st.cp.list_adapters(_key(request))
    data += [adapter_model_json(a) for a in adapters if a.status == apb.ADAPTER_STATUS_READY]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    """One model of /v1/models, with the same 404 for what the tenant cannot see."""
    st = _state(request)
    tenant_id = await _tenant(request)
    model = request.path_params["model"]
    target = await st.resolver.resolve(tenant_id, model)
    if target.adapter_id is None:
        return JSONResponse(base_model_json(target.base))
    adapter = await st.cp.get_adapter(_key(request), target.adapter_id)
    return JSONResponse(adapter_model_json(adapter) | {"id": model})


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
    m = st.metrics
    m.routing_version.set(value=st.routing.version)
    m.healthy_workers.set(value=sum(w.healthy for w in st.routing.workers))
    m.placements_waiting.set(value=len(st.placing))
    m.redis_up.set("dataplane", value=0.0 if st.keys.redis_down.open else 1.0)
    channel = st.cp.channel.get_state(try_to_connect=True)
    m.controlplane_up.set("dataplane", value=float(channel in CHANNEL_UP))
    return Response(m.render(), media_type=metrics.CONTENT_TYPE)


def by_method(**handlers: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """One route for several methods, so that a wrong one is a 405 that lists them all."""

    async def handle(request: Request) -> Response:
        return await handlers[request.method](request)

    return handle


class DataPlane:
    """The ASGI app: inference requests go straight to `dataplane/inference.py`; the rest
    (adapters, models, health, metrics) and the lifespan to Starlette. Each request, whichever
    way it goes, through one `access.Exchange` (its id, status, count and access line)."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics()
        self.state: State | None = None
        routes = [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model}", get_model, methods=["GET"]),
            *(Route(f"/v1/usage/{kind}", get_usage, methods=["GET"]) for kind in usage.KINDS),
            Route("/v1/adapters/upload", upload, methods=["POST"]),
            Route("/v1/adapters", by_method(GET=list_adapters, POST=create_adapter), methods=["GET", "POST"]),
            Route("/v1/adapters/{adapter_id}", by_method(GET=get_adapter, DELETE=delete_adapter),
                  methods=["GET", "DELETE"]),
            Route("/v1/adapters/{adapter_id}/pin", by_method(POST=pin_adapter, DELETE=unpin_adapter),
                  methods=["POST", "DELETE"]),
        ]  # fmt: skip
        handlers = {ApiError: errors.handle, HTTPException: errors.handle_http}
        self.starlette = Starlette(routes=routes, lifespan=self._lifespan(settings), exception_handlers=handlers)
        self._dispatch: ASGIApp = self._route
        if settings.cors_origins:  # browsers' cross-origin calls: preflights answered, answers marked
            origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
            self._dispatch = CORSMiddleware(
                self._route, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["*"], expose_headers=["x-request-id"], max_age=600,
            )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
            return
        token = logs.REQUEST_ID.set(access.request_id(scope["headers"]))
        too_large = sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES
        hot = not too_large and scope["path"] in inference.PATHS and scope["method"] == "POST"
        exchange = access.Exchange(scope, send, self.metrics, inference=hot and self.state is not None)
        scope[EXCHANGE] = exchange
        try:
            if too_large:
                err = TooLarge(f"request headers are larger than {MAX_HEADER_BYTES} bytes")
                await errors.envelope(err)(scope, receive, exchange.send)
            else:
                await self._dispatch(scope, receive, exchange.send)
        finally:
            exchange.finish()
            logs.REQUEST_ID.reset(token)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange: access.Exchange = scope[EXCHANGE]
        if exchange.inference and self.state is not None:
            await inference.handle(self.state, scope, receive, send, exchange)
        elif scope["path"] in inference.PATHS and scope["method"] != "POST":
            await errors.envelope(errors.http_error(405, {"Allow": "POST"}))(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)

    def _lifespan(self, settings: Settings) -> Callable[[Starlette], AbstractAsyncContextManager[dict[str, State]]]:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[dict[str, State]]:
            client = state_client.connect(settings.redis_url, timeout_s=2)
            catalog = Catalog.load(settings.catalog_path)
            routing = RoutingTable(client, answering)
            redis_down = Breaker()
            keys = KeyCache(client, settings.key_cache_ttl_s, redis_down)
            resolver = Resolver(client, catalog, settings.adapter_cache_ttl_s, redis_down)
            used: dict[str, float] = {}
            day = 86400
            retention = usage.Retention(
                minute_s=round(settings.usage_minute_days * day),
                hour_s=round(settings.usage_retention_days * day),
                day_s=round(settings.usage_retention_days * day),
            )
            meter = Meter(client, retention, settings.usage_flush_s)
            limiter = Limiter(client, redis_down, settings.rate_burst_s)
            background = [
                asyncio.create_task(events.follow(client, routing, [keys, resolver], settings.routing_refresh_s)),
                asyncio.create_task(flush_used(client, used)),
                asyncio.create_task(meter.run()),
                asyncio.create_task(limiter.run()),
            ]
            cp = ControlPlaneClient(settings.controlplane_addr)
            headers = {"Authorization": f"Bearer {settings.worker_api_key}"} if settings.worker_api_key else {}
            upstream = Pool(headers)
            gate = Gate(
                routing.in_flight,
                self.metrics,
                dict(settings.tier_weights),
                settings.queue_timeout_s,
                settings.queue_max_per_tenant,
                replicas=settings.dataplane_replicas or 1,
                capacity_override=settings.worker_concurrency,
            )
            if not settings.dataplane_replicas:
                background.append(asyncio.create_task(fairshare.follow_replicas(client, gate, limiter.replica)))
            self.state = State(
                settings=settings,
                keys=keys,
                resolver=resolver,
                routing=routing,
                cp=cp,
                upstream=upstream,
                placing={},
                used=used,
                metrics=self.metrics,
                meter=meter,
                limiter=limiter,
                gate=gate,
            )
            try:
                yield {"lp": self.state}
            finally:
                self.state = None
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await last_usage(meter)
                upstream.close()
                await cp.close()
                await client.aclose()

        return lifespan


def create_app(settings: Settings) -> DataPlane:
    return DataPlane(settings)


def main() -> None:
    nopickle.install()
    import os

    import uvicorn

    logs.setup("dataplane")
    settings = config.or_exit(lambda: Settings.from_env(os.environ))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,  # uvicorn's loggers write through ours, in the same format
        loop="uvloop",
        http=httpserver.protocol(settings.header_timeout_s),
    )


if __name__ == "__main__":
    main()
