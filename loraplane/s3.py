"""S3-compatible object storage settings and clients, shared by the control plane (which writes
artifacts) and the agents (which fetch them straight from the bucket)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible bucket for artifacts. Credentials left empty come from boto3's own chain
    (profile, web identity, instance role)."""

    bucket: str
    prefix: str  # no leading or trailing slash; may be empty
    endpoint_url: str = ""  # empty: AWS; set for MinIO, Ceph, moto and other S3-compatible stores
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, url: str, env: Mapping[str, str]) -> S3Settings:
        """`url` is `s3://bucket[/prefix]`; the rest is the standard AWS variables."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        return cls(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint_url=env.get("LORAPLANE_S3_ENDPOINT_URL", ""),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", ""),
            access_key_id=env.get("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=env.get("AWS_SESSION_TOKEN", ""),
        )


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
