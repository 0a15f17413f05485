"""`POST /v1/adapters/upload`: the multipart body streamed to the control plane.

The file part goes out in chunks as it arrives (never held whole); the small
fields are collected and sent last, as the metadata message that completes the
upload: a stream cut short never carries metadata, so it can never be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from dataplane.errors import ApiError, BadRequest, NotFound, RequestTimeout, TooLarge, from_grpc
from loraplane import logs
from loraplane.catalog import Catalog
from loraplane.controlplane.v1 import adapter_pb2 as apb
from loraplane.controlplane.v1 import adapter_pb2_grpc
from loraplane.limits import NAME

CHUNK = 1 << 20
MAX_FIELD = 64 << 10
MULTIPART_OVERHEAD = 256 << 10
DRAIN_BYTES, DRAIN_S = 16 << 20, 5.0  # the most of a refused upload read before answering
FIELDS = {"name", "base_model", "lora_alpha", "config", "file"}


@dataclass
class _Form:
    fields: dict[str, bytes] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)
    file_bytes: int = 0
    pending: bytearray = field(default_factory=bytearray)
    chunks: list[bytes] = field(default_factory=list)
    part: str | None = None
    header_field: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    error: ApiError | None = None
    ended: bool = False
    checked: bool = False


class UploadStream:
    def __init__(self, request: Request, catalog: Catalog, max_bytes: int, idle_timeout_s: float = 60.0) -> None:
        self._request = request
        self._idle_timeout = idle_timeout_s
        self._catalog = catalog
        self._max = max_bytes
        self._form = _Form()
        self.body_read = False  # the whole request body was read (a refusal need not drain it)
        self._started = False

    def _parser(self, boundary: bytes) -> MultipartParser:
        f = self._form

        def on_part_begin() -> None:
            f.headers, f.part = {}, None

        def on_header_field(data: bytes, start: int, end: int) -> None:
            f.header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            key = f.header_field.lower()
            f.headers[key] = f.headers.get(key, b"") + data[start:end]

        def on_header_end() -> None:
            f.header_field = b""

        def on_headers_finished() -> None:
            _, opts = parse_options_header(f.headers.get(b"content-disposition", b""))
            name = opts.get(b"name", b"").decode("utf-8", "replace")
            if name not in FIELDS:
                f.error = f.error or BadRequest(f"unexpected form field {name[:64]!r}", param=name[:64])
            elif name in f.fields or (name == "file" and f.file_bytes):
                f.error = f.error or BadRequest(f"form field {name!r} sent twice", param=name)
            else:
                f.part = name
                if name != "file":
                    f.fields[name] = b""

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if f.part == "file":
                f.file_bytes += end - start
                if f.file_bytes > self._max:
                    f.error = f.error or TooLarge(f"adapter file is larger than {self._max} bytes", param="file")
                    return
                f.pending += data[start:end]
                if len(f.pending) >= CHUNK:
                    f.chunks.append(bytes(f.pending))
                    f.pending.clear()
            elif f.part is not None:
                value = f.fields[f.part] + data[start:end]
                if len(value) > MAX_FIELD:
                    f.error = f.error or TooLarge(f"form field {f.part!r} is too large", param=f.part)
                else:
                    f.fields[f.part] = value

        def on_part_end() -> None:
            if f.part == "file" and f.pending:
                f.chunks.append(bytes(f.pending))
                f.pending.clear()
            if f.part is not None:
                f.complete.add(f.part)
            f.part = None

        def on_end() -> None:
            f.ended = True

        return MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_end": on_end,
            },
        )

    def _boundary(self) -> bytes:
        ctype, opts = parse_options_header(self._request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
            raise BadRequest("the upload must be multipart/form-data")
        length = self._request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self._max + MULTIPART_OVERHEAD:
            raise TooLarge(f"adapter file is larger than {self._max} bytes", param="file")
        return opts[b"boundary"]

    def _check_fields(self, final: bool) -> None:
        if self._form.checked:
            return
        f = self._form.fields
        for name in ("name", "base_model"):
            if name not in self._form.complete:
                if final:
                    raise BadRequest(f"form field {name!r} is required", param=name)
                return
        name, base = _text(f, "name"), _text(f, "base_model")
        if not NAME.match(name):
            raise BadRequest("name must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit", param="name")
        model = self._catalog.get(base)
        if model is None:
            raise NotFound(f"base model {base!r} does not exist", param="base_model")
        if not model.lora:
            raise BadRequest(f"base model {base!r} does not support LoRA adapters", param="base_model")
        self._form.checked = True

    def _metadata(self) -> apb.UploadAdapterMetadata:
        self._check_fields(final=True)
        f = self._form.fields
        if not self._form.file_bytes:
            raise BadRequest("form field 'file' is required", param="file")
        alpha = 0.0
        if "lora_alpha" in f:
            try:
                alpha = float(_text(f, "lora_alpha"))
            except ValueError:
                raise BadRequest("lora_alpha must be a number", param="lora_alpha") from None
            if not (math.isfinite(alpha) and alpha > 0):
                raise BadRequest("lora_alpha must be a positive number", param="lora_alpha")
        return apb.UploadAdapterMetadata(
            name=_text(f, "name"),
            base_model=_text(f, "base_model"),
            lora_alpha=alpha,
            adapter_config=f.get("config", b""),
        )

    @property
    def file_bytes(self) -> int:
        """The adapter file's bytes received so far."""
        return self._form.file_bytes

    async def send(self, stub: adapter_pb2_grpc.AdapterServiceStub, key: str, timeout: float) -> apb.Adapter:
        parser = self._parser(self._boundary())
        call = stub.UploadAdapter(metadata=(("authorization", f"Bearer {key}"), *logs.metadata()), timeout=timeout)
        budget = asyncio.timeout(timeout)
        try:
            async with budget:
                await self._forward(parser, call)
            response: apb.UploadAdapterResponse = await call
            return response.adapter
        except TimeoutError:
            call.cancel()
            if not budget.expired():
                raise
            raise RequestTimeout(f"the upload did not finish within {timeout:.0f}s") from None
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err) from None
        except FormParserError:
            call.cancel()
            raise BadRequest("malformed multipart body") from None
        except (ApiError, ClientDisconnect, asyncio.CancelledError):
            call.cancel()
            raise

    async def _forward(self, parser: MultipartParser, call: UploadCall) -> None:
        """The file's bytes to the control plane as they arrive, then the form's fields."""
        form = self._form
        async for data in self._body():
            parser.write(data)
            if form.error:
                raise form.error
            self._check_fields(final=False)
            for chunk in form.chunks:
                await _write(call, apb.UploadAdapterRequest(chunk=chunk))
            form.chunks.clear()
        parser.finalize()
        if not form.ended:
            raise BadRequest("the multipart body ended early")
        await _write(call, apb.UploadAdapterRequest(metadata=self._metadata()))
        await call.done_writing()

    @property
    def started(self) -> bool:
        """Whether any of the body was asked for (which sends a waiting client `100 Continue`)."""
        return self._started

    async def _body(self) -> AsyncIterator[bytes]:
        self._started = True
        while not self.body_read:
            try:
                message = await asyncio.wait_for(self._request.receive(), self._idle_timeout)
            except TimeoutError:
                raise RequestTimeout(f"no upload bytes received for {self._idle_timeout:.0f}s") from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.body_read = not message.get("more_body", False)
            yield message.get("body", b"")

    async def drain(self) -> None:
        """Read on (and drop) a refused upload's body, within a bound, before answering: a server
        that closes on unread bytes resets the connection, and the client never sees why."""
        read = 0
        with contextlib.suppress(TimeoutError, ClientDisconnect):
            async with asyncio.timeout(DRAIN_S):
                async for chunk in self._body():
                    read += len(chunk)
                    if read > DRAIN_BYTES:
                        return


UploadCall = grpc.aio.StreamUnaryCall[apb.UploadAdapterRequest, apb.UploadAdapterResponse]


async def _write(call: UploadCall, message: apb.UploadAdapterRequest) -> None:
    """A write that fails because the control plane already ended the call (an adapter over the
    size limit, say) reports the control plane's own status, not the failed write's."""
    try:
        await call.write(message)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call  # raises the call's status, with its trailers
        raise ApiError("the control plane ended the upload early") from None


def _text(fields: dict[str, bytes], name: str) -> str:
    return fields[name].decode("utf-8", "replace").strip()
