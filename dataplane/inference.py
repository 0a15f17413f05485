"""The hot path: chat completions, completions and embeddings, as a plain ASGI handler (no
framework in the way; `bench/hotpath.py` measured Starlette's request/response layers at a third
of the data plane's CPU per request).

Auth from the in-process key cache, the body read under its limit, request limits, the tenant's
cache salt, `model` resolved, a worker picked from the routing table (placing a cold adapter once
however many wait), the request forwarded and the answer passed on chunk by chunk in OpenAI's
shape (`shape`: schema-true, `model` what the client sent, nothing of the engine's own). A client
that leaves cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from dataplane import access, errors, shape, tools
from dataplane.auth import KeyCache
from dataplane.cpclient import ControlPlaneClient
from dataplane.errors import (
    ApiError,
    BadRequest,
    NotResident,
    RateLimitExceeded,
    RequestTimeout,
    TooLarge,
    Unavailable,
    Unreachable,
    Upstream,
)
from dataplane.fairshare import Gate, Slot
from dataplane.metering import Meter, Seen
from dataplane.metrics import Metrics
from dataplane.ratelimit import Admission, Limiter, RateLimited, estimate
from dataplane.resolve import Resolver, Target
from dataplane.routing import RoutingTable, Worker, candidates, least_loaded, wants_copy
from dataplane.settings import Settings
from dataplane.upstream import Pool
from dataplane.upstream import Response as UpstreamResponse
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.state.records import Tenant

log = logging.getLogger(__name__)


PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "chat", "/v1/embeddings": "embedding",
         "/v1/responses": "chat"}  # fmt: skip
PROMPT_PARAM = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input",
                "/v1/responses": "input"}  # fmt: skip
REPLICA_LINGER_S = 2.0
SSE_DONE = b"data: [DONE]\n\n"  # a stream's last event
# Headers of the worker's answer that are the connection's, not the answer's.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"content-encoding", b"server", b"date",
     b"te", b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-connection"}
)  # fmt: skip


@dataclass
class State:
    settings: Settings
    keys: KeyCache
    resolver: Resolver
    routing: RoutingTable
    cp: ControlPlaneClient
    upstream: Pool
    placing: dict[tuple[str, bool, frozenset[str]], asyncio.Task[apb.PlaceAdapterResponse]]
    used: dict[str, float]  # adapter id -> when last requested here, until flushed to Redis
    metrics: Metrics
    meter: Meter
    limiter: Limiter
    gate: Gate


class ClientGone(Exception):
    """The client disconnected before its request was read."""


def bearer(authorization: str) -> str:
    return authorization.partition(" ")[2].strip()


def cache_salt(secret: str, tenant_id: str) -> str:
    """The same per tenant on every data plane; a tenant's prompts can share vLLM's prefix cache
    with each other, never with another tenant's (whatever `cache_salt` the client sent)."""
    return hmac.new(secret.encode(), f"cache-salt:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def check_limits(body: dict[str, Any], settings: Settings) -> None:
    """Request limits, each a clear 400 naming the parameter."""
    for name, most in (("max_tokens", settings.max_tokens), ("max_completion_tokens", settings.max_tokens),
                       ("max_output_tokens", settings.max_tokens), ("n", settings.max_n),
                       ("best_of", settings.max_n)):  # fmt: skip
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise BadRequest(f"{name!r} must be an integer from 1 to {most}", param=name)


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def check_messages(messages: object) -> None:
    """A chat's messages as OpenAI takes them: a non-empty list of objects of its roles."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}", param=f"messages[{i}].role"
            )


def check_responses(body: dict[str, Any]) -> None:
    """The Responses API without state kept on a worker: a response is not stored (workers are
    shared by tenants, and a stored one could be read by id through any of them), so what needs
    a stored one is refused, by name."""
    if body.get("store") is True:
        raise BadRequest("'store': true is not supported here: responses are not stored; omit it or send false",
                         param="store")  # fmt: skip
    for name in ("previous_response_id", "background", "conversation"):
        if body.get(name):
            raise BadRequest(f"{name!r} is not supported here: responses are not stored", param=name)
    body["store"] = False


async def read_json(receive: Receive, content_length: bytes | None, limit: int, timeout_s: float) -> dict[str, Any]:
    """The request body as a JSON object, whole within `timeout_s`; a declared length over the
    limit is refused unread."""
    if content_length and content_length.isdigit() and int(content_length) > limit:  # answered unread, and closed
        raise TooLarge(f"request body is larger than {limit} bytes", headers={"Connection": "close"})
    raw = b""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                raw += message.get("body", b"")
                if len(raw) > limit:
                    raise TooLarge(f"request body is larger than {limit} bytes")
                if not message.get("more_body"):
                    break
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout_s:.0f}s") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def handle(st: State, scope: Scope, receive: Receive, send: Send, exchange: access.Exchange) -> None:
    """One inference request, start to end, answered through `send`; `exchange` counts it and
    logs it when it ends."""
    path = scope["path"]
    try:
        exchange.status = await _answer(st, scope, receive, send, path, PATHS[path])
    except ApiError as err:
        await errors.envelope(err)(scope, receive, send)
    except ClientGone:
        pass


async def _answer(st: State, scope: Scope, receive: Receive, send: Send, path: str, kind: str) -> int:
    headers = dict(scope["headers"])
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    tenant = await st.keys.tenant(authorization)
    scope[access.TENANT] = tenant.id
    body = await read_json(
        receive, headers.get(b"content-length"), st.settings.max_body_bytes, st.settings.body_timeout_s
    )
    check_limits(body, st.settings)
    if path == "/v1/responses":
        check_responses(body)
    elif path == "/v1/chat/completions":
        check_messages(body.get("messages"))
    body["cache_salt"] = cache_salt(st.settings.worker_api_key, tenant.id)
    client_model = body.get("model")
    target = await st.resolver.resolve(tenant.id, client_model)
    scope[access.BASE_MODEL] = target.base.name  # a catalog name: a bounded label
    assert isinstance(client_model, str)
    scope[access.MODEL] = client_model  # a name that resolved: the catalog's and the tenant's, no free text
    if target.base.kind != kind:
        raise BadRequest(f"{target.base.name} is not a {kind} model; {path} serves {kind} models", param="model")
    if body.get("tools") and not target.base.tool_parser and body.get("tool_choice", "auto") == "auto":
        raise BadRequest(
            f"{target.base.name} has no tool-call parser configured, so tool_choice 'auto' is not available; "
            "send tool_choice 'required' or a named function",
            param="tool_choice",
        )
    forced = tools.force(body) if path == "/v1/chat/completions" else None
    wanted = ask_for_usage(body) if path in STREAM_USAGE else shape.CONTINUOUS_USAGE
    key = bearer(authorization)
    admission = await admit(st, tenant, body, path)
    seen = Seen()

    # From here a client that leaves cancels this task, and so the upstream request.
    task = asyncio.current_task()
    assert task is not None
    departure = Departure(task)
    watcher = asyncio.create_task(departure.watch(receive))
    limit_headers = admission.headers() if admission is not None else []
    reply = Reply(client_model, departure.guarded(send), forced, seen, wanted, limit_headers)
    slot: Slot | None = None
    try:
        slot = await worker_for(st, target, key, tenant)
        scope[access.WORKER] = slot.worker.id
        try:
            return await _forward(st, slot.worker, path, body, target, reply)
        except Unreachable as err:  # nothing reached the client: once more, elsewhere
            tried = slot.worker.id
            if not isinstance(err, NotResident):
                st.routing.suspect(tried)
            slot.release()
            slot = await worker_for(st, target, key, tenant, avoid=frozenset({tried}))
            scope[access.WORKER] = slot.worker.id
            return await _forward(st, slot.worker, path, body, target, reply)
    except asyncio.CancelledError:
        if departure.left and task.cancelling() <= 1:
            task.uncancel()
            return 499
        raise
    finally:
        if slot is not None:
            slot.release()
        watcher.cancel()
        used = seen.total()  # what reached the client (a retry's first try sent nothing)
        if used is not None:
            usage_kind = "embeddings" if kind == "embedding" else "completions"
            st.meter.add(tenant.id, usage_kind, client_model, target.adapter_id or "", used)
            st.metrics.tokens.inc(target.base.name, tenant.tier, "input", by=used.input_tokens)
            st.metrics.tokens.inc(target.base.name, tenant.tier, "output", by=used.output_tokens)
            st.metrics.metered.inc(target.base.name, tenant.tier)
        if admission is not None:  # no usage: no answer (an error, or nothing generated yet)
            admission.settle(0 if used is None else used.input_tokens + used.output_tokens)


# Where a stream's usage is asked of the worker in every event (`continuous_usage_stats`).
STREAM_USAGE = frozenset({"/v1/chat/completions", "/v1/completions"})


def ask_for_usage(body: dict[str, Any]) -> int:
    """A stream's usage, asked of the worker in every event (for metering, and so a stream cut
    off is counted with what it generated); what the client asked for of it is returned."""
    if body.get("stream") is not True:
        return shape.CONTINUOUS_USAGE  # a whole answer carries its usage anyway
    options = body.get("stream_options")
    options = options if isinstance(options, dict) else {}
    wanted = shape.NO_USAGE
    if options.get("include_usage") is True:
        wanted = shape.CONTINUOUS_USAGE if options.get("continuous_usage_stats") is True else shape.FINAL_USAGE
    body["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": True}
    return wanted


async def admit(st: State, tenant: Tenant, body: dict[str, Any], path: str) -> Admission | None:
    """The tenant's rate limits (its own, else its tier's): None when it has none."""
    limits = tenant.rate_limits(st.settings.tier_rate_limits)
    if not (limits.rpm or limits.tpm or limits.concurrency):
        return None
    completion = 0 if path == "/v1/embeddings" else st.settings.estimate_completion_tokens
    try:
        return await st.limiter.admit(tenant.id, limits, estimate(body, PROMPT_PARAM[path], completion))
    except RateLimited as err:
        st.metrics.rate_limited.inc(err.reason)
        raise RateLimitExceeded(err.message, err.retry_after_s, err.headers) from None


@dataclass(frozen=True)
class Reply:
    """How an answer goes back: `model` as the client sent it, through `send`; a forced tool
    call's answer made the call; the usage noted in `seen`, of it what the client `wanted`; with
    the tenant's rate-limit `headers`."""

    model: str
    send: Send
    forced: tools.Forced | None
    seen: Seen
    wanted: int
    headers: list[tuple[bytes, bytes]]


