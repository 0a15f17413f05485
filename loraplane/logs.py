"""Log output for every component, and the request id that follows a request from the data
plane through the control plane to the agent.

`LORAPLANE_LOG_FORMAT=text` (the default): `time LEVEL logger [request id]: message`.
`LORAPLANE_LOG_FORMAT=json`: one JSON object per line with `ts`, `level`, `component`,
`logger`, `message`, `request_id` (when there is one) and the fields passed with `extra=`.
The request id lives in a context variable: set once where a request enters a component, it
is on every line logged while that request is handled, in that task and the tasks it starts.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from loraplane import config
from loraplane.config import var

HEADER = "x-request-id"  # the HTTP header and the gRPC metadata key
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("loraplane_request_id", default="")
_SANE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


def sane(value: str) -> bool:
    """A request id we accept from outside: 1 to 64 characters of [A-Za-z0-9._-]."""
    return _SANE.fullmatch(value) is not None


def new_id() -> str:
    return "req_" + secrets.token_hex(12)


def from_client(value: str | None) -> str:
    """The client's id if it is sane, else a new one."""
    return value if value is not None and sane(value) else new_id()


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The request id in gRPC metadata, or "" (absent or not sane)."""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and sane(value):
            return value
    return ""


def metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current request id, if there is one."""
    rid = REQUEST_ID.get()
    return ((HEADER, rid),) if rid else ()


class _RequestId(logging.Filter):
    """Puts the current request id on each record (unless `extra=` gave one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._with_id = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", ""):
            return self._with_id.format(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid := getattr(record, "request_id", ""):
            line["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def handler(component: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `fmt` ("text" or "json") lines to `stream` (stderr by default)."""
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter())
    out.addFilter(_RequestId())
    return out


def _format(value: str) -> str:
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _level(value: str) -> str:
    if value not in logging.getLevelNamesMapping():
        raise ValueError("not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return value


@dataclass(frozen=True)
class LogSettings:
    """What every component's entry point reads for its logs."""

    format: str = field(default="text", metadata=var("LORAPLANE_LOG_FORMAT", parse=_format))
    level: str = field(default="INFO", metadata=var("LORAPLANE_LOG_LEVEL", parse=_level))


def setup(component: str, environ: Mapping[str, str] | None = None) -> None:
    """Configure the root logger for an entry point: `LORAPLANE_LOG_FORMAT`, `LORAPLANE_LOG_LEVEL`."""
    settings = config.or_exit(lambda: config.from_env(LogSettings, os.environ if environ is None else environ))
    logging.basicConfig(level=settings.level, handlers=[handler(component, settings.format)], force=True)
