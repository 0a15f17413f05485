"""Checks on the repository itself: generated code, deployment files."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_protos() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/genprotos.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_modules_that_exist_with_settings_that_are_read() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    shared = [ROOT / "loraplane" / "logs.py", ROOT / "loraplane" / "s3.py"]  # read by every component
    source = "".join(
        p.read_text() for d in ("controlplane", "dataplane", "workeragent") for p in (ROOT / d).glob("*.py")
    ) + "".join(p.read_text() for p in shared)
    read = set(re.findall(r'"(LORAPLANE_[A-Z0-9_]+)"', source))
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"
        env = service.get("environment", {})
        for var in env:
            if var.startswith("LORAPLANE_"):
                assert var in read, f"{name}: {var} is set but no component reads it"
