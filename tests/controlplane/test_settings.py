"""Where the control plane keeps artifacts, as the environment says."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.settings import Settings
from loraplane.s3 import S3Settings

SECRETS = {"LORAPLANE_OPERATOR_TOKEN": "o" * 16, "LORAPLANE_AGENT_TOKEN": "a" * 16}


def settings(**env: str) -> Settings:
    return Settings.from_env(SECRETS | env)


def test_the_filesystem_store_is_the_default_and_the_old_variable_still_works() -> None:
    assert settings().artifact_dir == Path(".loraplane/artifacts") and settings().artifact_s3 is None
    assert settings(LORAPLANE_ARTIFACT_DIR="/srv/a").artifact_dir == Path("/srv/a")
    assert settings(LORAPLANE_ARTIFACT_STORE="/srv/b", LORAPLANE_ARTIFACT_DIR="/srv/a").artifact_dir == Path("/srv/b")


def test_an_s3_url_names_the_bucket_and_prefix_and_the_aws_variables_the_rest() -> None:
    s = settings(
        LORAPLANE_ARTIFACT_STORE="s3://models/prod/artifacts/",
        LORAPLANE_ARTIFACT_DIR="/srv/staging",
        LORAPLANE_S3_ENDPOINT_URL="http://minio:9000",
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
        AWS_SECRET_ACCESS_KEY="very-secret-key",
    )
    assert s.artifact_s3 == S3Settings(
        bucket="models",
        prefix="prod/artifacts",
        endpoint_url="http://minio:9000",
        region="eu-west-1",
        access_key_id="AKIAEXAMPLE",
        secret_access_key="very-secret-key",
    )
    assert s.artifact_dir == Path("/srv/staging")  # uploads in progress are staged there
    assert "very-secret-key" not in repr(s)
    assert settings(LORAPLANE_ARTIFACT_STORE="s3://b", AWS_REGION="us-west-2", AWS_DEFAULT_REGION="x").artifact_s3 == (
        S3Settings(bucket="b", prefix="", region="us-west-2")
    )


@pytest.mark.parametrize("store", ["s3://", "s3:///prefix", "s3://b/p?versionId=1", "gs://bucket/prefix"])
def test_a_store_that_is_neither_a_directory_nor_an_s3_url_is_refused(store: str) -> None:
    with pytest.raises(ValueError):
        settings(LORAPLANE_ARTIFACT_STORE=store)
