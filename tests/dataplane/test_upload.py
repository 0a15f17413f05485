"""The upload's multipart parsing (`dataplane/upload.py`): request bodies as the ASGI server hands
them over, cut anywhere, streamed to an in-process gRPC control plane on 127.0.0.1:0 that
records what reached it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from starlette.requests import Request
from starlette.types import Message

from dataplane.errors import ApiError, BadRequest, NotFound, TooLarge
from dataplane.upload import UploadStream
from loraplane.catalog import BaseModel, Catalog
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.controlplane.v1 import adapter_pb2_grpc

BOUNDARY = b"----lpBoundary7MA4YWxkTrZu0gW"
CATALOG = Catalog(
    {
        "tiny-llama": BaseModel("tiny-llama", "chat", "/none", lora=True, max_rank=64, max_adapters_per_worker=8),
        "tiny-embed": BaseModel("tiny-embed", "embedding", "/none", lora=False, max_rank=0, max_adapters_per_worker=0),
    }
)
MAX_BYTES = 4 << 20
# Adapter bytes that hold the boundary's first bytes (and CRLFs) without being a boundary.
FILE = b"\x00\x01safetensors\r\n--" + BOUNDARY[:-1] + b"\r\n\r\n--\r\n" + bytes(range(256)) * 8


@dataclass
class Received:
    """One upload as the control plane saw it end: the file's chunks and the metadata."""

    chunks: list[bytes]
    metadata: apb.UploadAdapterMetadata | None
    authorization: str


