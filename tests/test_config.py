"""Settings declared once (`loraplane/config.py`), and each component's declaration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import controlplane.settings
import dataplane.settings
import workeragent.settings
from loraplane.config import ConfigError, derived, env_names, from_env, var
from loraplane.logs import LogSettings


def _total(_: Mapping[str, str], values: Mapping[str, Any]) -> int:
    total: int = values["count"] * 2
    return total


@dataclass(frozen=True, kw_only=True)
class Example:
    count: int = field(default=3, metadata=var("EX_COUNT"))
    ratio: float = field(default=0.5, metadata=var("EX_RATIO"))
    path: Path = field(default=Path("a"), metadata=var("EX_PATH"))
    args: tuple[str, ...] = field(default=(), metadata=var("EX_ARGS"))
    url: str = field(default="http://x", metadata=var("EX_URL", parse=lambda s: s.rstrip("/")))
    token: str = field(repr=False, metadata=var("EX_TOKEN", secret=True))
    total: int = field(metadata=derived(("EX_UNUSED",), _total))
    fixed: str = "not read"


@dataclass(frozen=True)
class NeedsName:
    name: str = field(metadata=var("EX_NAME"))


TOKEN = {"EX_TOKEN": "t" * 16}


def test_unset_variables_leave_the_defaults_and_set_ones_convert_by_type() -> None:
    assert from_env(Example, TOKEN) == Example(token="t" * 16, total=6)
    got = from_env(
        Example,
        TOKEN
        | {"EX_COUNT": "7", "EX_RATIO": "1e-3", "EX_PATH": "/srv", "EX_ARGS": "--x 'a b'", "EX_URL": "http://y//"},
    )
    assert (got.count, got.ratio, got.path, got.args, got.url) == (7, 0.001, Path("/srv"), ("--x", "a b"), "http://y")
    assert got.total == 14, "a derived field sees the plain ones"


def test_given_fields_are_not_read() -> None:
    assert from_env(Example, TOKEN | {"EX_COUNT": "7"}, count=1).total == 2


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("EX_COUNT", "abc", "EX_COUNT='abc': not an integer"),
        ("EX_COUNT", "", "EX_COUNT='': not an integer"),
        ("EX_RATIO", "half", "EX_RATIO='half': not a number"),
        ("EX_ARGS", "'open", 'EX_ARGS="\'open": No closing quotation'),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(name: str, value: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        from_env(Example, TOKEN | {name: value})
    assert str(raised.value) == error
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("env", [{}, {"EX_TOKEN": "short-secret"}])
def test_a_missing_or_short_secret_is_named_and_never_shown(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="^EX_TOKEN must be set to a secret of at least 16 characters$"):
        from_env(Example, env)


def test_a_variable_without_a_default_must_be_set() -> None:
    with pytest.raises(ConfigError, match="^EX_NAME must be set$"):
        from_env(NeedsName, {})
    assert from_env(NeedsName, {"EX_NAME": ""}).name == ""


def test_env_names_lists_plain_and_derived_variables() -> None:
    assert env_names(Example) == {"EX_COUNT", "EX_RATIO", "EX_PATH", "EX_ARGS", "EX_URL", "EX_TOKEN", "EX_UNUSED"}


# --- each component's declaration ---------------------------------------------------------------

S3 = {
    "LORAPLANE_ARTIFACT_STORE",
    "LORAPLANE_S3_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
}
TIERS = {f"LORAPLANE_TIER_{t}_MAX_{w}" for t in ("SHARED", "RESERVED", "DEDICATED") for w in ("ADAPTERS", "BYTES")}
RATES = {f"LORAPLANE_TIER_{t}_{w}" for t in ("SHARED", "RESERVED", "DEDICATED") for w in ("RPM", "TPM", "CONCURRENCY")}
PINS = {f"LORAPLANE_TIER_{t}_PINNED_SLOTS" for t in ("SHARED", "RESERVED", "DEDICATED")}
WEIGHTS = {f"LORAPLANE_TIER_{t}_WEIGHT" for t in ("SHARED", "RESERVED", "DEDICATED")}
NAMES: dict[type[Any], set[str]] = {
    controlplane.settings.Settings: {
        *S3,
        *TIERS,
        *RATES,
        *PINS,
        *("LORAPLANE_GRPC_ADDR", "LORAPLANE_ADVERTISE_ADDR", "LORAPLANE_REDIS_URL", "LORAPLANE_ARTIFACT_DIR"),
        *("LORAPLANE_CATALOG", "LORAPLANE_OPERATOR_TOKEN", "LORAPLANE_AGENT_TOKEN", "LORAPLANE_PEER_TOKEN"),
        *("LORAPLANE_MAX_ADAPTER_BYTES", "LORAPLANE_LOAD_TIMEOUT_S", "LORAPLANE_HEARTBEAT_TIMEOUT_S"),
        *("LORAPLANE_MAX_LOADS_PER_S", "LORAPLANE_PLACEMENT_FAILED_HOLD_S", "LORAPLANE_METRICS_ADDR"),
        *("LORAPLANE_ORPHAN_GRACE_S", "LORAPLANE_ORPHAN_SWEEP_S", "HF_ENDPOINT"),
        *("LORAPLANE_HUB_TIMEOUT_S", "LORAPLANE_HUB_TOTAL_TIMEOUT_S", "LORAPLANE_PREFETCH_WORKERS"),
    },
    dataplane.settings.Settings: {
        *("LORAPLANE_HTTP_HOST", "LORAPLANE_HTTP_PORT", "LORAPLANE_REDIS_URL", "LORAPLANE_CONTROLPLANE_ADDR"),
        *("LORAPLANE_CATALOG", "LORAPLANE_WORKER_API_KEY", "LORAPLANE_MAX_ADAPTER_BYTES", "LORAPLANE_MAX_BODY_BYTES"),
        *("LORAPLANE_UPLOAD_TIMEOUT_S", "LORAPLANE_MAX_TOKENS", "LORAPLANE_MAX_N", "LORAPLANE_REPLICATE_AT_IN_FLIGHT"),
        *("LORAPLANE_HEADER_TIMEOUT_S", "LORAPLANE_BODY_TIMEOUT_S", "LORAPLANE_UPLOAD_IDLE_TIMEOUT_S"),
        "LORAPLANE_CORS_ORIGINS",
        *RATES,
        *("LORAPLANE_RATE_BURST_S", "LORAPLANE_ESTIMATE_COMPLETION_TOKENS", "LORAPLANE_USAGE_FLUSH_S"),
        *("LORAPLANE_USAGE_MINUTE_DAYS", "LORAPLANE_USAGE_RETENTION_DAYS"),
        *WEIGHTS,
        *("LORAPLANE_WORKER_CONCURRENCY", "LORAPLANE_DATAPLANE_REPLICAS", "LORAPLANE_QUEUE_TIMEOUT_S"),
        "LORAPLANE_QUEUE_MAX_PER_TENANT",
    },
    workeragent.settings.Settings: {
        *S3,
        *("LORAPLANE_CONTROLPLANE_ADDR", "LORAPLANE_AGENT_TOKEN", "LORAPLANE_WORKER_ID", "LORAPLANE_BASE_MODEL"),
        *("LORAPLANE_CATALOG", "LORAPLANE_CACHE_DIR", "LORAPLANE_VLLM_HOST", "LORAPLANE_VLLM_PORT"),
        *("LORAPLANE_WORKER_API_KEY", "LORAPLANE_VLLM_AGENT_SECRET", "LORAPLANE_VLLM_URL", "LORAPLANE_ADVERTISE_URL"),
        *("LORAPLANE_VLLM_ARGS", "LORAPLANE_HEARTBEAT_S", "LORAPLANE_METRICS_ADDR", "LORAPLANE_DRAIN_TIMEOUT_S"),
        *("LORAPLANE_CACHE_MAX_BYTES", "LORAPLANE_VLLM_STARTUP_TIMEOUT_S", "LORAPLANE_VLLM_COMMAND"),
        *("LORAPLANE_ENGINE_HANG_S", "LORAPLANE_ENGINE_STABLE_S", "LORAPLANE_ENGINE_BACKOFF_CAP_S"),
        *("LORAPLANE_ENGINE_GPU_RELEASE_S", "LORAPLANE_MAX_CONCURRENCY"),
    },
    LogSettings: {"LORAPLANE_LOG_FORMAT", "LORAPLANE_LOG_LEVEL"},
}
SECRETS = {"LORAPLANE_OPERATOR_TOKEN": "o" * 16, "LORAPLANE_AGENT_TOKEN": "a" * 16, "LORAPLANE_PEER_TOKEN": "p" * 16}


@pytest.mark.parametrize("settings", NAMES, ids=lambda s: s.__module__)
def test_each_component_declares_every_variable_it_reads(settings: type[Any]) -> None:
    assert env_names(settings) == NAMES[settings]


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        (controlplane.settings.Settings, "LORAPLANE_MAX_ADAPTER_BYTES"),
        (dataplane.settings.Settings, "LORAPLANE_HTTP_PORT"),
        (workeragent.settings.Settings, "LORAPLANE_VLLM_PORT"),
    ],
)
def test_each_component_refuses_a_bad_integer_by_name(settings: type[Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}='12 MB': not an integer$"):
        settings.from_env(SECRETS | {name: "12 MB"})


def test_the_data_plane_defaults_are_the_declared_ones() -> None:
    s = dataplane.settings.Settings.from_env({})
    assert s == dataplane.settings.Settings()
    assert (s.host, s.port, s.max_adapter_bytes, s.max_body_bytes) == ("127.0.0.1", 8080, 500_000_000, 1 << 20)


def test_the_agent_defaults_are_the_declared_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "node-1")
    s = workeragent.settings.Settings.from_env({"LORAPLANE_AGENT_TOKEN": "a" * 16})
    assert s == workeragent.settings.Settings(agent_token="a" * 16, worker_id="node-1-tiny-llama")
    assert (s.vllm_port, s.cache_max_bytes, s.artifact_s3) == (8100, 20 << 30, None)
    named = workeragent.settings.Settings.from_env({"LORAPLANE_AGENT_TOKEN": "a" * 16, "LORAPLANE_BASE_MODEL": "m"})
    assert named.worker_id == "node-1-m"


@pytest.mark.parametrize(
    ("module", "env"),
    [
        ("dataplane.app", {"LORAPLANE_HTTP_PORT": "eighty"}),
        ("dataplane.app", {"LORAPLANE_LOG_LEVEL": "LOUD"}),
        ("controlplane.server", {**SECRETS, "LORAPLANE_MAX_LOADS_PER_S": "many"}),
        ("workeragent.agent", {"LORAPLANE_AGENT_TOKEN": "a" * 16, "LORAPLANE_HEARTBEAT_S": "2s"}),
    ],
)
def test_a_component_started_with_a_bad_value_says_which_in_one_line(module: str, env: dict[str, str]) -> None:
    name, value = next((k, v) for k, v in env.items() if k not in SECRETS)
    out = subprocess.run(
        [sys.executable, "-m", module], env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(f"configuration error: {name}={value!r}")
    assert "Traceback" not in out.stderr
