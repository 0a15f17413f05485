"""The data plane's errors and the one place that renders OpenAI's error envelope."""

from __future__ import annotations

import logging

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self) -> None:
        super().__init__("Invalid or missing API key.")


class Forbidden(ApiError):
    status, type, code = 403, "invalid_request_error", "tenant_suspended"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class Conflict(ApiError):
    status, type = 409, "invalid_request_error"


class TooLarge(ApiError):
    status, type = 413, "invalid_request_error"


class InvalidAdapter(ApiError):
    status, type, code = 422, "invalid_request_error", "invalid_adapter"


class RateLimited(ApiError):
    status, type = 429, "rate_limit_error"


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
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


async def handle(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return envelope(exc)


async def handle_http(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405, in the same envelope."""
    assert isinstance(exc, HTTPException)
    err = ApiError(exc.detail)
    err.status, err.type = exc.status_code, "invalid_request_error"
    return envelope(err)
