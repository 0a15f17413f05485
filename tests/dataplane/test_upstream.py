"""The data plane's HTTP/1.1 client (`dataplane/upstream.py`) against raw asyncio peers on
127.0.0.1:0 that write exact bytes, so each protocol case is pinned byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from dataplane.errors import Unreachable, Upstream
from dataplane.upstream import Pool
from tests.dataplane.peers import Peer, peer, read_request, reset

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


async def answer_each(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive server: every request gets OK."""
    while request := await read_request(reader):
        state.requests.append(request)
        writer.write(OK)
        await writer.drain()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool({"Authorization": "Bearer k"}, connect_timeout_s=2)
    yield p
    p.close()


async def test_the_request_goes_out_as_one_post_with_the_pools_headers(pool: Pool) -> None:
    async with peer(answer_each) as server:
        r = await pool.post(server.url + "/prefix/", "/v1/chat/completions", b'{"a":1}', timeout=5)
        assert (r.status, await r.read(5)) == (200, b'{"ok":true}')
        r.release()
    host = server.url.removeprefix("http://")
    assert server.requests == [
        f"POST /prefix/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer k\r\n"
        'Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'.encode()
    ]


async def test_a_content_length_answer_is_read_whole_with_its_status_and_headers(pool: Pool) -> None:
    async def created(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nX-Thing: Yes\r\nContent-Length: 5\r\n\r\nhe")
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest of the body in a later segment
        writer.write(b"llo")
        await read_request(reader)

    async with peer(created) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert r.status == 201
        assert r.header(b"x-thing") == b"Yes"  # names lower-cased, values as sent
        assert r.header(b"absent") == b""
        assert await r.read(5) == b"hello"
        assert r.complete and r.keep_alive


async def test_two_requests_in_turn_share_one_kept_alive_connection(pool: Pool) -> None:
    async with peer(answer_each) as server:
        for _ in range(2):
            r = await pool.post(server.url, "/x", b"{}", timeout=5)
            assert await r.read(5) == b'{"ok":true}'
            r.release()
        assert (server.connections, len(server.requests)) == (1, 2)


async def test_concurrent_requests_each_get_their_own_connection(pool: Pool) -> None:
    async with peer(answer_each) as server:
        first = await pool.post(server.url, "/x", b"{}", timeout=5)
        second = await pool.post(server.url, "/x", b"{}", timeout=5)  # the first is not released yet
        assert server.connections == 2
        for r in (first, second):
            assert await r.read(5) == b'{"ok":true}'
            r.release()
        third = await pool.post(server.url, "/x", b"{}", timeout=5)
        await third.read(5)
        assert server.connections == 2


async def test_an_answer_not_read_to_its_end_closes_its_connection(pool: Pool) -> None:
    async def slow_body(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        # the second half never comes: the client must not reuse this connection

    async with peer(slow_body) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.chunks(5) == [b"12345"]
        r.release()
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        r.release()
        assert server.connections == 2


async def test_connection_close_from_the_worker_is_honoured(pool: Pool) -> None:
    async def close_each(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader)  # until the client closes its side

    async with peer(close_each) as server:
        for _ in range(2):
            r = await pool.post(server.url, "/x", b"{}", timeout=5)
            assert await r.read(5) == b"ok"
            assert not r.keep_alive
            r.release()
        assert server.connections == 2


async def test_a_kept_alive_connection_the_worker_closed_is_replaced_without_an_error(pool: Pool) -> None:
    async def one_per_connection(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive by HTTP/1.1's default, yet closed right after
        await writer.drain()

    async with peer(one_per_connection) as server:
        for _ in range(3):
            r = await pool.post(server.url, "/x", b"{}", timeout=5)
            assert await r.read(5) == b'{"ok":true}'
            r.release()
        assert server.connections == 3


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_chunked_body_is_handed_on_as_it_arrives(pool: Pool) -> None:
    may_go_on = asyncio.Event()

    async def stream(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(CHUNKED_HEAD + b"6\r\ndata:1\r\n")
            await writer.drain()
            await may_go_on.wait()
            writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")

    async with peer(stream) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.chunks(5) == [b"data:1"]  # before the worker sent the rest
        may_go_on.set()
        assert await r.read(5) == b"data:2"
        assert r.complete and r.keep_alive
        r.release()
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.read(5) == b"data:1data:2"
        assert server.connections == 1  # the same connection, reused after a chunked answer


@pytest.mark.parametrize("split", [1, 2, 3, 7])
async def test_chunk_boundaries_split_across_tcp_writes_do_not_change_the_body(pool: Pool, split: int) -> None:
    body = b"a" * 20 + b"\r\n" + b"b" * 300  # chunk data that looks like chunk syntax
    wire = CHUNKED_HEAD + b"14\r\n" + body[:20] + b"\r\n" + b"12e;ext=1\r\n" + body[20:] + b"\r\n0\r\n\r\n"

    async def trickle(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(0, len(wire), split):
            writer.write(wire[i : i + split])
            await writer.drain()
            await asyncio.sleep(0)  # a separate segment for each piece, as far as the loop goes
        await read_request(reader)

    async with peer(trickle) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.read(5) == body
        assert r.complete


async def test_a_worker_closing_before_any_byte_is_unreachable(pool: Pool) -> None:
    async def hang_up(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with peer(hang_up) as server:
        with pytest.raises(Unreachable, match="before answering"):
            await pool.post(server.url, "/x", b"{}", timeout=5)
        assert server.connections == 1  # a fresh connection is not tried again: the caller decides


async def test_a_kept_alive_connection_dropped_when_reused_is_retried_once_on_a_new_one(pool: Pool) -> None:
    async def drop_the_second(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        state.requests.append(await read_request(reader))  # the reused connection's request: dropped

    async with peer(drop_the_second) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        await r.read(5)
        r.release()
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.read(5) == b'{"ok":true}'
        assert server.connections == 2
        assert len(server.requests) == 1 and server.requests[0].startswith(b"POST /x ")


async def test_a_worker_that_is_not_listening_is_unreachable(pool: Pool) -> None:
    async with peer(answer_each) as server:
        url = server.url
    with pytest.raises(Unreachable, match="could not be reached"):
        await pool.post(url, "/x", b"{}", timeout=5)


async def test_an_endpoint_that_is_not_plain_http_is_unreachable(pool: Pool) -> None:
    with pytest.raises(Unreachable, match="unsupported worker endpoint"):
        await pool.post("https://127.0.0.1:1", "/x", b"{}", timeout=5)


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        CHUNKED_HEAD + b"a\r\n0123456789\r\n",
        CHUNKED_HEAD + b"a\r\n01234",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-inside-a-chunk"],
)
async def test_a_worker_closing_mid_body_is_an_upstream_error_not_a_retryable_one(pool: Pool, partial: bytes) -> None:
    async def cut(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(partial)
        await writer.drain()

    async with peer(cut) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        with pytest.raises(Upstream, match="mid-answer") as caught:
            await r.read(5)
        assert not isinstance(caught.value, Unreachable)  # bytes reached the client: no other worker
        assert r.body_started
        r.release()
        r = await pool.post(server.url, "/x", b"{}", timeout=5)  # the broken connection is not reused
        assert server.connections == 2


async def test_a_worker_closing_mid_headers_is_unreachable(pool: Pool) -> None:
    async def cut(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    async with peer(cut) as server:
        with pytest.raises(Unreachable):
            await pool.post(server.url, "/x", b"{}", timeout=5)


async def test_a_worker_reset_before_answering_is_unreachable(pool: Pool) -> None:
    """A killed worker's connections are reset by the kernel: as retryable as a plain close."""

    async def killed(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        reset(writer)

    async with peer(killed) as server:
        with pytest.raises(Unreachable, match="before answering"):
            await pool.post(server.url, "/x", b"{}", timeout=5)


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", CHUNKED_HEAD, CHUNKED_HEAD + b"a"],
    ids=["content-length", "chunked", "chunked-inside-a-chunk-size"],
)
@pytest.mark.parametrize("hang_up", [asyncio.StreamWriter.close, reset], ids=["close", "reset"])
async def test_a_worker_lost_after_its_headers_before_its_body_is_unreachable(
    pool: Pool, head: bytes, hang_up: Callable[[asyncio.StreamWriter], None]
) -> None:
    """vLLM sends a stream's headers at once: a worker whose engine dies before the first
    event leaves an answer of which nothing can have reached the client."""

    async def cut(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head)
        await writer.drain()
        hang_up(writer)

    async with peer(cut) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        with pytest.raises(Unreachable, match="after its headers, before its body"):
            await r.read(5)
        assert not r.body_started
        r.release()


async def test_a_malformed_status_line_is_an_upstream_error_not_a_retryable_one(pool: Pool) -> None:
    async def garbage(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await read_request(reader)

    async with peer(garbage) as server:
        with pytest.raises(Upstream, match="malformed") as caught:
            await pool.post(server.url, "/x", b"{}", timeout=5)
        assert not isinstance(caught.value, Unreachable)


async def test_a_malformed_chunk_is_an_upstream_error(pool: Pool) -> None:
    async def garbage(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"2\r\nok\r\nzz\r\n")
        await read_request(reader)

    async with peer(garbage) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        with pytest.raises(Upstream, match="malformed"):
            await r.read(5)


async def test_a_worker_that_does_not_answer_in_time_is_an_upstream_error(pool: Pool) -> None:
    async def silent(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await read_request(reader)  # until the client gives up and closes

    async with peer(silent) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Upstream, match="did not answer in time") as caught:
            await pool.post(server.url, "/x", b"{}", timeout=0.3)
        assert 0.25 < loop.time() - started < 2
        assert not isinstance(caught.value, Unreachable)  # the request may be running there: not retried


async def test_a_worker_that_stops_sending_mid_body_is_an_upstream_error_after_the_timeout(pool: Pool) -> None:
    async def stall(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"2\r\nhi\r\n")
        await read_request(reader)

    async with peer(stall) as server:
        r = await pool.post(server.url, "/x", b"{}", timeout=5)
        assert await r.chunks(5) == [b"hi"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Upstream, match="stopped sending"):
            await r.chunks(0.3)
        assert 0.25 < loop.time() - started < 2
        r.release()


async def test_a_slow_reader_still_gets_every_byte_and_the_connection_back(pool: Pool) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, more than the socket buffers hold

    async def big(state: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    async with peer(big) as server:
        for _ in range(2):
            r = await pool.post(server.url, "/x", b"{}", timeout=5)
            got = b""
            while chunks := await r.chunks(5):
                got += b"".join(chunks)
                await asyncio.sleep(0.001)  # the reader lags the worker (the behaviour under test)
            assert got == body
            r.release()
        assert server.connections == 1
