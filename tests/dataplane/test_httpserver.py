"""uvicorn with the header deadline (`dataplane/httpserver.py`): a real server on 127.0.0.1:0 in
a thread, raw sockets as clients, so what reaches the wire and when is what is tested."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from dataplane import httpserver
from tests.support import wait_for

DEADLINE_S = 0.5
GET = b"GET /hello HTTP/1.1\r\nHost: test\r\n\r\n"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers `<method> <path> <body bytes>`."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = f"{scope['method']} {scope['path']} {size}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=httpserver.protocol(DEADLINE_S), loop="asyncio", lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn did not start")
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


def connect(address: tuple[str, int]) -> socket.socket:
    conn = socket.create_connection(address, timeout=10)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def read_to_close(conn: socket.socket) -> bytes:
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    return out


def read_response(conn: socket.socket) -> bytes:
    """One response with a content-length body."""
    out = b""
    while b"\r\n\r\n" not in out:
        out += conn.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_fast_request_is_served(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(GET)
        response = read_response(conn)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nGET /hello 0")


def test_headers_that_never_complete_get_408_and_a_close_at_the_deadline(
    address: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loraplane.access")
    with connect(address) as conn:
        started = time.monotonic()
        conn.sendall(b"GET /hello HTTP/1.1\r\nHost: te")
        answer = read_to_close(conn)
        elapsed = time.monotonic() - started
    assert answer == httpserver.TIMED_OUT
    assert DEADLINE_S - 0.05 < elapsed < DEADLINE_S + 2
    wait_for(lambda: any(r.name == "loraplane.access" for r in caplog.records), 5, "no access line")
    (line,) = [r for r in caplog.records if r.name == "loraplane.access"]
    assert (line.__dict__["method"], line.__dict__["path"], line.__dict__["status"]) == ("-", "-", 408)


def test_a_connection_that_sends_nothing_gets_408_at_the_deadline(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        started = time.monotonic()
        answer = read_to_close(conn)
        elapsed = time.monotonic() - started
    assert answer == httpserver.TIMED_OUT
    assert DEADLINE_S - 0.05 < elapsed < DEADLINE_S + 2


def test_headers_trickling_in_are_cut_at_the_deadline_however_steady(address: tuple[str, int]) -> None:
    head = b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-Slow-%d: y\r\n" % i for i in range(1000))
    with connect(address) as conn:
        started = time.monotonic()
        for byte in head:  # a byte every 20 ms: progress, but headers that never finish in time
            if select.select([conn], [], [], 0.02)[0]:
                break
            conn.sendall(bytes([byte]))
        answer = read_to_close(conn)
        elapsed = time.monotonic() - started
    assert answer == httpserver.TIMED_OUT
    assert DEADLINE_S - 0.05 < elapsed < DEADLINE_S + 2


def test_an_idle_kept_alive_connection_outlives_the_header_deadline(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(GET)
        assert read_response(conn).endswith(b"GET /hello 0")
        time.sleep(DEADLINE_S * 2)  # idle between requests: the keep-alive timeout's business, not ours
        conn.sendall(GET)
        assert read_response(conn).endswith(b"GET /hello 0")


def test_the_second_request_on_a_kept_alive_connection_has_its_own_deadline(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(GET)
        assert read_response(conn).endswith(b"GET /hello 0")
        time.sleep(DEADLINE_S * 2)  # idle past the first deadline: the second one starts with its first byte
        started = time.monotonic()
        conn.sendall(b"GET /again HTTP/1.1\r\nHo")
        answer = read_to_close(conn)
        elapsed = time.monotonic() - started
    assert answer == httpserver.TIMED_OUT
    assert DEADLINE_S - 0.05 < elapsed < DEADLINE_S + 2


def test_a_slow_body_after_complete_headers_is_not_cut_by_the_header_deadline(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n\r\n")
        for byte in b"body":
            time.sleep(DEADLINE_S / 2)  # the body trickles in past the header deadline
            conn.sendall(bytes([byte]))
        assert read_response(conn).endswith(b"POST /upload 4")
