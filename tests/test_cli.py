"""The tenant's `loraplane` verbs, run as a user runs them (a subprocess) against a running stack."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.store import Store
from loraplane.stack import Stack
from loraplane.state.records import WorkerRecord
from tests.conftest import SimStack, new_tenant
from tests.controlplane.test_service import OPERATOR, start_control_plane
from tests.hubserver import HubServer, Repo
from tests.support import RedisServer, free_port, lora_tensors, safetensors_bytes

ADAPTER = safetensors_bytes(lora_tensors(rank=4))
CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})


def env(tmp_path: Path, url: str = "", key: str = "", **extra: str) -> dict[str, str]:
    """The environment of a user with no loraplane settings but these (and a config dir of
    their own, so that the developer's real one is never read)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLANE_")}
    base["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    if url:
        base["LORAPLANE_URL"] = url
    if key:
        base["LORAPLANE_API_KEY"] = key
    return {**base, **extra}


def loraplane(
    environ: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplane.cli", *args],
        env=environ, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """A failed command: exit status 1, nothing on stdout, one `error: …` line on stderr."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stdout == "" and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    return out.stderr.removeprefix("error: ").strip()


def adapter_file(tmp_path: Path, data: bytes = ADAPTER) -> Path:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    return path


def test_upload_list_chat_delete(sim_stack: SimStack, tmp_path: Path) -> None:
    user = env(tmp_path, sim_stack.stack.http_url, new_tenant(sim_stack.stack, "cli-user"))
    weights = adapter_file(tmp_path)
    (tmp_path / "adapter_config.json").write_text(CONFIG)

    up = loraplane(user, "adapters", "upload", str(weights), "--name", "cli-v1", "--base-model", "tiny-llama",
                   "--config", str(tmp_path / "adapter_config.json"))  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""  # no progress bar when stderr is not a terminal
    assert up.stdout.startswith("uploaded tiny-llama:cli-v1 (adp_") and "ready, rank 4" in up.stdout
    assert up.stdout.count("\n") == 1

    table = loraplane(user, "adapters", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "BASE", "MODEL", "STATUS", "SIZE", "CREATED"]
    assert table[1].split()[:4] == ["cli-v1", "tiny-llama", "ready", "33.8"] and len(table) == 2
    [listed] = json.loads(loraplane(user, "adapters", "list", "--json").stdout)
    assert listed["model"] == "tiny-llama:cli-v1" and listed["lora_alpha"] == 16.0 and listed["size_bytes"] == 33848

    answer = loraplane(user, "chat", "--model", "tiny-llama:cli-v1", "--max-tokens", "3", "hello")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "tok tok tok"
    seen = sim_stack.state()["requests"][-1]
    assert seen["messages"] == [{"role": "user", "content": "hello"}] and seen["stream"] is True
    assert seen["model"] != "tiny-llama:cli-v1"  # the worker sees the adapter's id, never its name
    piped = loraplane(user, "chat", "--model", "tiny-llama:cli-v1", "--max-tokens", "2", stdin="from stdin\n")
    assert piped.stdout.strip() == "tok tok"
    assert sim_stack.state()["requests"][-1]["messages"] == [{"role": "user", "content": "from stdin\n"}]

    deleted = loraplane(user, "adapters", "delete", "cli-v1")
    assert deleted.returncode == 0 and deleted.stdout == f"deleted cli-v1 ({listed['id']})\n"
    assert loraplane(user, "adapters", "list").stdout == "no adapters\n"
    assert loraplane(user, "adapters", "list", "--json").stdout.strip() == "[]"
    gone = one_error_line(loraplane(user, "chat", "--model", "tiny-llama:cli-v1", "hello"))
    assert "cli-v1" in gone
    assert one_error_line(loraplane(user, "adapters", "delete", "cli-v1")) == "no adapter named 'cli-v1'"


def test_create_from_the_hub_waits_until_ready(control_stack: Stack, hub: HubServer, tmp_path: Path) -> None:
    user = env(tmp_path, control_stack.http_url, new_tenant(control_stack, "cli-hub"))
    repo = Repo()
    sha = repo.commit({"adapter_config.json": CONFIG.encode(), "adapter_model.safetensors": ADAPTER})
    hub.repos["acme/cli-lora"] = repo

    out = loraplane(user, "adapters", "create", "--repo", "acme/cli-lora", "--revision", "main",
                    "--name", "from-hub", "--base-model", "tiny-llama")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.startswith("registered tiny-llama:from-hub (adp_")
        and "): ready, rank 4, 33.8 kB, " in out.stdout
        and f"acme/cli-lora@{sha[:12]}" in out.stdout
    )
    assert out.stderr == ""  # no spinner when stderr is not a terminal
    [adapter] = json.loads(loraplane(user, "adapters", "list", "--json").stdout)
    assert adapter["status"] == "ready" and adapter["source"]["commit_sha"] == sha

    pickles = Repo()
    pickles.commit({"adapter_config.json": CONFIG.encode(), "adapter_model.bin": b"\x80\x04pickle"})
    hub.repos["acme/cli-pickles"] = pickles
    failed = loraplane(user, "adapters", "create", "--repo", "acme/cli-pickles", "--name", "pickled",
                       "--base-model", "tiny-llama")  # fmt: skip
    assert one_error_line(failed).startswith("pickled failed: ") and ".bin" in failed.stderr

    no_wait = loraplane(user, "adapters", "create", "--repo", "acme/cli-lora", "--name", "later",
                        "--base-model", "tiny-llama", "--no-wait", "--json")  # fmt: skip
    assert no_wait.returncode == 0 and json.loads(no_wait.stdout)["status"] == "pending"
    missing = loraplane(user, "adapters", "create", "--repo", "acme/no-such-repo", "--name", "nope",
                        "--base-model", "tiny-llama")  # fmt: skip
    assert one_error_line(missing).startswith("nope failed: ")


def test_expected_failures_are_one_line(control_stack: Stack, tmp_path: Path) -> None:
    url = control_stack.http_url
    key = new_tenant(control_stack, "cli-errors")
    user = env(tmp_path, url, key)
    weights = adapter_file(tmp_path)
    upload = ("adapters", "upload", str(weights), "--base-model", "tiny-llama", "--name")

    assert one_error_line(loraplane(env(tmp_path, url, "lp_nope"), "adapters", "list")) == "Invalid or missing API key."
    assert one_error_line(loraplane(env(tmp_path, url), "adapters", "list")).startswith("no API key: set LORAPLANE_API")
    refused = one_error_line(loraplane(env(tmp_path, f"http://127.0.0.1:{free_port()}", key), "adapters", "list"))
    assert refused.startswith("cannot reach the data plane at http://127.0.0.1:") and "refused" in refused

    assert loraplane(user, *upload, "taken").returncode == 0
    assert "taken" in one_error_line(loraplane(user, *upload, "taken"))  # 409
    assert "gpt-17" in one_error_line(loraplane(user, *upload[:4], "gpt-17", "--name", "x"))  # 404
    (tmp_path / "bad.safetensors").write_bytes(safetensors_bytes(lora_tensors(rank=8, layers=3)))
    bad = loraplane(user, "adapters", "upload", str(tmp_path / "bad.safetensors"), "--name", "bad",
                    "--base-model", "tiny-llama")  # fmt: skip
    assert "layer 2 does not exist" in one_error_line(bad)  # 422
    assert "No such file" in one_error_line(loraplane(user, "adapters", "upload", "nope", "--name", "x",
                                                      "--base-model", "tiny-llama"))  # fmt: skip
    # Refused on its Content-Length before a byte of the file is read: the answer still arrives.
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    assert "larger than" in one_error_line(loraplane(user, "adapters", "upload", str(big), "--name", "big",
                                                     "--base-model", "tiny-llama"))  # fmt: skip
    assert "does not exist" in one_error_line(loraplane(user, "chat", "--model", "tiny-llama:nothing", "hi"))


def test_upload_a_trainers_output_directory(control_stack: Stack, tmp_path: Path) -> None:
    """`adapters upload DIR`: the directory save_pretrained (or a Trainer) wrote; its weights and
    config are sent, nothing else in it is read; --config beats the directory's."""
    user = env(tmp_path, control_stack.http_url, new_tenant(control_stack, "cli-dir"))
    run = tmp_path / "outputs" / "sft"
    run.mkdir(parents=True)
    adapter_file(run)
    (run / "adapter_config.json").write_text(CONFIG)  # r 4, lora_alpha 16
    (run / "training_args.bin").write_bytes(b"PK\x03\x04 torch.save's zip of a pickle")
    (run / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    upload = ("adapters", "upload", "--base-model", "tiny-llama", "--json", "--name")

    out = loraplane(user, *upload, "from-dir", str(run))
    assert out.returncode == 0, out.stderr
    adapter = json.loads(out.stdout)
    assert adapter["status"] == "ready" and adapter["rank"] == 4 and adapter["lora_alpha"] == 16.0  # the dir's config
    (tmp_path / "other.json").write_text(CONFIG.replace('"lora_alpha": 16', '"lora_alpha": 8'))
    out = loraplane(user, *upload, "other-config", str(run), "--config", str(tmp_path / "other.json"))
    assert json.loads(out.stdout)["lora_alpha"] == 8.0
    bare = tmp_path / "bare"  # weights only: alpha is the rank
    bare.mkdir()
    adapter_file(bare)
    assert json.loads(loraplane(user, *upload, "bare", str(bare)).stdout)["lora_alpha"] == 4.0

    pickled = tmp_path / "pickled"  # save_pretrained(..., safe_serialization=False)
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(CONFIG)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refused = one_error_line(loraplane(user, *upload, "pickled", str(pickled)))
    assert refused.startswith(f"{pickled} has adapter_model.bin (a pickle)") and "safe_serialization=True" in refused
    checkpoints = tmp_path / "checkpoints"  # a Trainer's output_dir before its final save
    for step in (500, 1000, 50):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        adapter_file(checkpoints / f"checkpoint-{step}")
    (checkpoints / "runs").mkdir()
    missing = one_error_line(loraplane(user, *upload, "early", str(checkpoints)))
    last = checkpoints / "checkpoint-1000"
    assert missing == f"{checkpoints} has no adapter_model.safetensors; its last checkpoint is {last}"
    gone = one_error_line(loraplane(user, *upload, "x", str(tmp_path / "no-such-dir")))
    assert gone == f"cannot read {tmp_path / 'no-such-dir'}: No such file or directory"
    names = [a["name"] for a in json.loads(loraplane(user, "adapters", "list", "--json").stdout)]
    assert sorted(names) == ["bare", "from-dir", "other-config"]


def test_the_key_and_url_from_the_config_file(control_stack: Stack, tmp_path: Path) -> None:
    key = new_tenant(control_stack, "cli-config")
    config = tmp_path / "config" / "loraplane" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api_key = "{key}"\nurl = "{control_stack.http_url}"\n')
    user = env(tmp_path)

    assert loraplane(user, "adapters", "list").stdout == "no adapters\n"
    # The environment beats the file, and --url beats both.
    assert one_error_line(loraplane({**user, "LORAPLANE_API_KEY": "lp_nope"}, "adapters", "list")).startswith("Invalid")
    elsewhere = {**user, "LORAPLANE_URL": f"http://127.0.0.1:{free_port()}"}
    assert "cannot reach" in one_error_line(loraplane(elsewhere, "adapters", "list"))
    assert loraplane(elsewhere, "adapters", "list", "--url", control_stack.http_url).returncode == 0

    config.write_text("api_key = \n")
    assert one_error_line(loraplane(user, "adapters", "list")).startswith(f"cannot read {config}")
    home = tmp_path / "home"
    (home / ".config" / "loraplane").mkdir(parents=True)
    (home / ".config" / "loraplane" / "config.toml").write_text(
        f'api_key = "{key}"\nurl = "{control_stack.http_url}"\n'
    )
    no_xdg = {k: v for k, v in user.items() if k != "XDG_CONFIG_HOME"} | {"HOME": str(home)}
    assert loraplane(no_xdg, "adapters", "list").stdout == "no adapters\n"


def test_a_terminal_sees_a_progress_bar(control_stack: Stack, tmp_path: Path) -> None:
    user = env(tmp_path, control_stack.http_url, new_tenant(control_stack, "cli-tty"))
    weights = adapter_file(tmp_path, safetensors_bytes(lora_tensors(rank=64)))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.cli", "adapters", "upload", str(weights), "--name", "bar",
         "--base-model", "tiny-llama"],
        env=user, stdout=subprocess.PIPE, stderr=secondary, text=True,
    )  # fmt: skip
    os.close(secondary)
    terminal = b""
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the terminal's other side closed
            break
        if not data:
            break
        terminal += data
    os.close(primary)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and stdout.startswith("uploaded tiny-llama:bar (adp_")
    assert b"uploading adapter_model.safetensors [" in terminal and b"] 100% 525.4 kB/525.4 kB" in terminal
    assert terminal.endswith(b"\r") and not terminal.rsplit(b"\r", 2)[-2].strip()  # and the bar is blanked out


def test_chat_on_a_terminal_is_a_conversation(sim_stack: SimStack, tmp_path: Path) -> None:
    user = env(tmp_path, sim_stack.stack.http_url, new_tenant(sim_stack.stack, "cli-conversation"))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.cli", "chat", "--model", "tiny-llama", "--max-tokens", "2"],
        env=user, stdin=secondary, stdout=secondary, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    try:
        assert b"an empty line or Ctrl-D ends" in read_until(primary, b"> ")
        os.write(primary, b"first\n")
        assert b"tok tok" in read_until(primary, b"> ")
        os.write(primary, b"second\n")
        read_until(primary, b"> ")
        os.write(primary, b"\n")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        os.close(primary)
    assert sim_stack.state()["requests"][-1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "tok tok "},
        {"role": "user", "content": "second"},
    ]


def read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    """What a terminal shows until `marker` (a prompt) ends it."""
    out, deadline = b"", time.monotonic() + timeout
    while not out.endswith(marker):
        assert time.monotonic() < deadline, out
        if select.select([fd], [], [], 0.1)[0]:
            out += os.read(fd, 4096)
    return out


@pytest.mark.parametrize("args", [["adapters", "list", "--help"], ["adapters", "upload", "--help"], ["chat", "--help"]])
def test_help(args: list[str], tmp_path: Path) -> None:
    assert loraplane(env(tmp_path), *args).returncode == 0


async def test_worker_list_shows_each_engine(redis_server: RedisServer, tmp_path: Path) -> None:
    """`loraplane worker list`: healthy, the engine's state when it is not serving, or down; its
    restarts; the engine's last error line below the worker, then what it holds."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    store = Store(client)
    peer = grpc.aio.server()  # the replica holding the streams: alive, so no sweep takes them meanwhile
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), peer)
    owner = f"127.0.0.1:{peer.add_insecure_port('127.0.0.1:0')}"
    await peer.start()
    cp = await start_control_plane(redis_server.url, tmp_path)
    try:
        now = time.time()
        for w in (
            WorkerRecord("w-a", "tiny-llama", "http://a", 4, ["adp_1", "adp_2"], True, now, owner=owner,
                         engine_state="serving"),
            WorkerRecord("w-b", "tiny-llama", "http://b", 4, [], False, now, owner=owner, engine_state="crash_loop",
                         engine_error="torch.OutOfMemoryError: CUDA out of memory", engine_restarts=5),
            WorkerRecord("w-c", "tiny-llama", "http://c", 4, [], False, now, engine_state="serving", engine_restarts=1),
        ):  # fmt: skip
            await store.put_worker(w)
        operator = env(tmp_path, LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{cp.port}", LORAPLANE_OPERATOR_TOKEN=OPERATOR)
        out = await asyncio.to_thread(loraplane, operator, "worker", "list")
    finally:
        await cp.stop(0)
        await peer.stop(None)
        await client.aclose()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "w-a  tiny-llama  healthy  2/4  http://a  restarts 0",
        "    adp_1",
        "    adp_2",
        "w-b  tiny-llama  crash_loop  0/4  http://b  restarts 5",
        "    last error: torch.OutOfMemoryError: CUDA out of memory",
        "w-c  tiny-llama  down  0/4  http://c  restarts 1",
    ]
