"""The node-local artifact cache: blobs by sha256, verified, fetched once — from the control
plane over gRPC, or straight from the S3-compatible artifact store when there is one.

A blob is fetched as byte ranges of `segment` bytes, `streams` of them at once, each chunk
written where it belongs in a preallocated temp file. The sha256 is computed over the file's
written prefix while the ranges arrive (read through a mapping of the temp file, which only this
download writes: no copy), so it is ready when the last byte is. Only a file of exactly the
blob's size and sha256 becomes `blobs/<sha256>`. Memory: one chunk per stream, whatever the
blob's size.

Nothing here is fsynced: it is a cache. A blob is used as verified only while this agent process
knows it as verified (it downloaded or re-hashed it) and it is still the same file (device,
inode, size, mtime); any other blob — one found on disk at start, which a crash may have torn —
is hashed again before its first use, and fetched again if it fails (docs/storage.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from loraplane.s3 import S3Settings, connect

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # bytes per read of an S3 response
SEGMENT = 16 << 20  # bytes per range (bench/artifacts.py)
STREAMS = 4  # ranges in flight per download
HASH_STEP = 8 << 20  # bytes hashed per hop to a thread
T = TypeVar("T")
Stamp = tuple[int, int, int, int]  # device, inode, size, mtime (ns) of a verified blob


class IntegrityError(Exception):
    pass


class RangeIgnored(IntegrityError):
    """The source sent more bytes than the range asked for: it does not serve ranges."""


class FetchError(OSError):
    """The artifact store did not deliver the blob."""


# Bytes of the blob `sha256` from `offset`, at most `length` of them (0: up to the end).
Fetch = Callable[[str, int, int], AsyncGenerator[bytes]]


class S3Source:
    """Blobs read straight from the control plane's bucket, where it keeps them under
    `<prefix>/blobs/<aa>/<sha256>`, by ranged GETs. Every S3 call runs in a thread."""

    def __init__(self, s3: S3Settings, client: Any = None) -> None:
        self._bucket = s3.bucket
        self._prefix = f"{s3.prefix}/" if s3.prefix else ""
        self._client = client if client is not None else connect(s3)  # 10 connections: STREAMS and more

    def key(self, sha256: str) -> str:
        return f"{self._prefix}blobs/{sha256[:2]}/{sha256}"

    async def fetch(self, sha256: str, offset: int = 0, length: int = 0) -> AsyncGenerator[bytes]:
        key = self.key(sha256)
        if not offset:
            log.info("fetching artifact %s from s3://%s/%s", sha256, self._bucket, key)
        ranged = {}
        if offset or length:
            ranged["Range"] = f"bytes={offset}-{offset + length - 1}" if length else f"bytes={offset}-"
        try:
            response = await asyncio.to_thread(self._client.get_object, Bucket=self._bucket, Key=key, **ranged)
            body = response["Body"]
            try:
                while chunk := await asyncio.to_thread(body.read, CHUNK):
                    yield chunk
            finally:
                body.close()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            raise FetchError(f"artifact {sha256}: the store answered {code}") from err
        except BotoCoreError as err:
            raise FetchError(f"artifact {sha256}: the store is unreachable ({type(err).__name__})") from err


class ArtifactCache:
    """Blobs under `blobs/<sha256>`, hard-linked into `adapters/<name>/` while loaded. Past
    `max_bytes`, the least recently used blobs that no loaded adapter links are deleted.

    The adapters (by the name vLLM knows them by) whose blob it holds verified are `cached()`, from
    memory: the names it learned from `adapter_dir` and `name` (a prefetch's)."""

    def __init__(
        self,
        root: Path,
        fetch: Fetch,
        max_bytes: int = 20 << 30,
        *,
        streams: int = STREAMS,
        segment: int = SEGMENT,
    ) -> None:
        self.root = Path(root)
        self._fetch = fetch
        self._max_bytes = max_bytes
        self._streams = streams
        self._segment = segment
        self._blobs = self.root / "blobs"
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        for d in (self._blobs, self._adapters):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self._verified: dict[str, Stamp] = {}  # by this process, as the file was then
        self._names: dict[str, str] = {}  # adapter name -> the sha256 of its blob, as adapter_dir learned it

    async def adapter_dir(self, name: str, sha256: str, size: int, config: bytes) -> Path:
        """A directory vLLM can load: the verified weights and the config we were given."""
        blob = await self.blob(sha256, size)
        self._names[name] = sha256
        d = self._adapters / name
        if not _same_file(d / "adapter_model.safetensors", blob):  # absent, or bytes no longer the blob's
            tmp = Path(tempfile.mkdtemp(dir=self._tmp))
            os.link(blob, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_bytes(config)
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
        return d

    async def blob(self, sha256: str, size: int) -> Path:
        """The blob's path, verified, fetching it once however many callers want it."""
        path = self._blobs / sha256
        fut = self._inflight.get(sha256)
        if fut is None:
            if self._still_verified(sha256, size, path):
                return path
            fut = asyncio.ensure_future(self._obtain(sha256, size, path))
            self._inflight[sha256] = fut
            fut.add_done_callback(lambda f: self._inflight.pop(sha256) if self._inflight.get(sha256) is f else None)
        return await asyncio.shield(fut)

    def _still_verified(self, sha256: str, size: int, path: Path) -> bool:
        stamp = self._verified.get(sha256)
        try:
            if stamp is None or stamp[2] != size or _stamp(path) != stamp:
                return False
            self._touch(sha256, path)
        except FileNotFoundError:
            return False
        return True

    def _touch(self, sha256: str, path: Path) -> None:
        """Mark the blob recently used (its mtime, for trimming) and verified as it is now."""
        os.utime(path)
        self._verified[sha256] = _stamp(path)

    async def _obtain(self, sha256: str, size: int, path: Path) -> Path:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == size and await asyncio.to_thread(_sha256_of, path, size) == sha256:
                self._touch(sha256, path)
                return path
            log.warning("cached artifact %s does not verify: fetching it again", sha256)
            self._verified.pop(sha256, None)
            path.unlink()
        return await self._download(sha256, size, path)

    async def _download(self, sha256: str, size: int, path: Path) -> Path:
        started = time.monotonic()
        fd, name = tempfile.mkstemp(dir=self._tmp)
        try:
            try:
                await _blocking(_preallocate, fd, size)
                ranges = [(o, min(self._segment, size - o)) for o in range(0, size, self._segment)]
                try:
                    digest = await _Download(self._fetch, sha256, size, fd, ranges).run(self._streams)
                except RangeIgnored:
                    log.warning("the source of artifact %s ignores byte ranges: fetching it whole", sha256)
                    digest = await _Download(self._fetch, sha256, size, fd, [(0, size)]).run(1)
            finally:
                os.close(fd)
            if digest != sha256:
                raise IntegrityError(f"artifact {sha256} failed verification")
            os.replace(name, path)
            self._touch(sha256, path)
            log.info("fetched artifact %s: %d bytes in %.2fs", sha256, size, time.monotonic() - started)
            self._trim(keep=path)
            return path
        finally:
            Path(name).unlink(missing_ok=True)

    def _trim(self, keep: Path) -> None:
        blobs = [(p.stat(), p) for p in self._blobs.iterdir()]
        total = sum(st.st_size for st, _ in blobs)
        for st, p in sorted(blobs, key=lambda b: b[0].st_mtime):
            if total <= self._max_bytes:
                break
            if p != keep and st.st_nlink == 1:  # no loaded adapter links it
                p.unlink(missing_ok=True)
                self._verified.pop(p.name, None)
                total -= st.st_size

    def name(self, name: str, sha256: str) -> None:
        """`name` is the adapter whose bytes are the blob `sha256` (a prefetch says so)."""
        self._names[name] = sha256

    def forget(self, name: str) -> None:
        """The adapter's directory gone (vLLM unloaded it); its blob stays, until trimmed."""
        shutil.rmtree(self._adapters / name, ignore_errors=True)

    def cached(self, exclude: Collection[str] = ()) -> list[str]:
        """The names of the adapters whose blob is here, verified by this process, but for those
        in `exclude`: sorted. From memory (no disk access): cheap enough for every heartbeat."""
        skip = set(exclude)
        return sorted(n for n, sha256 in self._names.items() if sha256 in self._verified and n not in skip)


class _Download:
    """One blob into an open, preallocated file: its ranges fetched a few at once, each chunk
    written at its offset; the sha256 computed over the file's written prefix as it grows."""

    def __init__(self, fetch: Fetch, sha256: str, size: int, fd: int, ranges: list[tuple[int, int]]) -> None:
        self._fetch = fetch
        self._sha256 = sha256
        self._size = size
        self._fd = fd
        self._ranges = ranges
        self._written = [0] * len(ranges)  # bytes written of each range, from its start
        self._whole = 0  # ranges before this one are written whole
        self._todo = iter(range(len(ranges)))  # shared by the streams: each takes the next range
        self._progress = asyncio.Event()
        # One write at a time: the kernel takes the file's lock for each (ext4, xfs), and writers
        # waiting on it in threads spin for it.
        self._writing = asyncio.Lock()

    async def run(self, streams: int) -> str:
        """The sha256 of the file once every range is in it. Returns or raises only when nothing
        uses the file any more (the caller closes it)."""
        hashed = asyncio.ensure_future(self._hash())
        tasks = [hashed, *(asyncio.ensure_future(self._stream()) for _ in range(min(streams, len(self._ranges))))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return hashed.result()

    async def _stream(self) -> None:
        for i in self._todo:
            offset, length = self._ranges[i]
            got = 0
            async with contextlib.aclosing(self._fetch(self._sha256, offset, length)) as chunks:
                async for chunk in chunks:
                    if got + len(chunk) > length:
                        if len(self._ranges) > 1:
                            raise RangeIgnored(f"artifact {self._sha256}: more bytes than the range asked for")
                        raise IntegrityError(f"artifact {self._sha256} is larger than {self._size} bytes")
                    async with self._writing:
                        await _blocking(_pwrite, self._fd, chunk, offset + got)
                    got += len(chunk)
                    self._written[i] = got
                    self._progress.set()
            if got != length:
                raise IntegrityError(f"artifact {self._sha256} is truncated: {length - got} bytes missing at {offset}")

    def _prefix(self) -> int:
        """How many bytes from the start are written."""
        while self._whole < len(self._ranges) and self._written[self._whole] == self._ranges[self._whole][1]:
            self._whole += 1
        if self._whole == len(self._ranges):
            return self._size
        return self._ranges[self._whole][0] + self._written[self._whole]

    async def _hash(self) -> str:
        h = hashlib.sha256()
        if not self._size:
            return h.hexdigest()
        with mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ) as mapped:
            done = 0
            while done < self._size:
                self._progress.clear()
                ready = self._prefix()
                if ready == done:
                    await self._progress.wait()
                    continue
                end = min(ready, done + HASH_STEP)
                await _blocking(_update, h, mapped, done, end)
                done = end
        return h.hexdigest()


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread. Cancelled, this still waits for fn to return: fn uses a file
    descriptor or mapping that is closed once every call returned."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: the cancellation is what the caller hears
        raise


def _preallocate(fd: int, size: int) -> None:
    """The file's blocks reserved up front (a full disk fails here, not half way)."""
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it
            raise
        os.ftruncate(fd, size)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _update(h: Any, mapped: mmap.mmap, start: int, end: int) -> None:
    with memoryview(mapped) as whole, whole[start:end] as part:
        h.update(part)


def _sha256_of(path: Path, size: int) -> str:
    """The sha256 of the file's first `size` bytes, read (not mapped: a file someone else
    truncates meanwhile is then a wrong hash, not a SIGBUS)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_STEP)
    with path.open("rb", buffering=0) as f, memoryview(buf) as view:
        while size and (n := f.readinto(view[: min(size, HASH_STEP)])):
            h.update(view[:n])
            size -= n
    return h.hexdigest()


def _stamp(path: Path) -> Stamp:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(a.stat(), b.stat())
    except FileNotFoundError:
        return False
