"""Adapters from Hugging Face repos: resolve the revision to a commit, fetch only the
two files we accept, pinned to that commit. Runs in a worker thread (huggingface_hub
is blocking). The token is used for these calls only, never stored or logged."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from controlplane.artifacts import ArtifactStore, PendingArtifact
from controlplane.errors import InvalidAdapter, TooLarge

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 64 << 10


class HubError(Exception):
    """A download that failed for a reason the user can act on."""


@dataclass(frozen=True)
class Fetched:
    commit_sha: str
    pending: PendingArtifact
    config: bytes | None


def fetch(
    endpoint: str, repo: str, revision: str, token: str | None, artifacts: ArtifactStore, max_bytes: int, timeout: float
) -> Fetched:
    """Resolve, check the file list, download into a pending artifact (not yet committed)."""
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=timeout)
    except RepositoryNotFoundError:
        raise HubError(f"repo {repo!r} was not found (or is private and no valid hf_token was given)") from None
    except GatedRepoError:
        raise HubError(f"repo {repo!r} is gated: accept its terms and pass an hf_token") from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} was not found in {repo!r}") from None
    except HfHubHTTPError as err:
        raise HubError(f"the hub answered {err.response.status_code if err.response is not None else '?'}") from None
    sha = info.sha
    if not sha:
        raise HubError("the hub did not say which commit the revision is")
    files = {s.rfilename: s.size for s in info.siblings or []}
    if WEIGHTS not in files:
        if any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files):
            raise InvalidAdapter(
                f"repo has no {WEIGHTS}, only pickle weights (.bin/.pt), which loraplane never loads; "
                "convert them with safetensors and push again"
            )
        raise InvalidAdapter(f"repo has no {WEIGHTS}")
    size = files[WEIGHTS]
    if size is not None and size > max_bytes:
        raise TooLarge(f"{WEIGHTS} is {size} bytes, over the tier's limit of {max_bytes}")
    with tempfile.TemporaryDirectory(dir=artifacts.temp_dir) as tmp:
        try:
            config = None
            if CONFIG in files:
                path = Path(_download(repo, CONFIG, sha, endpoint, token, tmp, timeout))
                if path.stat().st_size > MAX_CONFIG_BYTES:
                    raise InvalidAdapter(f"{CONFIG} is larger than {MAX_CONFIG_BYTES} bytes")
                config = path.read_bytes()
            weights = Path(_download(repo, WEIGHTS, sha, endpoint, token, tmp, timeout))
        except HfHubHTTPError as err:
            raise HubError(f"downloading from the hub failed ({type(err).__name__})") from None
        if weights.stat().st_size > max_bytes:
            raise TooLarge(f"{WEIGHTS} is over the tier's limit of {max_bytes} bytes")
        pending = artifacts.open_temp()
        try:
            with weights.open("rb") as f:
                while chunk := f.read(1 << 20):
                    pending.write(chunk)
        except BaseException:
            pending.discard()
            raise
    return Fetched(commit_sha=sha, pending=pending, config=config)


def _download(repo: str, filename: str, sha: str, endpoint: str, token: str | None, tmp: str, timeout: float) -> str:
    return str(
        hf_hub_download(
            repo,
            filename,
            revision=sha,
            endpoint=endpoint,
            token=token or False,
            local_dir=tmp,
            etag_timeout=timeout,
        )
    )
