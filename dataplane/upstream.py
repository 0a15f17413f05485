"""The data plane's HTTP/1.1 client to workers: keep-alive connections per worker, responses
parsed by httptools (the parser uvicorn uses) and handed on chunk by chunk.

Chosen over aiohttp by `bench/hotpath.py`: a proxy needs one request shape (POST of a JSON body)
and the response as bytes arrive; aiohttp's generality cost ~200 µs of CPU per request here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools

from dataplane.errors import Unreachable, Upstream

MAX_IDLE_PER_WORKER = 256


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self._response: Response | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(Upstream(f"the worker sent a malformed response: {err}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(None)

    def pause_writing(self) -> None:  # requests are small: never paused in practice
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        self._response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        r = self._response
        assert r is not None
        r.status = self.parser.get_status_code()
        if not r.started.done():
            r.started.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response.feed(body)

    def on_message_complete(self) -> None:
        r = self._response
        assert r is not None
        r.keep_alive = self.parser.should_keep_alive()
        r.finish(None)

    def _fail(self, err: Exception | None) -> None:
        r = self._response
        if r is None:
            return
        if not r.started.done():
            r.started.set_exception(err or Unreachable("the worker closed the connection before answering"))
        elif not r.complete:
            if r.body_started:
                r.finish(err or Upstream("the worker closed the connection mid-answer"))
            else:  # nothing of the answer can have been passed on
                r.finish(err or Unreachable("the worker closed the connection after its headers, before its body"))

    def begin(self, response: Response, request: bytes) -> None:
        assert self.transport is not None
        self._response = response
        self.transport.write(request)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A worker's response: status and headers once `started`, then the body as it comes. A
    connection lost before the body's first byte is Unreachable too: none of the answer can
    have reached the client."""

    def __init__(self, pool: Pool, key: tuple[str, int], conn: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.keep_alive = False
        self.complete = False
        self.body_started = False  # a byte of the body came
        self._pool, self._key, self._conn = pool, key, conn
        self._chunks: deque[bytes] = deque()
        self._error: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes:
        return next((v for k, v in self.headers if k == name), b"")

    def feed(self, data: bytes) -> None:
        self.body_started = True
        self._chunks.append(data)
        self._wake()

    def finish(self, err: Exception | None) -> None:
        self.complete = True
        self._error = err
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def chunks(self, timeout: float) -> list[bytes]:
        """What arrived since the last call (waiting for something); [] once the body is over."""
        while not self._chunks and not self.complete:
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._wakeup, timeout)
            except TimeoutError:
                raise Upstream("the worker stopped sending") from None
        if self._chunks:
            out = list(self._chunks)
            self._chunks.clear()
            return out
        if self._error is not None:
            raise self._error
        return []

    async def read(self, timeout: float) -> bytes:
        parts = []
        while chunks := await self.chunks(timeout):
            parts += chunks
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back if the answer was read whole and may be reused; else close it."""
        conn, self._conn._response = self._conn, None
        if self.complete and self._error is None and self.keep_alive and not conn.lost:
            self._pool.give_back(self._key, conn)
        else:
            conn.close()


class Pool:
    def __init__(self, headers: dict[str, str], connect_timeout_s: float = 5.0) -> None:
        self._head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._connect_timeout = connect_timeout_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._hosts: dict[str, tuple[str, int, str]] = {}

    def _target(self, base_url: str) -> tuple[str, int, str]:
        target = self._hosts.get(base_url)
        if target is None:
            u = urlsplit(base_url)
            if u.scheme != "http" or not u.hostname:
                raise Unreachable(f"unsupported worker endpoint {base_url!r}")
            target = (u.hostname, u.port or 80, u.path.rstrip("/"))
            self._hosts[base_url] = target
        return target

    async def post(self, base_url: str, path: str, body: bytes, timeout: float) -> Response:
        """Send the request; return once the status and headers are in. Unreachable, here or
        from the body before its first byte, means none of an answer came (safe to try another
        worker)."""
        host, port, prefix = self._target(base_url)
        key = (host, port)
        request = (
            f"POST {prefix}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n{self._head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        idle = self._idle.get(key)
        conn = idle.pop() if idle else None
        if conn is not None and not conn.lost:
            try:
                return await self._send(conn, key, request, timeout)
            except Unreachable:  # a kept-alive connection the worker had closed: once more, on a new one
                pass
        return await self._send(await self._connect(host, port), key, request, timeout)

    async def _send(self, conn: _Connection, key: tuple[str, int], request: bytes, timeout: float) -> Response:
        response = Response(self, key, conn)
        conn.begin(response, request)
        try:
            await asyncio.wait_for(response.started, timeout)
        except TimeoutError:
            conn.close()
            raise Upstream("the worker did not answer in time") from None
        except BaseException:
            conn.close()
            raise
        return response

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, host, port), self._connect_timeout)
        except (OSError, TimeoutError) as err:
            raise Unreachable(f"the worker could not be reached: {type(err).__name__}") from None
        return conn

    def give_back(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_PER_WORKER:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
