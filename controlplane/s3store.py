"""The S3-compatible artifact store: blobs under `<prefix>/blobs/<aa>/<sha256>` in one bucket.

An upload is staged in a local temp file (see `controlplane.artifacts`), then put under its final
key in one step: a single PUT, or a multipart upload that becomes visible only when completed (and
is aborted on failure), so an object under a blob's key is always whole. Control plane replicas
share the bucket; agents configured with the same bucket read blobs straight from it.

Every call to S3 blocks: async code runs them in a thread. Deletions run in this store's own
background thread, since callers issue them from the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from controlplane.artifacts import SHA256, ArtifactStore, OutOfRange, Reader, checked, checked_range
from controlplane.errors import ControlPlaneError
from loraplane.s3 import S3Settings, connect

log = logging.getLogger(__name__)

MISSING = {"404", "NoSuchKey", "NotFound"}


class StoreUnavailable(ControlPlaneError):
    """S3 failed or could not be reached; the caller may try again."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


def blob_key(prefix: str, sha256: str) -> str:
    key = f"blobs/{checked(sha256)[:2]}/{sha256}"
    return f"{prefix}/{key}" if prefix else key


def missing(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in MISSING


def http_range(offset: int, length: int) -> str:
    """The `Range` header of bytes `offset` .. `offset + length - 1` (length 0: to the end)."""
    return f"bytes={offset}-{offset + length - 1}" if length else f"bytes={offset}-"


def past_the_end(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code", "")) in {"InvalidRange", "416"}


@contextlib.contextmanager
def s3_errors(action: str) -> Iterator[None]:
    """The one place S3's errors become ours."""
    try:
        yield
    except ClientError as err:
        log.warning("artifact store: %s failed: %s", action, err)
        raise StoreUnavailable("the artifact store failed; try again") from err
    except BotoCoreError as err:
        log.warning("artifact store: %s failed: %s", action, err)
        raise StoreUnavailable("the artifact store is unreachable; try again") from err


class S3ArtifactStore(ArtifactStore):
    def __init__(self, s3: S3Settings, staging: Path, multipart_bytes: int = 64 << 20, client: Any = None) -> None:
        super().__init__(staging)
        self.bucket = s3.bucket
        self.prefix = s3.prefix
        self._client = client if client is not None else connect(s3)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_bytes, multipart_chunksize=min(multipart_bytes, 16 << 20), max_concurrency=4
        )
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-delete")
        self._deleting: dict[str, Future[None]] = {}
        self._lock = threading.Lock()

    def key(self, sha256: str) -> str:
        return blob_key(self.prefix, sha256)

    def check(self) -> None:
        with s3_errors(f"reaching bucket {self.bucket!r}"):
            self._client.head_bucket(Bucket=self.bucket)

    def exists(self, sha256: str) -> bool:
        key = self.key(sha256)
        self._settle(sha256)
        with s3_errors("HEAD"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as err:
                if missing(err):
                    return False
                raise
        return True

    def open_blob(self, sha256: str, offset: int = 0, length: int = 0) -> Reader:
        key = self.key(sha256)
        checked_range(offset, length)
        self._settle(sha256)
        ranged = {"Range": http_range(offset, length)} if offset or length else {}
        with s3_errors("GET"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key, **ranged)
            except ClientError as err:
                if missing(err):
                    raise FileNotFoundError(f"no blob {sha256}") from None
                if past_the_end(err):
                    raise OutOfRange(f"offset {offset} is past the end of the blob") from None
                raise
        return Body(response["Body"])

    def blobs(self, older_than_s: float) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        prefix = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        with s3_errors("LIST"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if SHA256.match(name) and obj["LastModified"].timestamp() < cutoff:
                        yield name

    def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        with self._lock:
            fut = self._deleter.submit(self._delete, key)
            self._deleting[sha256] = fut
        fut.add_done_callback(lambda f: self._forget(sha256, f))

    def _delete(self, key: str) -> None:
        with contextlib.suppress(StoreUnavailable), s3_errors(f"DELETE {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def _forget(self, sha256: str, fut: Future[None]) -> None:
        with self._lock:
            if self._deleting.get(sha256) is fut:
                del self._deleting[sha256]

    def _settle(self, sha256: str) -> None:
        """Wait for this store's deletion of the blob, if one is under way: a blob deleted and
        uploaded again is then uploaded after it is gone, not found and then deleted."""
        with self._lock:
            fut = self._deleting.get(sha256)
        if fut is not None:
            fut.result()

    def publish(self, file: BinaryIO, temp_path: Path, sha256: str) -> bool:
        if self.exists(sha256):
            return False
        file.seek(0)
        with s3_errors("upload"):
            self._client.upload_fileobj(
                file,
                self.bucket,
                self.key(sha256),
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        return True

    def close(self) -> None:
        """Finish the deletions under way."""
        self._deleter.shutdown(wait=True)


class Body:
    """An object being read, S3's errors ours."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int = -1, /) -> bytes:
        with s3_errors("GET"):
            data: bytes = self._body.read(size if size >= 0 else None)
        return data

    def read_cached(self, size: int, /) -> bytes | None:
        return None  # every read waits for the network

    def close(self) -> None:
        self._body.close()
