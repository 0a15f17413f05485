"""What every request goes through, on the hot path and the Starlette routes alike: its id (the
client's `X-Request-Id` if it is sane, else a new one), echoed in the `x-request-id` response
header and on every log line logged while the request is handled; its status and the time of its
first body byte; one count in the metrics and one `loraplane.access` line when it ends. The
`Exchange` does all of it, once per request.

The line names the method, path, status, duration, tenant id, the `model` the client sent and
the worker that answered; never the key, the body or anything else the client sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from starlette.types import Message, Scope, Send

from dataplane.metrics import Metrics, path_label
from loraplane import logs

log = logging.getLogger("loraplane.access")

# Scope keys the handlers fill in as they learn them.
TENANT = "loraplane.tenant_id"
MODEL = "loraplane.model"
WORKER = "loraplane.worker_id"
BASE_MODEL = "loraplane.base_model"  # the resolved base model of an inference request, for the metrics
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


class Exchange:
    """One request, from its first byte in to its last byte out. Its `send` echoes the request
    id in the response and notes the status and when the body began; `finish()` counts it in the
    metrics and writes its access line. `inference`: counted by base model too, and a request
    that ends without an answer is a 499 (its client left; the hot path answers everything
    else), where elsewhere it is a 500."""

    __slots__ = ("scope", "status", "started", "first_byte", "inference", "_send", "_metrics")

    def __init__(self, scope: Scope, send: Send, metrics: Metrics, *, inference: bool = False) -> None:
        self.scope, self._send, self._metrics, self.inference = scope, send, metrics, inference
        self.status = 499 if inference else 500
        self.started = time.perf_counter()
        self.first_byte = 0.0
        metrics.in_flight.add(by=1)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), header()]}
        elif not self.first_byte:
            self.first_byte = time.perf_counter()
        await self._send(message)

    def finish(self) -> None:
        took = time.perf_counter() - self.started
        m = self._metrics
        m.in_flight.add(by=-1)
        base = self.scope.get(BASE_MODEL, "") if self.inference else None
        first_byte = self.first_byte - self.started if self.first_byte else None
        m.ended(path_label(self.scope["path"]), self.status, took, base, first_byte)
        line(self.scope, self.status, took)