@dataclass
class ControlPlane(adapter_pb2_grpc.AdapterServiceServicer):
    stub: adapter_pb2_grpc.AdapterServiceStub | None = None
    uploads: list[Received] = field(default_factory=list)
    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[apb.UploadAdapterRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.UploadAdapterResponse:
        chunks: list[bytes] = []
        metadata = None
        async for message in request_iterator:
            if message.WhichOneof("part") == "chunk":
                chunks.append(message.chunk)
                self.first_chunk.set()
            else:
                metadata = message.metadata
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.uploads.append(Received(chunks, metadata, str(auth)))
        name = metadata.name if metadata else ""
        return apb.UploadAdapterResponse(adapter=apb.Adapter(id="adp_" + "0" * 24, name=name))

    @property
    def stored(self) -> bytes:
        assert len(self.uploads) == 1, self.uploads
        return b"".join(self.uploads[0].chunks)


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane()
    server = grpc.aio.server()
    adapter_pb2_grpc.add_AdapterServiceServicer_to_server(cp, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        cp.stub = adapter_pb2_grpc.AdapterServiceStub(channel)
        yield cp
    await server.stop(None)


def part(name: str, data: bytes, filename: str = "", extra_headers: bytes = b"") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = b"Content-Disposition: " + disposition.encode() + b"\r\n" + extra_headers
    if filename:
        head += b"Content-Type: application/octet-stream\r\n"
    return b"--" + BOUNDARY + b"\r\n" + head + b"\r\n" + data + b"\r\n"


def form(*parts: bytes, epilogue: bytes = b"") -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n" + epilogue


def good_form(file: bytes = FILE, **fields: str) -> bytes:
    values = {"name": "my-adapter", "base_model": "tiny-llama", **fields}
    return form(*(part(k, v.encode()) for k, v in values.items()), part("file", file, "adapter_model.safetensors"))


def request(pieces: list[bytes], content_type: bytes = b"", length: int | None = None) -> Request:
    """The upload request as uvicorn hands it to the app: the body in these pieces."""
    headers = [(b"content-type", content_type or b"multipart/form-data; boundary=" + BOUNDARY)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/adapters/upload", "headers": headers}
    queue = list(pieces)

    async def receive() -> Message:
        body = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return Request(scope, receive)


async def upload(cp: ControlPlane, pieces: list[bytes], max_bytes: int = MAX_BYTES) -> apb.Adapter:
    assert cp.stub is not None
    stream = UploadStream(request(pieces), CATALOG, max_bytes)
    return await stream.send(cp.stub, "sk-tenant", timeout=10)


def cut(body: bytes, rng: random.Random, most: int) -> list[bytes]:
    pieces, i = [], 0
    while i < len(body):
        n = rng.randint(1, most)
        pieces.append(body[i : i + n])
        i += n
    return pieces


async def test_a_form_in_one_piece_reaches_the_control_plane_as_file_chunks_then_metadata(
    control_plane: ControlPlane,
) -> None:
    body = good_form(lora_alpha="16", config='{"r": 8}')
    adapter = await upload(control_plane, [body])
    assert adapter.name == "my-adapter"
    assert control_plane.stored == FILE
    (received,) = control_plane.uploads
    assert received.authorization == "Bearer sk-tenant"
    assert received.metadata == apb.UploadAdapterMetadata(
        name="my-adapter", base_model="tiny-llama", lora_alpha=16.0, adapter_config=b'{"r": 8}'
    )


async def test_a_form_fed_byte_by_byte_gives_the_same_upload(control_plane: ControlPlane) -> None:
    body = good_form()
    await upload(control_plane, [body[i : i + 1] for i in range(len(body))])
    assert control_plane.stored == FILE
    assert control_plane.uploads[0].metadata == apb.UploadAdapterMetadata(name="my-adapter", base_model="tiny-llama")


@pytest.mark.parametrize("seed", range(12))
async def test_a_form_cut_at_random_places_gives_the_same_upload(control_plane: ControlPlane, seed: int) -> None:
    rng = random.Random(seed)
    file = FILE + rng.randbytes(rng.randrange(1, 5000))
    body = good_form(file)
    await upload(control_plane, cut(body, rng, most=rng.choice([3, 40, 700])))
    assert control_plane.stored == file


async def test_every_cut_through_the_closing_boundary_gives_the_same_upload(control_plane: ControlPlane) -> None:
    body = good_form()
    end = len(body) - len(BOUNDARY) - 10
    for at in range(end, len(body)):
        control_plane.uploads.clear()
        await upload(control_plane, [body[:at], body[at:]])
        assert control_plane.stored == FILE, at


async def test_the_file_streams_to_the_control_plane_before_the_body_is_complete(
    control_plane: ControlPlane,
) -> None:
    big = bytes(range(256)) * (10 << 10)  # 2.5 MiB: more than one 1 MiB chunk
    body = good_form(big)
    read = 64 << 10
    pieces = [body[i : i + read] for i in range(0, len(body), read)]
    assert control_plane.stub is not None

    async def receive() -> Message:
        if len(pieces) * read < len(body) - (2 << 20):  # 2 MiB in: the rest only once a chunk arrived
            await asyncio.wait_for(control_plane.first_chunk.wait(), 5)  # (never held whole)
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": request([]).headers.raw}
    await UploadStream(Request(scope, receive), CATALOG, MAX_BYTES).send(control_plane.stub, "k", timeout=10)
    assert control_plane.stored == big
    sizes = [len(c) for c in control_plane.uploads[0].chunks]
    assert len(sizes) == 3 and all(s <= (1 << 20) + read for s in sizes), sizes  # about 1 MiB each


async def test_garbage_after_the_closing_boundary_is_ignored(control_plane: ControlPlane) -> None:
    body = good_form()[: -len(b"--\r\n")] + b"--\r\nthe epilogue: not part of any part\r\n--" + BOUNDARY
    await upload(control_plane, [body])
    assert control_plane.stored == FILE


async def refused(cp: ControlPlane, body: bytes, max_bytes: int = MAX_BYTES) -> ApiError:
    """The error an upload ends with; nothing may have completed at the control plane."""
    with pytest.raises(ApiError) as caught:
        await upload(cp, [body[i : i + 512] for i in range(0, len(body), 512)], max_bytes)
    assert cp.uploads == []
    return caught.value


async def test_a_file_part_then_a_body_that_stops_without_its_closing_boundary_is_refused(
    control_plane: ControlPlane,
) -> None:
    body = good_form()[: -len(b"--" + BOUNDARY + b"--\r\n")] + b"trailing garbage, no closing boundary"
    err = await refused(control_plane, body)
    assert (type(err), err.message) == (BadRequest, "the multipart body ended early")


async def test_garbage_instead_of_the_next_boundary_is_refused(control_plane: ControlPlane) -> None:
    body = good_form().replace(b"\r\n--" + BOUNDARY + b"--", b"\r\n--" + BOUNDARY + b"XX")
    err = await refused(control_plane, body)
    assert type(err) is BadRequest


async def test_a_huge_part_header_is_refused_as_malformed(control_plane: ControlPlane) -> None:
    huge = b"X-Padding: " + b"a" * (64 << 10) + b"\r\n"
    body = form(part("name", b"x", extra_headers=huge), part("base_model", b"tiny-llama"), part("file", FILE, "f"))
    err = await refused(control_plane, body)
    assert (type(err), err.status, err.message) == (BadRequest, 400, "malformed multipart body")


async def test_a_huge_filename_is_refused_as_malformed(control_plane: ControlPlane) -> None:
    body = form(part("name", b"x"), part("base_model", b"tiny-llama"), part("file", FILE, "f" * (64 << 10)))
    err = await refused(control_plane, body)
    assert (type(err), err.message) == (BadRequest, "malformed multipart body")


async def test_a_part_with_too_many_headers_is_refused_as_malformed(control_plane: ControlPlane) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    body = form(part("name", b"x", extra_headers=many), part("base_model", b"tiny-llama"), part("file", FILE, "f"))
    err = await refused(control_plane, body)
    assert (type(err), err.message) == (BadRequest, "malformed multipart body")


@pytest.mark.parametrize("missing", ["name", "base_model", "file"])
async def test_a_missing_part_is_refused_naming_it(control_plane: ControlPlane, missing: str) -> None:
    parts = {"name": part("name", b"my-adapter"), "base_model": part("base_model", b"tiny-llama")}
    parts["file"] = part("file", FILE, "adapter_model.safetensors")
    del parts[missing]
    err = await refused(control_plane, form(*parts.values()))
    assert (type(err), err.param, err.message) == (BadRequest, missing, f"form field {missing!r} is required")


async def test_an_empty_file_counts_as_missing(control_plane: ControlPlane) -> None:
    err = await refused(control_plane, good_form(b""))
    assert (type(err), err.param) == (BadRequest, "file")


async def test_a_part_without_a_name_is_refused(control_plane: ControlPlane) -> None:
    nameless = b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nwho am I\r\n"
    err = await refused(control_plane, nameless + good_form())
    assert (type(err), err.message) == (BadRequest, "unexpected form field ''")


async def test_an_unknown_extra_part_is_refused_naming_it(control_plane: ControlPlane) -> None:
    body = form(part("name", b"a"), part("base_model", b"tiny-llama"), part("colour", b"red"), part("file", FILE, "f"))
    err = await refused(control_plane, body)
    assert (type(err), err.param, err.message) == (BadRequest, "colour", "unexpected form field 'colour'")


@pytest.mark.parametrize("twice", ["name", "file"])
async def test_a_part_sent_twice_is_refused(control_plane: ControlPlane, twice: str) -> None:
    extra = part("file", FILE, "f") if twice == "file" else part("name", b"other")
    body = form(part("name", b"a"), part("base_model", b"tiny-llama"), part("file", FILE, "f"), extra)
    err = await refused(control_plane, body)
    assert (type(err), err.param, err.message) == (BadRequest, twice, f"form field {twice!r} sent twice")


async def test_a_file_over_the_limit_is_refused_as_too_large(control_plane: ControlPlane) -> None:
    err = await refused(control_plane, good_form(b"x" * 5000), max_bytes=4999)
    assert (type(err), err.status, err.param) == (TooLarge, 413, "file")


async def test_a_file_at_the_limit_is_taken(control_plane: ControlPlane) -> None:
    await upload(control_plane, [good_form(b"x" * 5000)], max_bytes=5000)
    assert control_plane.stored == b"x" * 5000


async def test_a_field_over_64_kib_is_refused_as_too_large(control_plane: ControlPlane) -> None:
    err = await refused(control_plane, good_form(config="c" * ((64 << 10) + 1)))
    assert (type(err), err.status, err.param) == (TooLarge, 413, "config")


async def test_a_content_length_over_the_limit_is_refused_before_any_byte_is_read(
    control_plane: ControlPlane,
) -> None:
    assert control_plane.stub is not None
    never: list[bytes] = []  # an empty body: reading it would end the form early, a 400
    stream = UploadStream(request(never, length=MAX_BYTES + (1 << 20)), CATALOG, MAX_BYTES)
    with pytest.raises(TooLarge):
        await stream.send(control_plane.stub, "k", timeout=10)
    assert not stream.body_read


@pytest.mark.parametrize("content_type", [b"application/json", b"multipart/form-data", b"text/plain; boundary=x"])
async def test_a_body_that_is_not_a_multipart_form_is_refused(control_plane: ControlPlane, content_type: bytes) -> None:
    assert control_plane.stub is not None
    stream = UploadStream(request([good_form()], content_type=content_type), CATALOG, MAX_BYTES)
    with pytest.raises(BadRequest, match="multipart/form-data"):
        await stream.send(control_plane.stub, "k", timeout=10)


@pytest.mark.parametrize(
    ("fields", "error", "param"),
    [
        ({"name": "-starts-with-a-dash"}, BadRequest, "name"),
        ({"name": "x" * 65}, BadRequest, "name"),
        ({"base_model": "no-such-model"}, NotFound, "base_model"),
        ({"base_model": "tiny-embed"}, BadRequest, "base_model"),
        ({"lora_alpha": "lots"}, BadRequest, "lora_alpha"),
        ({"lora_alpha": "-1"}, BadRequest, "lora_alpha"),
        ({"lora_alpha": "nan"}, BadRequest, "lora_alpha"),
    ],
)
async def test_bad_field_values_are_refused_naming_the_field(
    control_plane: ControlPlane, fields: dict[str, str], error: type[ApiError], param: str
) -> None:
    err = await refused(control_plane, good_form(FILE, **fields))
    assert (type(err), err.param) == (error, param)
