"""The artifact store, each test against both backends: the filesystem and S3 (moto's server)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from controlplane.artifacts import ArtifactStore, FileArtifactStore, OutOfRange
from controlplane.s3store import S3ArtifactStore, StoreUnavailable
from tests.s3server import MotoServer
from tests.support import free_port

MULTIPART = 5 << 20  # S3's smallest part


def files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


@dataclass
class Backend:
    name: str
    make: Callable[[str], ArtifactStore]  # a store of a process on the given host
    blobs: Callable[[], list[str]]  # the sha256 of every stored blob
    staging: Callable[[str], Path]  # where the given host's processes stage writes


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    stores: list[ArtifactStore] = []
    if request.param == "filesystem":
        root = tmp_path / "artifacts"  # shared by every "host", as a network filesystem would be

        def make_file_store(host: str) -> ArtifactStore:
            stores.append(FileArtifactStore(root))
            return stores[-1]

        yield Backend(
            "filesystem", make_file_store, lambda: sorted(p.name for p in files(root / "blobs")), lambda _: root / "tmp"
        )
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        bucket = moto.new_bucket()
        settings = moto.settings(bucket, "loraplane/artifacts")

        def make_s3_store(host: str) -> ArtifactStore:
            stores.append(S3ArtifactStore(settings, tmp_path / host / "tmp", multipart_bytes=MULTIPART))
            return stores[-1]

        yield Backend(
            "s3",
            make_s3_store,
            lambda: sorted(key.rsplit("/", 1)[1] for key in moto.keys(bucket)),
            lambda host: tmp_path / host / "tmp",
        )
    for store in stores:
        store.close()


def stored(store: ArtifactStore, data: bytes) -> str:
    pending = store.open_temp()
    pending.write(data)
    sha, created = pending.commit()
    assert created
    return sha


def test_commit_stores_by_sha256_and_leaves_no_temp(backend: Backend) -> None:
    store = backend.make("a")
    pending = store.open_temp()
    pending.write(b"hello ")
    pending.write(b"world")
    sha, created = pending.commit()
    assert created and sha == hashlib.sha256(b"hello world").hexdigest()
    assert store.exists(sha)
    assert b"".join(store.read(sha)) == b"hello world"
    assert backend.blobs() == [sha]
    assert files(backend.staging("a")) == []


def test_same_bytes_twice_is_one_blob(backend: Backend) -> None:
    store = backend.make("a")
    for expected_created in (True, False):
        pending = store.open_temp()
        pending.write(b"x")
        _, created = pending.commit()
        assert created is expected_created
    assert backend.blobs() == [hashlib.sha256(b"x").hexdigest()]
    assert files(backend.staging("a")) == []


def test_discard_leaves_nothing(backend: Backend) -> None:
    store = backend.make("a")
    pending = store.open_temp()
    pending.write(b"half an adapter")
    pending.discard()
    assert files(backend.staging("a")) == []
    assert backend.blobs() == []


def test_temp_files_of_a_killed_process_are_cleaned(backend: Backend) -> None:
    dead = backend.make("a")
    abandoned = dead.open_temp()
    abandoned.write(b"abandoned")
    abandoned.file.close()  # the process "died": its temp file stays behind,
    os.close(dead._staging_lock)  # and the kernel released its lock
    live = backend.make("a")
    in_progress = live.open_temp()
    live.clean_temp()
    assert not abandoned.temp_path.exists()
    assert in_progress.temp_path.exists()
    in_progress.discard()
    assert files(backend.staging("a")) == []


def test_a_missing_blob_is_not_found_and_a_bad_sha256_is_refused(backend: Backend) -> None:
    store = backend.make("a")
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(absent)
    with pytest.raises(FileNotFoundError):
        store.open_blob(absent)
    for bad in ("../" + absent[3:], absent.upper(), absent[:-1], ""):
        with pytest.raises(ValueError):
            store.open_blob(bad)
        with pytest.raises(ValueError):
            store.delete(bad)


def test_delete_removes_the_blob_and_may_be_repeated(backend: Backend) -> None:
    store = backend.make("a")
    sha = stored(store, b"to be deleted")
    store.delete(sha)
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(FileNotFoundError):
        store.open_blob(sha)
    assert backend.blobs() == []
    assert stored(store, b"to be deleted") == sha  # and stored again: created anew


def test_replicas_on_two_hosts_share_blobs(backend: Backend) -> None:
    first, second = backend.make("a"), backend.make("b")
    sha = stored(first, b"written by one replica")
    assert second.exists(sha)
    assert b"".join(second.read(sha)) == b"written by one replica"
    again = second.open_temp()
    again.write(b"written by one replica")
    assert again.commit() == (sha, False)  # the same bytes are not stored twice
    second.delete(sha)
    assert not second.exists(sha)
    assert not first.exists(sha)
    assert files(backend.staging("a")) == files(backend.staging("b")) == []


def test_a_blob_larger_than_a_part_is_stored_whole(backend: Backend) -> None:
    store = backend.make("a")
    data = os.urandom(2 * MULTIPART + 12345)  # S3: a multipart upload of three parts
    pending = store.open_temp()
    for i in range(0, len(data), 1 << 20):
        pending.write(data[i : i + (1 << 20)])
    sha, _ = pending.commit()
    assert sha == hashlib.sha256(data).hexdigest()
    assert b"".join(store.read(sha)) == data
    assert files(backend.staging("a")) == []


def read_range(store: ArtifactStore, sha: str, offset: int, length: int) -> bytes:
    blob = store.open_blob(sha, offset, length)
    try:
        return b"".join(iter(lambda: blob.read(3), b""))
    finally:
        blob.close()


def test_a_blob_is_read_whole_or_by_byte_range(backend: Backend) -> None:
    store = backend.make("a")
    data = bytes(range(100))
    sha = stored(store, data)
    assert read_range(store, sha, 0, 0) == data  # neither: the whole blob (an older agent's request)
    assert read_range(store, sha, 10, 7) == data[10:17]
    assert read_range(store, sha, 0, 10) == data[:10]
    assert read_range(store, sha, 90, 0) == data[90:]  # no length: to the end
    assert read_range(store, sha, 95, 10) == data[95:]  # past the end: cut there
    for offset, length in ((100, 0), (100, 5), (250, 1), (-1, 5), (0, -1)):
        with pytest.raises(OutOfRange):
            store.open_blob(sha, offset, length)
    with pytest.raises(FileNotFoundError):
        store.open_blob(hashlib.sha256(b"never stored").hexdigest(), 10, 7)


def test_what_is_in_memory_is_read_without_waiting_and_the_rest_by_read(backend: Backend) -> None:
    """The control plane reads cached bytes on its event loop (`read_cached`), others in a thread."""
    store = backend.make("a")
    data = os.urandom(3000)
    sha = stored(store, data)
    blob = store.open_blob(sha, 1000, 1500)
    first = blob.read_cached(700)
    if backend.name == "filesystem":
        assert first == data[1000:1700]  # just written: in the page cache
    else:
        assert first is None  # S3: every read waits for the network
    got = first or b""
    while chunk := blob.read_cached(700) or blob.read(700):  # as WorkerService.FetchArtifact does
        got += chunk
    blob.close()
    assert got == data[1000:2500]


class FailingFile:
    """The staged file, failing once `limit` bytes have been read from it (a disk error mid-upload)."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file = file
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._left -= len(data)
        if self._left < 0:
            raise OSError("read error")
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def test_s3_a_failed_upload_leaves_no_object_and_no_parts(moto: MotoServer, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    store = S3ArtifactStore(moto.settings(bucket), tmp_path / "tmp", multipart_bytes=MULTIPART)
    data = os.urandom(3 * MULTIPART)
    pending = store.open_temp()
    pending.write(data)
    pending.file = FailingFile(pending.file, 2 * MULTIPART)  # type: ignore[assignment]
    with pytest.raises(OSError, match="read error"):
        pending.commit()
    store.close()
    assert not store.exists(hashlib.sha256(data).hexdigest())
    assert moto.keys(bucket) == []
    assert moto.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert files(tmp_path / "tmp") == []


def test_s3_blobs_are_keyed_by_sha256_under_the_prefix(moto: MotoServer, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    store = S3ArtifactStore(moto.settings(bucket, "/team-a/artifacts/"), tmp_path / "tmp")
    sha = stored(store, b"keyed")
    store.close()
    assert moto.keys(bucket) == [f"team-a/artifacts/blobs/{sha[:2]}/{sha}"]


def test_s3_an_unreachable_store_is_unavailable_not_missing(moto: MotoServer, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    store = S3ArtifactStore(
        moto.settings("loraplane-unreachable"), tmp_path / "tmp", client=moto.new_client(nobody, max_attempts=1)
    )
    sha = hashlib.sha256(b"x").hexdigest()
    for call in (store.check, lambda: store.exists(sha), lambda: store.open_blob(sha), lambda: stored(store, b"x")):
        with pytest.raises(StoreUnavailable):
            call()
    store.close()
    assert files(tmp_path / "tmp") == []


def test_s3_a_bucket_that_does_not_exist_fails_the_startup_check(moto: MotoServer, tmp_path: Path) -> None:
    store = S3ArtifactStore(moto.settings("loraplane-never-created"), tmp_path / "tmp")
    with pytest.raises(StoreUnavailable):
        store.check()
    store.close()


KILLED_MID_WRITE = """
import os, sys
from controlplane.artifacts import FileArtifactStore
pending = FileArtifactStore(sys.argv[1]).open_temp()
pending.write(b"half an adapter")
pending.file.flush()
print(pending.temp_path, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_process_killed_mid_write_leaves_nothing_once_a_store_starts(tmp_path: Path) -> None:
    """Really `kill -9`'d: its staging directory goes at the next start, not an hour later."""
    out = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == -9 and Path(out.stdout.strip()).exists()
    live = FileArtifactStore(tmp_path)
    in_progress = live.open_temp()
    live.clean_temp()
    assert not Path(out.stdout.strip()).exists()
    assert files(tmp_path / "tmp") == [in_progress.temp_path]
    in_progress.discard()
