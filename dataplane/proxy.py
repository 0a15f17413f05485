"""Forwarding a request to a worker and its answer back, streamed as it comes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import aiohttp
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from dataplane.errors import Unreachable, Upstream

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, worker_api_key: str, timeout_s: float) -> None:
        self._session = session
        self._headers = {"Content-Type": "application/json"}
        if worker_api_key:
            self._headers["Authorization"] = f"Bearer {worker_api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)

    async def forward(
        self,
        endpoint: str,
        path: str,
        body: dict[str, object],
        upstream_model: str,
        client_model: str,
        done: Callable[[], None],
    ) -> Response:
        """The worker's answer; `done` is called once, when it has been sent or has failed."""
        old, new = _model_field(upstream_model), _model_field(client_model)
        try:
            try:
                upstream = await self._session.post(
                    endpoint + path,
                    data=json.dumps(dict(body, model=upstream_model)),
                    headers=self._headers,
                    timeout=self._timeout,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as err:
                raise Unreachable(f"the worker could not be reached: {type(err).__name__}") from None
            except (aiohttp.ClientError, TimeoutError) as err:
                raise Upstream(f"the worker did not answer: {type(err).__name__}") from None
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if upstream.content_type == "text/event-stream":
                return StreamingResponse(
                    _lines(upstream, old, new),
                    status_code=upstream.status,
                    headers=headers,
                    background=BackgroundTask(_finish, upstream, done),
                )
            try:
                content = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as err:
                raise Upstream(f"the worker failed mid-answer: {type(err).__name__}") from None
            finally:
                upstream.release()
        except BaseException:
            done()
            raise
        done()
        return Response(content.replace(old, new), status_code=upstream.status, headers=headers)


async def _finish(upstream: aiohttp.ClientResponse, done: Callable[[], None]) -> None:
    upstream.release()
    done()


def _model_field(model: str) -> bytes:
    return b'"model":' + json.dumps(model).encode()


async def _lines(upstream: aiohttp.ClientResponse, old: bytes, new: bytes) -> AsyncIterator[bytes]:
    """SSE events line by line, each passed on as soon as it arrives."""
    try:
        async for line in upstream.content:
            yield line.replace(old, new)
    finally:
        upstream.close()
