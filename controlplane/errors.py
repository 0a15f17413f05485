"""The control plane's errors, and the one place they become gRPC statuses.

Each error carries its gRPC code and the HTTP status the data plane should answer
with; the status travels in the `lp-http-status` trailing metadata.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import redis

from controlplane.telemetry import CALLS
from loraplane import logs

log = logging.getLogger(__name__)

HTTP_STATUS_KEY = "lp-http-status"
Context = grpc.aio.ServicerContext[Any, Any]


class ControlPlaneError(Exception):
    code = grpc.StatusCode.INTERNAL
    http_status = 500


class BadRequest(ControlPlaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class InvalidAdapter(ControlPlaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422


class Unauthenticated(ControlPlaneError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(ControlPlaneError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class NotFound(ControlPlaneError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(ControlPlaneError):
    code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class QuotaExceeded(ControlPlaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class FailedPrecondition(ControlPlaneError):
    """The request is well formed but the state does not allow it (e.g. an operator's forced
    load onto another tenant's dedicated worker)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class TooLarge(ControlPlaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class NoCapacity(ControlPlaneError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class RegistryUnavailable(ControlPlaneError):
    """Redis is unreachable: fail fast, the caller retries later."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class LoadFailed(ControlPlaneError):
    """Every worker tried failed to load the adapter (not retried by callers' gRPC retries)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 503


async def abort(context: Context, err: ControlPlaneError) -> None:
    context.set_trailing_metadata(((HTTP_STATUS_KEY, str(err.http_status)),))
    await context.abort(err.code, str(err))


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Turn our errors into statuses; an unexpected error is logged and INTERNAL."""

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            answer = await method(self, request, context)
            CALLS.inc("controlplane", "", "OK")
            return answer
        except ControlPlaneError as err:
            CALLS.inc("controlplane", "", err.code.name)
            await abort(context, err)
        except redis.RedisError as err:
            CALLS.inc("controlplane", "", "UNAVAILABLE")
            log.warning("%s: Redis is unreachable: %s", method.__name__, err)
            await abort(context, RegistryUnavailable("the registry is unreachable; try again shortly"))
        except grpc.aio.AbortError:
            raise
        except Exception:
            CALLS.inc("controlplane", "", "INTERNAL")
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    @functools.wraps(method)
    async def streaming(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
            CALLS.inc("controlplane", "", "OK")
        except ControlPlaneError as err:
            CALLS.inc("controlplane", "", err.code.name)
            await abort(context, err)
        except redis.RedisError as err:
            CALLS.inc("controlplane", "", "UNAVAILABLE")
            log.warning("%s: Redis is unreachable: %s", method.__name__, err)
            await abort(context, RegistryUnavailable("the registry is unreachable; try again shortly"))
        except grpc.aio.AbortError:
            raise
        except Exception:
            CALLS.inc("controlplane", "", "INTERNAL")
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    wrapper: Callable[..., Awaitable[Any] | AsyncIterator[Any]]
    wrapper = streaming if inspect.isasyncgenfunction(method) else unary
    return _with_request_id(wrapper)  # type: ignore[return-value]


def _with_request_id(handler: Callable[..., Any]) -> Callable[..., Any]:
    """The caller's `x-request-id` (when sane) is on every line logged during the call, and is
    carried by the commands the call sends to agents."""

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        token = logs.REQUEST_ID.set(logs.from_metadata(context.invocation_metadata()))
        try:
            return await handler(self, request, context)
        finally:
            logs.REQUEST_ID.reset(token)

    @functools.wraps(handler)
    async def streaming(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        # Set, not reset: a stream may be closed from another context; this call's task is its own.
        logs.REQUEST_ID.set(logs.from_metadata(context.invocation_metadata()))
        async for item in handler(self, request, context):
            yield item

    return streaming if inspect.isasyncgenfunction(handler) else unary