class Departure:
    """Cancels a request's task when its client disconnects, unless the answer's last message is
    already on its way (a cancellation then would land outside the request, in the server) or a
    stream's last event (`data: [DONE]`) was sent: clients close once they read it, and the
    answer they got was whole."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.left = False
        self._finishing = False

    async def watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        if not self._finishing:
            self.task.cancel()

    def guarded(self, send: Send) -> Send:
        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.body" and (
                not message.get("more_body") or message["body"].endswith(SSE_DONE)
            ):
                self._finishing = True
            await send(message)

        return guarded_send


async def _forward(st: State, worker: Worker, path: str, body: dict[str, Any], target: Target, reply: Reply) -> int:
    adapter_in_flight = st.routing.adapter_in_flight
    if target.adapter_id:
        adapter_in_flight[target.adapter_id] += 1
    try:
        body["model"] = target.upstream_model
        timeout = st.settings.upstream_timeout_s
        upstream = await st.upstream.post(worker.endpoint, path, orjson.dumps(body), timeout)
        if upstream.status == 404 and target.adapter_id:
            upstream.release()  # never relayed: it would name the adapter's id
            raise NotResident(f"worker {worker.id} does not hold the adapter")
        if upstream.status >= 400:  # never relayed as it is: in loraplane's words
            try:
                raw = await upstream.read(timeout)
            finally:
                upstream.release()
            # A worker's own failure is not retried, nor held against the worker: a request that
            # makes an engine fail would otherwise cost two workers, or take one out of routing.
            raise errors.from_worker(upstream.status, raw, PROMPT_PARAM[path])
        try:
            return await _relay(upstream, reply, timeout, path)
        finally:
            upstream.release()
    finally:
        if target.adapter_id:
            adapter_in_flight[target.adapter_id] -= 1


async def _relay(upstream: UpstreamResponse, reply: Reply, timeout: float, path: str) -> int:
    """The worker's answer to the client in OpenAI's shape (`shape`), `model` what the client sent;
    SSE line by line as it arrives. A stream the worker breaks off ends with an error event.
    Unreachable while nothing was sent: a stream's worker that fails before its first byte."""
    headers = [(k, v) for k, v in upstream.headers if k not in HOP_BY_HOP and k != access.HEADER]
    headers += reply.headers
    send, model = reply.send, reply.model
    if not upstream.header(b"content-type").startswith(b"text/event-stream"):
        content = shape.body(await upstream.read(timeout), model, reply.seen)
        if reply.forced is not None and upstream.status == 200:  # a forced tool call: the answer is the call
            content_type, content = tools.answer(reply.forced, content)
            headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", content_type)]
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        return upstream.status
    # vLLM sends a stream's headers at once, before its engine made anything: the client gets
    # them with the first bytes of the body, so a worker lost (or silent) until then can be replaced.
    try:
        chunks = await upstream.chunks(timeout)
    except Upstream as err:
        raise Unreachable(f"the worker's stream broke before its first event: {err.message}") from None
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    partial, tail, ending, prompt_param = b"", b"", b"", PROMPT_PARAM.get(path)
    try:
        while chunks:
            data = partial + b"".join(chunks)
            cut = data.rfind(b"\n") + 1  # whole lines only: an event never straddles two sends
            partial = data[cut:]
            if cut:
                events = shape.events(data[:cut], model, reply.seen, reply.wanted, prompt_param)
                tail = events[-64:]
                await send({"type": "http.response.body", "body": events, "more_body": True})
            chunks = await upstream.chunks(timeout)
    except Upstream as err:  # the answer has started: it can only end, saying it broke off
        log.warning("worker stream broke: %s", err)
        if SSE_DONE not in tail and not reply.seen.ended:  # not after its end
            partial, ending = b"", _broken_off(path, reply)  # a line cut in two is dropped
    events = shape.events(partial, model, reply.seen, reply.wanted, prompt_param) + ending
    await send({"type": "http.response.body", "body": events, "more_body": False})
    return upstream.status


