"""The node-local artifact cache: blobs by sha256, verified, fetched once — from the control
plane over gRPC, or straight from the S3-compatible artifact store when there is one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from loraplane.s3 import S3Settings, connect

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class IntegrityError(Exception):
    pass


class FetchError(OSError):
    """The artifact store did not deliver the blob."""


Fetch = Callable[[str], AsyncIterator[bytes]]


class S3Source:
    """Blobs read straight from the control plane's bucket, where it keeps them under
    `<prefix>/blobs/<aa>/<sha256>`. Every S3 call runs in a thread."""

    def __init__(self, s3: S3Settings, client: Any = None) -> None:
        self._bucket = s3.bucket
        self._prefix = f"{s3.prefix}/" if s3.prefix else ""
        self._client = client if client is not None else connect(s3)

    def key(self, sha256: str) -> str:
        return f"{self._prefix}blobs/{sha256[:2]}/{sha256}"

    async def fetch(self, sha256: str) -> AsyncIterator[bytes]:
        key = self.key(sha256)
        log.info("fetching artifact %s from s3://%s/%s", sha256, self._bucket, key)
        try:
            response = await asyncio.to_thread(self._client.get_object, Bucket=self._bucket, Key=key)
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
    `max_bytes`, the least recently used blobs that no loaded adapter links are deleted."""

    def __init__(self, root: Path, fetch: Fetch, max_bytes: int = 20 << 30) -> None:
        self.root = Path(root)
        self._fetch = fetch
        self._max_bytes = max_bytes
        self._blobs = self.root / "blobs"
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        for d in (self._blobs, self._adapters):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self._inflight: dict[str, asyncio.Future[Path]] = {}

    async def adapter_dir(self, name: str, sha256: str, size: int, config: bytes) -> Path:
        """A directory vLLM can load: the verified weights and the config we were given."""
        blob = await self.blob(sha256, size)
        d = self._adapters / name
        if not (d / "adapter_model.safetensors").exists():
            tmp = Path(tempfile.mkdtemp(dir=self._tmp))
            os.link(blob, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_bytes(config)
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
        return d

    async def blob(self, sha256: str, size: int) -> Path:
        """The blob's path, fetching it once however many callers want it."""
        path = self._blobs / sha256
        if path.exists():
            os.utime(path)  # recently used
            return path
        fut = self._inflight.get(sha256)
        if fut is None:
            fut = asyncio.ensure_future(self._download(sha256, size, path))
            self._inflight[sha256] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(sha256, None))
        return await asyncio.shield(fut)

    async def _download(self, sha256: str, size: int, path: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=self._tmp)
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in self._fetch(sha256):
                    n += len(chunk)
                    if n > size:
                        raise IntegrityError(f"artifact {sha256} is larger than {size} bytes")
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(f.flush)
                await asyncio.to_thread(os.fsync, f.fileno())
            if h.hexdigest() != sha256 or n != size:
                raise IntegrityError(f"artifact {sha256} failed verification")
            os.replace(name, path)
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
                total -= st.st_size

    def forget(self, name: str) -> None:
        shutil.rmtree(self._adapters / name, ignore_errors=True)
