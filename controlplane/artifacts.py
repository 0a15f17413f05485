"""The filesystem artifact store: adapter files, content-addressed by sha256.

A write goes to a temp file in the store's own `tmp/`, is fsynced, then renamed
to `blobs/<aa>/<sha256>` and the directory fsynced: a blob that exists is whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Each process writes under its own temp dir: replicas may share the store.
        self.temp_dir = self.root / "tmp" / uuid.uuid4().hex
        self._blobs = self.root / "blobs"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ValueError("not a sha256")
        return self._blobs / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open_temp(self) -> PendingArtifact:
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix="upload-")
        return PendingArtifact(self, Path(name), os.fdopen(fd, "w+b"))

    def read(self, sha256: str) -> Iterator[bytes]:
        with self.path(sha256).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def clean_temp(self, older_than_s: float = 3600.0) -> None:
        """Remove what processes killed mid-write left behind (not the live ones' files)."""
        for d in (self.root / "tmp").iterdir():
            if d != self.temp_dir and time.time() - d.stat().st_mtime > older_than_s:
                shutil.rmtree(d, ignore_errors=True)


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
        """fsync and move into place; returns (sha256, created) — False if it existed."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self._store.path(self.sha256)
        if final.exists():
            self.temp_path.unlink(missing_ok=True)
            return self.sha256, False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, final)
        _fsync_dir(final.parent)
        return self.sha256, True

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
