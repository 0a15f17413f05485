"""S3-compatible object storage settings and clients, shared by the control plane (which writes
artifacts) and the agents (which fetch them straight from the bucket)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

from loraplane.config import ConfigError, derived, env_names, from_env, var

STORE = "LORAPLANE_ARTIFACT_STORE"  # where artifacts live: a directory, or s3://bucket/prefix


def _region(environ: Mapping[str, str], _: Mapping[str, Any]) -> str:
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION", "")


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible bucket for artifacts. Credentials left empty come from boto3's own chain
    (profile, web identity, instance role)."""

    bucket: str
    prefix: str  # no leading or trailing slash; may be empty
    # empty: AWS; set for MinIO, Ceph, moto and other S3-compatible stores
    endpoint_url: str = field(default="", metadata=var("LORAPLANE_S3_ENDPOINT_URL"))
    region: str = field(default="", metadata=derived(("AWS_REGION", "AWS_DEFAULT_REGION"), _region))
    access_key_id: str = field(default="", metadata=var("AWS_ACCESS_KEY_ID"))
    secret_access_key: str = field(default="", repr=False, metadata=var("AWS_SECRET_ACCESS_KEY"))
    session_token: str = field(default="", repr=False, metadata=var("AWS_SESSION_TOKEN"))

    @classmethod
    def from_env(cls, url: str, env: Mapping[str, str]) -> S3Settings:
        """`url` is `s3://bucket[/prefix]`; the rest is the standard AWS variables."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"{url!r} is not an s3://bucket/prefix URL")
        return from_env(cls, env, bucket=parts.netloc, prefix=parts.path.strip("/"))


def bucket_from_env(environ: Mapping[str, str]) -> S3Settings | None:
    """The bucket LORAPLANE_ARTIFACT_STORE names when it is an s3:// URL, else None."""
    location = environ.get(STORE, "")
    if not location.startswith("s3://"):
        return None
    try:
        return S3Settings.from_env(location, environ)
    except ConfigError as err:
        raise ConfigError(f"{STORE}: {err}") from None


# The variables bucket_from_env reads.
BUCKET_ENV = (STORE, *sorted(env_names(S3Settings)))


def connect(s3: S3Settings, max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client (thread-safe) with bounded timeouts and retries."""
    session = boto3.session.Session(
        aws_access_key_id=s3.access_key_id or None,
        aws_secret_access_key=s3.secret_access_key or None,
        aws_session_token=s3.session_token or None,
        region_name=s3.region or ("us-east-1" if s3.endpoint_url else None),
    )
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 4},
        max_pool_connections=max_pool_connections,
        # S3-compatible servers (MinIO, moto) are addressed by path, not by bucket host name.
        s3={"addressing_style": "path"} if s3.endpoint_url else None,
    )
    return session.client("s3", endpoint_url=s3.endpoint_url or None, config=config)