BROKE_OFF = "the worker's answer broke off; ask again"


def _broken_off(path: str, reply: Reply) -> bytes:
    """The event that ends a stream its worker broke off, so that the client knows its answer is
    not whole: OpenAI's error (the SDKs raise it), as a Responses stream's `error` event there."""
    if path == "/v1/responses":
        sequence = reply.seen.sequence + 1
        event = {"type": "error", "code": None, "message": BROKE_OFF, "param": None, "sequence_number": sequence}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
    return b"data: " + orjson.dumps({"error": errors.fields(Upstream(BROKE_OFF))}) + b"\n\n" + SSE_DONE


async def worker_for(st: State, target: Target, key: str, tenant: Tenant, avoid: frozenset[str] = frozenset()) -> Slot:
    """A slot on a worker of the tenant's pool (`pool_for`): adapter affinity first, then load (a
    cold adapter is placed once, whoever asks); then the fair queue's turn (`fairshare`)."""
    base = target.base.name
    pool = pool_for(st, tenant, base)

    def usable() -> list[Worker]:
        workers = st.routing.usable(st.routing.workers)
        return [w for w in workers if w.id not in avoid] if avoid else list(workers)

    if target.adapter_id is None:
        return await _enter(st, tenant, base, pool, lambda: candidates(usable(), base, None, pool))
    adapter_id = target.adapter_id
    st.used[adapter_id] = time.time()
    holders = candidates(usable(), base, adapter_id, pool)
    st.metrics.routing.inc("hit" if holders else "miss")
    if holders:
        fleet: list[Worker] = []

        def pool_workers() -> list[Worker]:  # only past the rule's cheap tests: not on every request
            if not fleet:
                fleet.extend(candidates(usable(), base, None, pool))
            return fleet

        in_flight, threshold = st.routing.in_flight, st.settings.replicate_at_in_flight
        hot = wants_copy(st.routing.adapter_in_flight[adapter_id] + 1, holders, in_flight, pool_workers, threshold)
        full = not any(st.gate.has_room(w) for w in holders)  # its copies are full: one more, elsewhere
        if (hot or full) and len(pool_workers()) > len(holders):
            single_flight(st, key, adapter_id, replicate=True)
    else:
        st.metrics.cold_waiting.add(by=1)
        try:
            placed = await asyncio.shield(single_flight(st, key, adapter_id, avoid=avoid))
        finally:
            st.metrics.cold_waiting.add(by=-1)
        worker = st.routing.placed(placed.worker_id, adapter_id)
        if worker is None:
            await st.routing.refresh()
            worker = st.routing.placed(placed.worker_id, adapter_id)
        if worker is None:
            raise Unavailable("the adapter's worker is not in the routing table yet")
        pool = worker.pool  # its own pool, or the shared workers when it spilled over
    return await _enter(st, tenant, base, pool, lambda: candidates(usable(), base, None, pool), (adapter_id, key))


