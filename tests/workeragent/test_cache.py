from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest

import workeragent.cache
from controlplane.s3store import S3ArtifactStore
from loraplane.s3 import S3Settings
from tests.s3server import MotoServer
from workeragent.cache import ArtifactCache, FetchError, IntegrityError, S3Source
from workeragent.settings import Settings

DATA = b"weights" * 1000
SHA = hashlib.sha256(DATA).hexdigest()


class Source:
    """Serves bytes the way the control plane's FetchArtifact does: a byte range (length 0: to
    the end), in chunks; it counts whole downloads (ranges from offset 0) and records ranges."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self.data = data
        self.chunk = chunk
        self.fetches = 0
        self.ranges: list[tuple[int, int]] = []
        self.open = 0  # ranges being served now
        self.most_open = 0

    def served(self, offset: int, length: int) -> bytes | memoryview:
        whole = memoryview(self.data)
        return whole[offset : offset + length] if length else whole[offset:]

    async def fetch(self, sha256: str, offset: int, length: int) -> AsyncGenerator[bytes]:
        self.fetches += offset == 0
        self.ranges.append((offset, length))
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            data = self.served(offset, length)
            for i in range(0, len(data), self.chunk):
                await asyncio.sleep(0)
                yield bytes(data[i : i + self.chunk])  # each chunk new bytes, as off the network
        finally:
            self.open -= 1


def nothing_left_but_blobs(root: Path) -> None:
    assert list((root / "tmp").iterdir()) == []


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
@pytest.mark.parametrize("segment", [1 << 20, 1000], ids=["one range", "ranges"])
async def test_bytes_that_do_not_verify_are_never_used(tmp_path: Path, served: bytes, size: int, segment: int) -> None:
    class Stored(Source):
        """What the store holds, sent from the offset to its end whatever the length."""

        def served(self, offset: int, length: int) -> bytes:
            return self.data[offset:]

    cache = ArtifactCache(tmp_path, Stored(served).fetch, segment=segment)
    with pytest.raises(IntegrityError):
        await cache.adapter_dir("adp_1", SHA, size, b"{}")
    assert list((tmp_path / "blobs").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "adapters").iterdir()) == []


BIG = os.urandom(10_000 + 123)  # ten ranges of 1,000 bytes and a short last one
BIG_SHA = hashlib.sha256(BIG).hexdigest()


async def test_a_blob_comes_in_ranges_a_few_at_a_time_that_cover_it_exactly(tmp_path: Path) -> None:
    source = Source(BIG, chunk=300)
    cache = ArtifactCache(tmp_path, source.fetch, streams=3, segment=1000)
    path = await cache.blob(BIG_SHA, len(BIG))
    assert path.read_bytes() == BIG
    assert sorted(source.ranges) == [(o, min(1000, len(BIG) - o)) for o in range(0, len(BIG), 1000)]
    assert source.most_open == 3
    nothing_left_but_blobs(tmp_path)


class Corrupting(Source):
    """Serves one range wrong: changed, cut short, or longer than asked."""

    def __init__(self, data: bytes, at: int, how: str) -> None:
        super().__init__(data, chunk=300)
        self.at, self.how = at, how

    def served(self, offset: int, length: int) -> bytes | memoryview:
        data = bytes(super().served(offset, length))
        if offset != self.at:
            return data
        return {"corrupt": data[:-1] + bytes([data[-1] ^ 1]), "truncated": data[:-1]}[self.how]


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
@pytest.mark.parametrize("at", [0, 5000, 10_000], ids=["first range", "a middle range", "the last range"])
async def test_a_corrupt_or_truncated_range_is_refused(tmp_path: Path, how: str, at: int) -> None:
    cache = ArtifactCache(tmp_path, Corrupting(BIG, at, how).fetch, streams=3, segment=1000)
    with pytest.raises(IntegrityError, match="failed verification" if how == "corrupt" else "truncated"):
        await cache.adapter_dir("adp_1", BIG_SHA, len(BIG), b"{}")
    assert list((tmp_path / "blobs").iterdir()) == []
    assert list((tmp_path / "adapters").iterdir()) == []
    nothing_left_but_blobs(tmp_path)


async def test_a_source_that_ignores_ranges_still_delivers_the_blob_whole(tmp_path: Path) -> None:
    """A control plane older than the agent: it sends the whole blob whatever the range."""

    class Old(Source):
        def served(self, offset: int, length: int) -> bytes:
            return self.data

    source = Old(BIG, chunk=300)
    cache = ArtifactCache(tmp_path, source.fetch, streams=3, segment=1000)
    assert (await cache.blob(BIG_SHA, len(BIG))).read_bytes() == BIG
    assert source.ranges[-1] == (0, len(BIG))  # after the ranged attempt, one whole-blob stream
    nothing_left_but_blobs(tmp_path)


async def test_a_fetch_holds_a_few_chunks_in_memory_whatever_the_blob_size(tmp_path: Path) -> None:
    data = os.urandom(48 << 20)
    sha = hashlib.sha256(data).hexdigest()
    source = Source(data, chunk=1 << 20)
    cache = ArtifactCache(tmp_path, source.fetch, streams=4, segment=4 << 20)
    tracemalloc.start()
    try:
        await cache.blob(sha, len(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source.most_open == 4
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB held at once for a 48 MiB blob"  # 4 chunks, a little more


async def test_a_blob_verified_by_this_process_is_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    sha256_of = workeragent.cache._sha256_of

    def counted(path: Path, size: int) -> str:
        hashed.append(path)
        return sha256_of(path, size)

    monkeypatch.setattr(workeragent.cache, "_sha256_of", counted)
    source = Source(DATA)
    cache = ArtifactCache(tmp_path, source.fetch)
    await cache.adapter_dir("adp_1", SHA, len(DATA), b"{}")
    await cache.adapter_dir("adp_1", SHA, len(DATA), b"{}")
    await cache.blob(SHA, len(DATA))
    assert hashed == []  # hashed while it arrived, trusted since: nothing is fsynced, nothing re-read
    restarted = ArtifactCache(tmp_path, source.fetch)  # the agent restarts: nothing on disk is trusted
    await asyncio.gather(*(restarted.blob(SHA, len(DATA)) for _ in range(5)))
    await restarted.adapter_dir("adp_1", SHA, len(DATA), b"{}")
    assert hashed == [tmp_path / "blobs" / SHA]  # once, for every caller, then trusted again
    assert source.fetches == 1


def tear(path: Path) -> None:
    """What a crash may leave of a file never fsynced: the right size, other bytes."""
    with path.open("r+b") as f:
        f.seek(100)
        f.write(b"\0" * 100)


async def test_a_blob_torn_before_the_agent_restarted_is_fetched_again(tmp_path: Path) -> None:
    source = Source(DATA)
    d = await ArtifactCache(tmp_path, source.fetch).adapter_dir("adp_1", SHA, len(DATA), b"{}")
    tear(tmp_path / "blobs" / SHA)  # the loaded adapter's link is the same file: torn too
    restarted = ArtifactCache(tmp_path, source.fetch)
    assert await restarted.adapter_dir("adp_1", SHA, len(DATA), b"{}") == d
    assert source.fetches == 2
    assert (tmp_path / "blobs" / SHA).read_bytes() == DATA
    assert (d / "adapter_model.safetensors").read_bytes() == DATA  # linked again, to the good bytes


@pytest.mark.parametrize("change", ["rewritten", "truncated", "replaced"])
async def test_a_blob_changed_since_it_was_verified_is_verified_again(tmp_path: Path, change: str) -> None:
    source = Source(DATA)
    cache = ArtifactCache(tmp_path, source.fetch)
    path = await cache.blob(SHA, len(DATA))
    if change == "rewritten":
        tear(path)
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))
    elif change == "truncated":
        os.truncate(path, 10)
    else:
        path.unlink()
        path.write_bytes(DATA[:-1] + b"X")
    assert (await cache.blob(SHA, len(DATA))).read_bytes() == DATA
    assert source.fetches == 2


async def test_past_its_budget_the_cache_drops_the_least_recently_used_unloaded_blobs(tmp_path: Path) -> None:
    blobs = {i: bytes([i]) * 1000 for i in range(4)}
    shas = {i: hashlib.sha256(b).hexdigest() for i, b in blobs.items()}
    by_sha = {shas[i]: blobs[i] for i in blobs}

    async def fetch(sha256: str, offset: int, length: int) -> AsyncGenerator[bytes]:
        yield by_sha[sha256][offset : offset + length]

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


async def test_from_the_bucket_a_blob_comes_in_ranged_gets(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    source = S3Source(agent_s3(moto, bucket))
    moto.client.put_object(Bucket=bucket, Key=source.key(BIG_SHA), Body=BIG)
    assert b"".join([c async for c in source.fetch(BIG_SHA, 9000, 1000)]) == BIG[9000:10_000]
    assert b"".join([c async for c in source.fetch(BIG_SHA, 10_000, 1000)]) == BIG[10_000:]  # cut at the end
    assert b"".join([c async for c in source.fetch(BIG_SHA, 0, 0)]) == BIG  # no range: the whole blob
    cache = ArtifactCache(tmp_path, source.fetch, streams=3, segment=1000)
    assert (await cache.blob(BIG_SHA, len(BIG))).read_bytes() == BIG


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
