"""moto's standalone server, which speaks the S3 HTTP API locally, in its own process."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import boto3
from botocore.config import Config

from loraplane.s3 import S3Settings
from loraplane.stack import port_open, wait_until
from tests.support import free_port, unmeasured_env

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loraplane-test", "AWS_SECRET_ACCESS_KEY": "loraplane-test-secret"}


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=unmeasured_env(),
        )
        wait_until(lambda: port_open(self.port), 30, "moto's S3 server", self._proc)
        self.client = self.new_client()

    def new_client(self, endpoint_url: str = "", max_attempts: int = 3) -> Any:
        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        ).client(
            "s3",
            endpoint_url=endpoint_url or self.url,
            config=Config(
                connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": max_attempts}
            ),
        )

    def new_bucket(self) -> str:
        bucket = f"loraplane-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def settings(self, bucket: str, prefix: str = "") -> S3Settings:
        return S3Settings.from_env(f"s3://{bucket}/{prefix}", self.env())

    def env(self) -> dict[str, str]:
        """What a control plane or agent needs to use this server (besides the store's URL)."""
        return {"LORAPLANE_S3_ENDPOINT_URL": self.url, "AWS_REGION": REGION, **CREDENTIALS}

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
