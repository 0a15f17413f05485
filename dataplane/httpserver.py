"""uvicorn's HTTP protocol with a deadline for a request's headers.

uvicorn times out idle kept-alive connections, not a request whose headers trickle in (slowloris):
such a client would hold its connection, and a file descriptor, for ever. Here the headers must
be complete within `header_timeout_s` of the connection opening or of the request's first byte;
otherwise the answer is 408, logged as an access line with method and path "-" (the request never
reached the app), and the connection is closed. (Request bodies have their own budgets in the
handlers.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dataplane import access
from loraplane import logs

TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 31\r\nconnection: close\r\n\r\nrequest headers were too slow\r\n"
)


class HeaderDeadline(HttpToolsProtocol):
    header_timeout_s = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._armed_at = time.perf_counter()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(TIMED_OUT)
            self.transport.close()
            logs.REQUEST_ID.set(logs.new_id())  # in this callback's own copy of the context
            access.line({"method": "-", "path": "-"}, 408, time.perf_counter() - self._armed_at)


def protocol(header_timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class for uvicorn's `http=`, with this deadline."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": header_timeout_s})
