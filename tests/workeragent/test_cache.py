from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controlplane.s3store import S3ArtifactStore
from loraplane.s3 import S3Settings
from tests.s3server import MotoServer
from workeragent.cache import ArtifactCache, FetchError, IntegrityError, S3Source
from workeragent.settings import Settings

DATA = b"weights" * 1000
SHA = hashlib.sha256(DATA).hexdigest()


class Source:
    """Serves bytes the way the control plane's FetchArtifact does: in chunks, counting fetches."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fetches = 0

    async def fetch(self, sha256: str) -> AsyncIterator[bytes]:
        self.fetches += 1
        for i in range(0, len(self.data), 1000):
            await asyncio.sleep(0)
            yield self.data[i : i + 1000]


async def test_many_loads_of_one_artifact_fetch_it_once(tmp_path: Path) -> None:
    source = Source(DATA)
    cache = ArtifactCache(tmp_path, source.fetch)
    paths = await asyncio.gather(*(cache.blob(SHA, len(DATA)) for _ in range(10)))
    assert source.fetches == 1
    assert {p.read_bytes() for p in paths} == {DATA}
    await cache.blob(SHA, len(DATA))
    assert source.fetches == 1


async def test_the_adapter_dir_has_the_verified_weights_and_our_config(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, Source(DATA).fetch)
    d = await cache.adapter_dir("adp_1", SHA, len(DATA), b'{"r": 8}')
    assert (d / "adapter_model.safetensors").read_bytes() == DATA
    assert (d / "adapter_config.json").read_bytes() == b'{"r": 8}'
    cache.forget("adp_1")
    assert not d.exists()
    assert (tmp_path / "blobs" / SHA).exists()  # the node keeps the bytes for a warm reload


@pytest.mark.parametrize(
    ("served", "size"),
    [(DATA[:-1] + b"X", len(DATA)), (DATA[:-10], len(DATA)), (DATA + b"more", len(DATA))],
    ids=["corrupted", "truncated", "too long"],
)
async def test_bytes_that_do_not_verify_are_never_used(tmp_path: Path, served: bytes, size: int) -> None:
    cache = ArtifactCache(tmp_path, Source(served).fetch)
    with pytest.raises(IntegrityError):
        await cache.adapter_dir("adp_1", SHA, size, b"{}")
    assert list((tmp_path / "blobs").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "adapters").iterdir()) == []


async def test_past_its_budget_the_cache_drops_the_least_recently_used_unloaded_blobs(tmp_path: Path) -> None:
    blobs = {i: bytes([i]) * 1000 for i in range(4)}
    shas = {i: hashlib.sha256(b).hexdigest() for i, b in blobs.items()}
    by_sha = {shas[i]: blobs[i] for i in blobs}

    async def fetch(sha256: str) -> AsyncIterator[bytes]:
        yield by_sha[sha256]

    cache = ArtifactCache(tmp_path, fetch, max_bytes=3500)
    await cache.adapter_dir("loaded", shas[0], 1000, b"{}")  # linked by a loaded adapter: never dropped
    for i in (1, 2):
        await asyncio.sleep(0.02)
        await cache.blob(shas[i], 1000)
    await asyncio.sleep(0.02)
    await cache.blob(shas[1], 1000)  # used again: now 2 is the least recently used
    await cache.blob(shas[3], 1000)  # 4,000 bytes > 3,500
    assert {p.name for p in (tmp_path / "blobs").iterdir()} == {shas[0], shas[1], shas[3]}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    return moto.new_bucket()


def agent_s3(moto: MotoServer, bucket: str) -> S3Settings:
    env = {"LORAPLANE_ARTIFACT_STORE": f"s3://{bucket}/loraplane", "LORAPLANE_AGENT_TOKEN": "t" * 16, **moto.env()}
    s3 = Settings.from_env(env).artifact_s3
    assert s3 is not None
    return s3


async def test_with_an_s3_store_the_cache_fetches_straight_from_the_bucket(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    store = S3ArtifactStore(moto.settings(bucket, "loraplane"), tmp_path / "control-plane")  # as the control plane does
    pending = store.open_temp()
    pending.write(DATA)
    assert pending.commit() == (SHA, True)
    store.close()
    cache = ArtifactCache(tmp_path / "cache", S3Source(agent_s3(moto, bucket)).fetch)
    paths = await asyncio.gather(*(cache.blob(SHA, len(DATA)) for _ in range(3)))
    assert {p.read_bytes() for p in paths} == {DATA}
    d = await cache.adapter_dir("adp_1", SHA, len(DATA), b"{}")
    assert (d / "adapter_model.safetensors").read_bytes() == DATA


async def test_bytes_in_the_bucket_that_do_not_verify_are_never_used(
    moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    source = S3Source(agent_s3(moto, bucket))
    moto.client.put_object(Bucket=bucket, Key=source.key(SHA), Body=DATA[:-1] + b"X")
    cache = ArtifactCache(tmp_path, source.fetch)
    with pytest.raises(IntegrityError):
        await cache.adapter_dir("adp_1", SHA, len(DATA), b"{}")
    assert list((tmp_path / "blobs").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_blob_missing_from_the_bucket_is_a_fetch_error(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, S3Source(agent_s3(moto, bucket)).fetch)
    with pytest.raises(FetchError, match="NoSuchKey"):  # an OSError: reported to the control plane as a failed load
        await cache.blob(SHA, len(DATA))
    assert list((tmp_path / "blobs").iterdir()) == []


def test_without_an_s3_store_the_agent_fetches_from_the_control_plane() -> None:
    for store in ("", "/var/lib/loraplane/artifacts"):
        env = {"LORAPLANE_AGENT_TOKEN": "t" * 16, "LORAPLANE_ARTIFACT_STORE": store}
        assert Settings.from_env(env).artifact_s3 is None
