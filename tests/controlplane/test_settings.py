"""The control plane's settings: where it keeps artifacts, its secrets, its derived values."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.settings import Settings
from loraplane.s3 import S3Settings

SECRETS = {"LORAPLANE_OPERATOR_TOKEN": "o" * 16, "LORAPLANE_AGENT_TOKEN": "a" * 16, "LORAPLANE_PEER_TOKEN": "p" * 16}


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


def test_the_defaults_are_the_declared_ones() -> None:
    s = settings()
    assert s == Settings(
        operator_token="o" * 16,
        agent_token="a" * 16,
        peer_token="p" * 16,
        advertise_addr="127.0.0.1:50051",
        artifact_dir=Path(".loraplane/artifacts"),
    )
    assert s.grpc_addr == "127.0.0.1:50051" and s.max_adapter_bytes == 500_000_000
    assert s.tier_limits == {"shared": 20, "reserved": 200, "dedicated": 200}
    assert s.tier_max_bytes == dict.fromkeys(s.tier_limits, 500_000_000)


def test_derived_values_follow_the_variables_they_default_to() -> None:
    s = settings(LORAPLANE_GRPC_ADDR="0.0.0.0:7000", LORAPLANE_MAX_ADAPTER_BYTES="1000", HF_ENDPOINT="http://hub/")
    assert s.advertise_addr == "0.0.0.0:7000" and s.hf_endpoint == "http://hub"
    assert s.tier_max_bytes == {"shared": 1000, "reserved": 1000, "dedicated": 1000}
    s = settings(
        LORAPLANE_ADVERTISE_ADDR="cp-1:7000",
        LORAPLANE_TIER_SHARED_MAX_ADAPTERS="3",
        LORAPLANE_TIER_DEDICATED_MAX_BYTES="9",
    )
    assert s.advertise_addr == "cp-1:7000"
    assert s.tier_limits == {"shared": 3, "reserved": 200, "dedicated": 200}
    assert s.tier_max_bytes == {"shared": 500_000_000, "reserved": 500_000_000, "dedicated": 9}


@pytest.mark.parametrize("name", ["LORAPLANE_OPERATOR_TOKEN", "LORAPLANE_AGENT_TOKEN", "LORAPLANE_PEER_TOKEN"])
@pytest.mark.parametrize("value", [None, "", "fifteen-chars!!"])
def test_each_secret_is_required_and_at_least_16_characters(name: str, value: str | None) -> None:
    env = {k: v for k, v in SECRETS.items() if k != name} | ({} if value is None else {name: value})
    with pytest.raises(ValueError, match=f"^{name} must be set to a secret of at least 16 characters$"):
        Settings.from_env(env)


def test_the_peer_token_is_a_secret_of_its_own() -> None:
    s = settings()
    assert s.peer_token == "p" * 16 and s.peer_token not in (s.operator_token, s.agent_token)
    assert "p" * 16 not in repr(s) and "o" * 16 not in repr(s)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("LORAPLANE_TIER_SHARED_MAX_BYTES", "1GB", "LORAPLANE_TIER_SHARED_MAX_BYTES='1GB': not an integer"),
        ("LORAPLANE_MAX_LOADS_PER_S", "", "LORAPLANE_MAX_LOADS_PER_S='': not an integer"),
        ("LORAPLANE_LOAD_TIMEOUT_S", "60s", "LORAPLANE_LOAD_TIMEOUT_S='60s': not a number"),
        ("LORAPLANE_ARTIFACT_STORE", "s3://", "LORAPLANE_ARTIFACT_STORE: 's3://' is not an s3://bucket/prefix URL"),
    ],
)
def test_a_bad_value_names_its_variable_and_the_value(name: str, value: str, error: str) -> None:
    with pytest.raises(ValueError) as raised:
        settings(**{name: value})
    assert str(raised.value) == error


@pytest.mark.parametrize("other", ["LORAPLANE_OPERATOR_TOKEN", "LORAPLANE_AGENT_TOKEN"])
def test_a_peer_token_equal_to_another_secret_is_refused(other: str) -> None:
    with pytest.raises(ValueError, match="LORAPLANE_PEER_TOKEN must differ"):
        Settings.from_env({**SECRETS, "LORAPLANE_PEER_TOKEN": SECRETS[other]})
