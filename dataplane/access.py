"""Request ids and the access log: every request gets an id (the client's `X-Request-Id` if it
is sane, else a new one), echoed in the `x-request-id` response header and on every log line
logged while the request is handled, and one `loraplane.access` line when it ends.

The line names the method, path, status, duration, tenant id, the `model` the client sent and
the worker that answered; never the key, the body or anything else the client sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane import logs

log = logging.getLogger("loraplane.access")

# Scope keys the handlers fill in as they learn them.
TENANT = "loraplane.tenant_id"
MODEL = "loraplane.model"
WORKER = "loraplane.worker_id"
HEADER = logs.HEADER.encode()


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key == HEADER:  # servers hand header names over lower-cased
            return logs.from_client(value.decode("latin-1"))
    return logs.new_id()


def header() -> tuple[bytes, bytes]:
    """The response header echoing the current request's id."""
    return HEADER, logs.REQUEST_ID.get().encode()


def line(scope: Scope, status: int, seconds: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    path = scope["path"]
    if len(path) > 200 or not path.isprintable():  # a client's path, never a broken log line
        path = repr(path[:200])
    fields = {
        "method": scope["method"],
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
        "tenant_id": scope.get(TENANT, ""),
        "model": scope.get(MODEL, ""),
        "worker_id": scope.get(WORKER, ""),
    }
    log.info(
        "%s %s %d %.1fms tenant=%s model=%s worker=%s",
        fields["method"], path, status, fields["duration_ms"],
        fields["tenant_id"] or "-", fields["model"] or "-", fields["worker_id"] or "-",
        extra=fields,
    )  # fmt: skip


async def logged(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `app` with the request id echoed in its response, then log the access line."""
    started = time.perf_counter()
    status = 500

    async def send_with_id(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), header()]}
        await send(message)

    try:
        await app(scope, receive, send_with_id)
    finally:
        line(scope, status, time.perf_counter() - started)