async def _enter(
    st: State,
    tenant: Tenant,
    base: str,
    pool: str,
    scope_workers: Callable[[], list[Worker]],
    adapter: tuple[str, str] | None = None,
) -> Slot:
    """The fair queue of the base model's workers in the pool: a slot on the least loaded of the
    request's workers (those holding its adapter, given as (id, the caller's key)) that has room,
    one whose GPU slots hold the adapter first (`least_loaded`). An adapter evicted while its
    request waits is placed again (once, however many wait)."""
    routing = st.routing
    gate, in_flight, in_gpu = st.gate, routing.in_flight, routing.in_gpu
    if not scope_workers():
        raise Unavailable(f"no worker serves {base} right now")

    def pick() -> Worker | None:
        workers = scope_workers()
        if adapter is not None:
            workers = [w for w in workers if adapter[0] in w.resident]
            if not workers:
                single_flight(st, adapter[1], adapter[0])
            return least_loaded([w for w in workers if gate.has_room(w)], in_flight, adapter[0], in_gpu)
        return least_loaded([w for w in workers if gate.has_room(w)], in_flight)

    slot = await gate.enter(gate.scope(base, pool, scope_workers), tenant.id, tenant.tier, pick, base)
    if adapter is not None:
        routing.routed(slot.worker, adapter[0])
    return slot


def pool_for(st: State, tenant: Tenant, base: str) -> str:
    """The pool the tenant's requests for the base model go to: its dedicated pool (its id) if it
    has one, else the shared workers (""); the shared ones too when its pool has no worker of the
    model serving and it may spill over. Unavailable (503) when none serves, with the reason."""
    pools = st.routing.pools(tenant.id, base, tenant.spill)
    for pool in pools:
        if any(w.healthy and w.base_model == base and w.pool == pool for w in st.routing.workers):
            return pool
    if pools[0]:
        spill = "" if tenant.spill else " (spill-over to shared workers is off for this tenant)"
        raise Unavailable(f"none of the tenant's dedicated workers of {base} is serving right now{spill}")
    raise Unavailable(f"no worker serves {base} right now")


def single_flight(
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
