"""The data plane's errors and the one place that renders OpenAI's error envelope."""

from __future__ import annotations

import logging
import math
import re

import grpc
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error as OpenAI's API gives it: `type` one of OpenAI's, `code` a string or None, `param`
    the request parameter at fault by OpenAI's name."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("Invalid or missing API key.")


class Forbidden(ApiError):
    status, type, code = 403, "permission_error", "tenant_suspended"


class NotFound(ApiError):
    status, type, code = 404, "not_found_error", "model_not_found"


class Conflict(ApiError):
    status, type = 409, "invalid_request_error"


class TooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class InvalidAdapter(ApiError):
    status, type, code = 422, "invalid_request_error", "invalid_adapter"


class RateLimited(ApiError):
    status, type = 429, "rate_limit_error"


class RateLimitExceeded(RateLimited):
    """Over one of the tenant's rate limits: OpenAI's code, `Retry-After` and rate-limit headers."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float, headers: list[tuple[bytes, bytes]]) -> None:
        fields = {k.decode(): v.decode() for k, v in headers}
        super().__init__(message, headers=fields | {"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class RequestTimeout(ApiError):
    """The request's body did not arrive in time; the connection is closed after the answer."""

    status, type = 408, "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class Unavailable(ApiError):
    status, type = 503, "server_error"

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class Upstream(ApiError):
    status, type = 502, "server_error"


class Unreachable(Upstream):
    """The worker failed before answering anything: safe to try another one."""


class NotResident(Unreachable):
    """The worker answered that it does not hold the adapter (the routing table was behind an
    eviction): nothing reached the client, so another worker may be tried."""


BY_HTTP_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidAdapter,
    429: RateLimited,
    503: Unavailable,
}
BY_GRPC_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: Forbidden,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def from_grpc(err: grpc.aio.AioRpcError) -> ApiError:
    """A control plane status as our error; its `lp-http-status` trailer picks the class."""
    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthorized()
    http = next((v for k, v in (err.trailing_metadata() or ()) if k == "lp-http-status"), None)
    cls = BY_HTTP_STATUS.get(int(http)) if isinstance(http, str) and http.isdigit() else None
    cls = cls or BY_GRPC_CODE.get(err.code())
    if cls is None:
        log.warning("control plane call failed: %s %s", err.code(), err.details())
        return ApiError("internal error")
    if (
        cls is Unavailable
        and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        and http is None
    ):
        return Unavailable("the control plane is unavailable right now")
    return cls(err.details() or "error")


def envelope(err: ApiError) -> JSONResponse:
    """The answer to `err`, for Starlette's handlers and, called as an ASGI app, the hot path."""
    return JSONResponse({"error": fields(err)}, status_code=err.status, headers=err.headers)


def fields(err: ApiError) -> dict[str, str | None]:
    """The error object of OpenAI's envelope (`{"error": ...}`), in an answer or a stream's event."""
    return {"message": err.message, "type": err.type, "param": err.param, "code": err.code}


async def handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return envelope(exc)


async def handle_http(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (with its `Allow`), in the same envelope."""
    assert isinstance(exc, HTTPException)
    return envelope(http_error(exc.status_code, dict(exc.headers or {})))


def http_error(status: int, headers: dict[str, str] | None = None) -> ApiError:
    """No such path (404), or not with this method (405)."""
    if status == 405:
        err = ApiError("Method not allowed for this path.", headers=headers, code="method_not_allowed")
        err.status, err.type = 405, "invalid_request_error"
        return err
    err = ApiError("Unknown path.", headers=headers, code="unknown_url")
    err.status, err.type = status, "not_found_error" if status == 404 else "invalid_request_error"
    return err


# What a worker's (vLLM's) error may say, and what reaches the client of it.
CONTEXT_OVERFLOW = re.compile(r"maximum context length|context length \(\d+\)|is too long for the model", re.I)
PARAM = re.compile(r"^[a-z_][a-z0-9_]{0,40}(\.[a-z0-9_]{1,40}){0,3}$")
PROMPT_PARAMS = {"input_text", "input_tokens", "prompt", "messages", "input", "prompt_token_ids"}
INTERNALS = [
    (re.compile(r"(?:/[\w.@+-]+){2,}/?"), "<path>"),  # file paths
    (re.compile(r"\badp_[A-Za-z0-9]+"), "the adapter"),  # internal adapter ids
    (re.compile(r"\b[A-Z][A-Za-z]+(?:Error|Exception)\b:?\s*"), ""),  # exception class names
    (re.compile(r"\bv?llm[\w.-]*", re.I), "the engine"),
]


def from_worker(status: int, raw: bytes, prompt_param: str | None) -> ApiError:
    """A worker's error answer in loraplane's words: OpenAI's envelope and types, the message
    passed on only where it helps the client (a bad request) and without internals (paths,
    exception classes, adapter ids, engine names and versions); a prompt over the context
    window is OpenAI's `context_length_exceeded`."""
    try:
        info = orjson.loads(raw)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        info = None
    return worker_error(status, info, prompt_param)


def worker_error(status: int, info: object, prompt_param: str | None) -> ApiError:
    """A worker's error object (vLLM's `{"message", "type", "param", "code"}`, of an answer with
    HTTP status `status` or of an event in a stream) in loraplane's words, as `from_worker`
    says; `prompt_param` the request's prompt parameter (None: not known)."""
    message, param = "", None
    if isinstance(info, dict):
        message, param = str(info.get("message") or "")[:2000], info.get("param")
    if status in (400, 413, 422):
        if CONTEXT_OVERFLOW.search(message):
            return BadRequest(_plain(message), param=prompt_param, code="context_length_exceeded")
        name = param.removeprefix("body.") if isinstance(param, str) else None
        if name in PROMPT_PARAMS:
            name = prompt_param
        return BadRequest(
            _plain(message) or "The request is invalid.", param=name if name and PARAM.match(name) else None
        )
    log.warning("worker answered %d: %s", status, message[:500])
    if status == 429:
        return Unavailable("The model's workers are busy; try again shortly.")
    return Upstream("The model's worker failed to answer.")


def _plain(message: str) -> str:
    for pattern, replacement in INTERNALS:
        message = pattern.sub(replacement, message)
    return " ".join(message.split())[:500]
