"""Raw asyncio HTTP peers on 127.0.0.1:0 that write exact bytes: workers whose every protocol
case (and failure) is pinned byte for byte."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class Peer:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    handlers: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = field(default_factory=list)


Handler = Callable[[Peer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request as sent: its head and its content-length body; b"" once the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return b""
    length = next(int(v) for k, _, v in (ln.partition(b": ") for ln in head.split(b"\r\n")) if k == b"Content-Length")
    return head + await reader.readexactly(length)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as the kernel does for a killed process's connections."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@asynccontextmanager
async def peer(handler: Handler) -> AsyncIterator[Peer]:
    """A server on a free loopback port running `handler` per connection."""
    state = Peer("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        state.handlers.append((task, writer))
        try:
            await handler(state, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with asyncio.timeout(10):  # no case here may hang
            yield state
    finally:
        server.close()
        for _, writer in state.handlers:
            writer.close()  # a handler waiting for the next request sees the end of the stream
        async with asyncio.timeout(5):
            await asyncio.gather(*(task for task, _ in state.handlers))
        await server.wait_closed()
