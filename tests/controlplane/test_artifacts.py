from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from controlplane.artifacts import ArtifactStore


def files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


def test_commit_stores_by_sha256_and_leaves_no_temp(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    pending = store.open_temp()
    pending.write(b"hello ")
    pending.write(b"world")
    sha, created = pending.commit()
    assert created and sha == hashlib.sha256(b"hello world").hexdigest()
    assert store.path(sha).read_bytes() == b"hello world"
    assert b"".join(store.read(sha)) == b"hello world"
    assert files(tmp_path / "tmp") == []


def test_same_bytes_twice_is_one_blob(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for expected_created in (True, False):
        pending = store.open_temp()
        pending.write(b"x")
        _, created = pending.commit()
        assert created is expected_created
    assert len(list((tmp_path / "blobs").rglob("*"))) == 2  # one fan-out dir, one blob


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    pending = store.open_temp()
    pending.write(b"half an adapter")
    pending.discard()
    assert files(tmp_path / "tmp") == []
    assert list((tmp_path / "blobs").iterdir()) == []


def test_temp_files_of_a_killed_process_are_cleaned(tmp_path: Path) -> None:
    dead = ArtifactStore(tmp_path)
    abandoned = dead.open_temp()
    abandoned.write(b"abandoned")
    abandoned.file.close()  # the process "died": its temp file stays behind
    os.utime(dead.temp_dir, (time.time() - 7200, time.time() - 7200))
    live = ArtifactStore(tmp_path)
    in_progress = live.open_temp()
    live.clean_temp()
    assert not abandoned.temp_path.exists()
    assert in_progress.temp_path.exists()
    in_progress.discard()
    assert files(tmp_path / "tmp") == []
