"""The artifact store: adapter files, content-addressed by sha256.

Every backend stages a write in a local temp file, hashed as it arrives (the sha256 is known only
at the end), and then publishes it whole under its final name: a blob that exists is whole. The
filesystem store (the default) fsyncs the temp file and renames it to `blobs/<aa>/<sha256>`; the
S3 store (`controlplane.s3store`) puts it under `<prefix>/blobs/<aa>/<sha256>` in a bucket.

A blob is read whole or by byte range (agents fetch several ranges of a large blob at once).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
# Bytes per WorkerService/FetchArtifact message: under the 4 MiB a gRPC client accepts by default
# (an older agent's too), with room for the message's own few bytes.
ARTIFACT_MESSAGE = 1 << 20


class OutOfRange(ValueError):
    """A byte range that starts at or past the end of the blob, or a negative offset or length."""


def _abandoned(staging: Path) -> bool:
    """Nobody holds the staging directory's lock: its process is gone."""
    try:
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class Reader(Protocol):
    """A stored blob being read."""

    def read(self, size: int = -1, /) -> bytes: ...

    def read_cached(self, size: int, /) -> bytes | None:
        """The next bytes (at most `size`, b"" at the end) if reading them cannot block — they
        are in memory — else None: the caller reads them in a thread."""

    def close(self) -> None: ...


def checked(sha256: str) -> str:
    if not SHA256.match(sha256):
        raise ValueError("not a sha256")
    return sha256


def checked_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise OutOfRange("offset and length must not be negative")


class ArtifactStore(abc.ABC):
    """Where adapter bytes live. Writes are staged under `staging` (local to this process: each
    process stages in its own `temp_dir`, so replicas may share the directory)."""

    def __init__(self, staging: Path) -> None:
        self._staging = Path(staging)
        self.temp_dir = self._staging / uuid.uuid4().hex
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        # Held while this process lives: a staging directory whose lock can be taken is a dead
        # process's, and its half-written files go at once (not after an hour).
        self._staging_lock = os.open(self.temp_dir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._staging_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def open_temp(self) -> PendingArtifact:
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix="upload-")
        return PendingArtifact(self, Path(name), os.fdopen(fd, "w+b"))

    def read(self, sha256: str) -> Iterator[bytes]:
        with contextlib.closing(self.open_blob(sha256)) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def clean_temp(self) -> None:
        """Remove what processes killed mid-write left behind (not the live ones' files)."""
        for d in self._staging.iterdir():
            if d != self.temp_dir and d.is_dir() and _abandoned(d):
                shutil.rmtree(d, ignore_errors=True)

    @abc.abstractmethod
    def check(self) -> None:
        """Raise if the store cannot be used (run once at startup)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish what the store does in the background."""

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def open_blob(self, sha256: str, offset: int = 0, length: int = 0) -> Reader:
        """The blob for reading, from `offset`, at most `length` bytes (0: up to the end; a range
        reaching past the end is cut there). FileNotFoundError if there is none; ValueError for a
        bad sha256; OutOfRange for a range that starts at or past the end (an empty blob is read
        whole: offset and length 0)."""

    @abc.abstractmethod
    def delete(self, sha256: str) -> None:
        """Idempotent; the store may finish it in the background."""

    @abc.abstractmethod
    def blobs(self, older_than_s: float) -> Iterator[str]:
        """The sha256 of every blob stored more than `older_than_s` ago (for the orphan sweep)."""

    @abc.abstractmethod
    def publish(self, file: BinaryIO, temp_path: Path, sha256: str) -> bool:
        """Make the staged, flushed file the blob `sha256`; False if that blob already existed.
        The caller closes and removes the temp file afterwards."""


class FileArtifactStore(ArtifactStore):
    """Blobs in `root/blobs/<aa>/<sha256>`, staged in `root/tmp/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        super().__init__(self.root / "tmp")
        self._blobs = self.root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self._blobs / checked(sha256)[:2] / sha256

    def check(self) -> None:
        """The directories exist: the constructor made them."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open_blob(self, sha256: str, offset: int = 0, length: int = 0) -> Reader:
        path = self.path(sha256)
        checked_range(offset, length)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if offset and offset >= size:
                raise OutOfRange(f"offset {offset} is past the end of the blob")
            end = min(size, offset + length) if length else size
            return FileRange(fd, offset, end)
        except BaseException:
            os.close(fd)
            raise

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def blobs(self, older_than_s: float) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        for path in self._blobs.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                if SHA256.match(path.name) and path.stat().st_mtime < cutoff:
                    yield path.name

    def publish(self, file: BinaryIO, temp_path: Path, sha256: str) -> bool:
        os.fsync(file.fileno())
        final = self.path(sha256)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp_path, final)
        _fsync_dir(final.parent)
        return True


class FileRange:
    """Bytes `offset` to `end` of an open file, read with pread (a stored blob never changes).

    `read_cached` reads what the page cache holds without waiting for the disk (RWF_NOWAIT), so
    the control plane serves a cached blob from its event loop: a read in a thread per message
    cost it twice the CPU (bench/artifacts.py; docs/storage.md)."""

    def __init__(self, fd: int, offset: int, end: int) -> None:
        self._fd = fd
        self._pos = offset
        self._end = end
        self._buf = bytearray()
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def read(self, size: int = -1, /) -> bytes:
        n = self._end - self._pos if size < 0 else min(size, self._end - self._pos)
        data = os.pread(self._fd, n, self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def read_cached(self, size: int, /) -> bytes | None:
        n = min(size, self._end - self._pos)
        if n <= 0:
            return b""
        if not self._nowait:
            return None
        if len(self._buf) < n:
            self._buf = bytearray(n)
        with memoryview(self._buf) as view:
            try:
                got = os.preadv(self._fd, [view[:n]], self._pos, os.RWF_NOWAIT)
            except BlockingIOError:  # not in the page cache
                return None
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # a filesystem or kernel without it
                return None
            data = bytes(view[:got])
        self._pos += got
        return data or None  # nothing read before the end: let `read` say what is there

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PendingArtifact:
    """A file being written: hashed and counted as it goes, committed or discarded."""

    def __init__(self, store: ArtifactStore, path: Path, file: BinaryIO) -> None:
        self._store = store
        self.temp_path = path
        self.file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> tuple[str, bool]:
        """Store the blob durably; returns (sha256, created) — False if it existed. Blocking."""
        self.file.flush()
        try:
            created = self._store.publish(self.file, self.temp_path, self.sha256)
        finally:
            self.discard()
        return self.sha256, created

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.temp_path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
