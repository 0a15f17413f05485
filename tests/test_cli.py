"""The tenant's `loraplane` verbs, run as a user runs them (a subprocess) against a running stack."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.store import Store
from loraplane.controlplane.v1 import tenant_pb2
from loraplane.stack import Stack, StackConfig, WorkerSpec
from loraplane.state import keys, usage
from loraplane.state.records import WorkerRecord
from tests.conftest import SimStack, new_tenant, running_stack, upload
from tests.controlplane.test_service import OPERATOR, start_control_plane
from tests.hubserver import HubServer, Repo
from tests.support import ROOT, RedisServer, free_port, lora_tensors, safetensors_bytes, wait_for

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


@pytest.mark.parametrize(
    "args",
    [
        ["adapters", "list", "--help"], ["adapters", "upload", "--help"], ["chat", "--help"], ["usage", "--help"],
        ["tenant", "set-limits", "--help"], ["tenant", "usage", "--help"], ["tenant", "set-capacity", "--help"],
        ["adapters", "pin", "--help"], ["adapters", "unpin", "--help"], ["worker", "list", "--help"],
        ["worker", "assign", "--help"], ["worker", "unassign", "--help"], ["up", "--help"],
    ],
)  # fmt: skip
def test_help(args: list[str], tmp_path: Path) -> None:
    assert loraplane(env(tmp_path), *args).returncode == 0


async def test_worker_list_shows_each_engine(redis_server: RedisServer, tmp_path: Path) -> None:
    """`loraplane worker list`: healthy, the engine's state when it is not serving, or down;
    draining; its pool (a dedicated tenant's) or shared; its restarts; the engine's last error
    line below the worker, then what it holds, pinned adapters marked. `--json`: the same, one
    object per worker."""
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
                         engine_state="serving", max_concurrency=256),
            WorkerRecord("w-b", "tiny-llama", "http://b", 4, [], False, now, owner=owner, engine_state="crash_loop",
                         engine_error="torch.OutOfMemoryError: CUDA out of memory", engine_restarts=5),
            WorkerRecord("w-c", "tiny-llama", "http://c", 4, [], False, now, engine_state="serving", engine_restarts=1),
        ):  # fmt: skip
            await store.put_worker(w)
        await client.hset(keys.POOLS, "w-a", "ten_pool")
        await client.hset(keys.PINNED, "adp_2", "ten_pool")
        await client.sadd(keys.DRAINING, "w-b")
        operator = env(tmp_path, LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{cp.port}", LORAPLANE_OPERATOR_TOKEN=OPERATOR)
        out = await asyncio.to_thread(loraplane, operator, "worker", "list")
        as_json = await asyncio.to_thread(loraplane, operator, "worker", "list", "--json")
    finally:
        await cp.stop(0)
        await peer.stop(None)
        await client.aclose()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "w-a  tiny-llama  healthy  pool ten_pool  2/4  http://a  restarts 0",
        "    adp_1",
        "    adp_2 (pinned)",
        "w-b  tiny-llama  crash_loop  draining  shared  0/4  http://b  restarts 5",
        "    last error: torch.OutOfMemoryError: CUDA out of memory",
        "w-c  tiny-llama  down  shared  0/4  http://c  restarts 1",
    ]
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [
        {"worker_id": "w-a", "base_model": "tiny-llama", "endpoint": "http://a", "state": "healthy",
         "pool_tenant_id": "ten_pool", "draining": False, "max_adapters": 4, "max_concurrency": 256,
         "gpu_slots": 0, "resident_adapter_ids": ["adp_1", "adp_2"], "pinned_adapter_ids": ["adp_2"],
         "cached_adapter_ids": [], "engine_state": "serving",
         "engine_restarts": 0, "engine_last_error": ""},
        {"worker_id": "w-b", "base_model": "tiny-llama", "endpoint": "http://b", "state": "crash_loop",
         "pool_tenant_id": "", "draining": True, "max_adapters": 4, "max_concurrency": 0, "gpu_slots": 0,
         "resident_adapter_ids": [], "pinned_adapter_ids": [], "cached_adapter_ids": [], "engine_state": "crash_loop",
         "engine_restarts": 5,
         "engine_last_error": "torch.OutOfMemoryError: CUDA out of memory"},
        {"worker_id": "w-c", "base_model": "tiny-llama", "endpoint": "http://c", "state": "down",
         "pool_tenant_id": "", "draining": False, "max_adapters": 4, "max_concurrency": 0, "gpu_slots": 0,
         "resident_adapter_ids": [], "pinned_adapter_ids": [], "cached_adapter_ids": [], "engine_state": "serving",
         "engine_restarts": 1,
         "engine_last_error": ""},
    ]  # fmt: skip


async def test_operator_sets_a_tenants_limits(redis_server: RedisServer, tmp_path: Path) -> None:
    """`tenant set-limits`: the flags given change, the others keep the limits in force;
    `--tier-default` hands the tenant back to its tier's; `tenant list` shows them and whose."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    await client.aclose()
    cp = await start_control_plane(redis_server.url, tmp_path)
    operator = env(tmp_path, LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{cp.port}", LORAPLANE_OPERATOR_TOKEN=OPERATOR)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return loraplane(operator, "tenant", *args)

    def ok(*args: str) -> str:
        out = run(*args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        tenant_id = json.loads(await asyncio.to_thread(ok, "create", "limited", "--json"))["tenant"]["id"]
        line = f"{tenant_id}  limited  shared  "
        capacity = "  pinned 0/0 (tier), spill-over off, shared workers\n"
        assert await asyncio.to_thread(ok, "list") == line + "rpm 600, tpm 400000, concurrency 32 (tier)" + capacity
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--rpm", "5") == (
            line + "rpm 5, tpm 400000, concurrency 32 (own)" + capacity
        )
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--tpm", "0", "--concurrency", "2") == (
            line + "rpm 5, tpm unlimited, concurrency 2 (own)" + capacity
        )
        assert await asyncio.to_thread(ok, "list") == line + "rpm 5, tpm unlimited, concurrency 2 (own)" + capacity
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--tier-default") == (
            line + "rpm 600, tpm 400000, concurrency 32 (tier)" + capacity
        )

        both = await asyncio.to_thread(run, "set-limits", tenant_id, "--tier-default", "--rpm", "1")
        assert one_error_line(both) == "--tier-default takes no --rpm, --tpm or --concurrency"
        neither = await asyncio.to_thread(run, "set-limits", tenant_id)
        assert one_error_line(neither) == "give --rpm, --tpm or --concurrency, or --tier-default"
        nobody = await asyncio.to_thread(run, "set-limits", "ten_nobody", "--rpm", "1")
        assert one_error_line(nobody) == "tenant 'ten_nobody' does not exist"
        nobody = await asyncio.to_thread(run, "set-limits", "ten_nobody", "--tier-default")
        assert "ten_nobody" in one_error_line(nobody)  # the control plane's NOT_FOUND
        negative = await asyncio.to_thread(run, "set-limits", tenant_id, "--rpm", "-1")
        assert negative.returncode == 2 and "'-1' is not 0 (unlimited) or a positive whole number" in negative.stderr
    finally:
        await cp.stop(0)


async def test_operator_sets_a_tenants_capacity(redis_server: RedisServer, tmp_path: Path) -> None:
    """`tenant set-capacity`: the pinned-slot allowance (its own, or `--tier-default-pins` its
    tier's) and spill-over; a flag not given leaves that part as it is; `tenant list` shows them."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    await client.aclose()
    cp = await start_control_plane(redis_server.url, tmp_path)
    operator = env(tmp_path, LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{cp.port}", LORAPLANE_OPERATOR_TOKEN=OPERATOR)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return loraplane(operator, "tenant", *args)

    def ok(*args: str) -> str:
        out = run(*args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        tenant_id = json.loads(await asyncio.to_thread(ok, "create", "big", "--tier", "reserved", "--json"))
        tenant_id = tenant_id["tenant"]["id"]
        line = f"{tenant_id}  big  reserved  rpm 3000, tpm 2000000, concurrency 128 (tier)  "
        assert await asyncio.to_thread(ok, "list") == line + "pinned 0/2 (tier), spill-over off, shared workers\n"
        assert await asyncio.to_thread(ok, "set-capacity", tenant_id, "--pinned-slots", "5") == (
            line + "pinned 0/5 (own), spill-over off, shared workers\n"
        )
        assert await asyncio.to_thread(ok, "set-capacity", tenant_id, "--spill-over") == (
            line + "pinned 0/5 (own), spill-over on, shared workers\n"
        )
        assert await asyncio.to_thread(ok, "set-capacity", tenant_id, "--pinned-slots", "0") == (
            line + "pinned 0/0 (own), spill-over on, shared workers\n"
        )
        assert await asyncio.to_thread(ok, "set-capacity", tenant_id, "--tier-default-pins", "--no-spill-over") == (
            line + "pinned 0/2 (tier), spill-over off, shared workers\n"
        )
        assert await asyncio.to_thread(ok, "list") == line + "pinned 0/2 (tier), spill-over off, shared workers\n"

        both = await asyncio.to_thread(run, "set-capacity", tenant_id, "--tier-default-pins", "--pinned-slots", "1")
        assert one_error_line(both) == "--tier-default-pins takes no --pinned-slots"
        neither = await asyncio.to_thread(run, "set-capacity", tenant_id)
        assert one_error_line(neither) == (
            "give --pinned-slots or --tier-default-pins, and/or --spill-over or --no-spill-over"
        )
        nobody = await asyncio.to_thread(run, "set-capacity", "ten_nobody", "--spill-over")
        assert "ten_nobody" in one_error_line(nobody)  # the control plane's NOT_FOUND
        negative = await asyncio.to_thread(run, "set-capacity", tenant_id, "--pinned-slots", "-1")
        assert negative.returncode == 2 and "'-1' is not 0 (unlimited) or a positive whole number" in negative.stderr
    finally:
        await cp.stop(0)


class UsagePages:
    """A stand-in for the data plane's `GET /v1/usage/completions` on a free loopback port: the
    first canned page, or the one after the page whose `next_page` the query names; it keeps the
    queries it was sent."""

    def __init__(self, pages: list[dict[str, object]]) -> None:
        self.pages = pages
        self.queries: list[dict[str, list[str]]] = []
        self.auth: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                owner.queries.append(urllib.parse.parse_qs(url.query))
                owner.auth.append(self.headers.get("Authorization", ""))
                if url.path != "/v1/usage/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                token = owner.queries[-1].get("page", [None])[0]  # the page after the one naming it
                after = next((n + 1 for n, page in enumerate(owner.pages) if token and page["next_page"] == token), 0)
                body = json.dumps(owner.pages[min(after, len(owner.pages) - 1)]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> UsagePages:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def bucket(start: int, *results: dict[str, object], width: int = 86400) -> dict[str, object]:
    return {"object": "bucket", "start_time": start, "end_time": start + width, "results": list(results)}


def result(model: str, input_tokens: int, cached: int, output: int, requests: int) -> dict[str, object]:
    return {
        "object": "organization.usage.completions.result", "input_tokens": input_tokens, "output_tokens": output,
        "input_cached_tokens": cached, "input_audio_tokens": 0, "output_audio_tokens": 0,
        "num_model_requests": requests, "project_id": None, "user_id": None, "api_key_id": None, "model": model,
        "batch": None,
    }  # fmt: skip


DAY = 1_764_460_800  # 2025-11-30T00:00:00Z
USAGE_PAGES: list[dict[str, object]] = [
    {
        "object": "page",
        "data": [bucket(DAY, result("tiny-llama", 120, 0, 30, 3), result("tiny-llama:v1", 2000, 1500, 400, 10))],
        "has_more": True,
        "next_page": "page_2",
    },
    {
        "object": "page",
        "data": [bucket(DAY + 86400), bucket(DAY + 2 * 86400, result("tiny-llama", 7, 0, 1, 1))],
        "has_more": False,
        "next_page": None,
    },  # fmt: skip
]


def test_tenant_usage_reads_every_page(tmp_path: Path) -> None:
    with UsagePages(USAGE_PAGES) as api:
        user = env(tmp_path, api.url, "lp_tenant")
        out = loraplane(user, "usage", "--start", "2025-11-30", "--end", str(DAY + 3 * 86400))
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "START (UTC)  MODEL          INPUT  CACHED  OUTPUT  REQUESTS",
            "2025-11-30   tiny-llama     120    0       30      3",
            "2025-11-30   tiny-llama:v1  2000   1500    400     10",
            "2025-12-02   tiny-llama     7      0       1       1",
            "total                       2127   1500    431     14",
        ]
        first = {"start_time": [str(DAY)], "end_time": [str(DAY + 3 * 86400)], "bucket_width": ["1d"],
                 "group_by": ["model"]}  # fmt: skip
        assert api.queries == [first, first | {"page": ["page_2"]}]
        assert api.auth == ["Bearer lp_tenant"] * 2

        merged = json.loads(loraplane(user, "usage", "--json", "--start", "1764460800", "--end", "1764720000").stdout)
        assert merged == {
            "object": "page",
            "data": [*USAGE_PAGES[0]["data"], *USAGE_PAGES[1]["data"]],  # type: ignore[misc]
            "has_more": False,
            "next_page": None,
        }


def test_tenant_usage_defaults_and_mistakes(tmp_path: Path) -> None:
    empty: dict[str, object] = {"object": "page", "data": [], "has_more": False, "next_page": None}
    with UsagePages([empty]) as api:
        user = env(tmp_path, api.url, "lp_tenant")
        before = int(time.time())
        assert loraplane(user, "usage").stdout == "no usage\n"
        assert loraplane(user, "usage", "--bucket-width", "1h", "--end", "2025-12-01T06:00:00+01:00").returncode == 0
        daily, hourly = api.queries
        end = int(daily["end_time"][0])
        assert before <= end <= time.time() and int(daily["start_time"][0]) == end - 7 * 86400  # 1d: the last week
        assert hourly["end_time"] == [str(DAY + 86400 + 5 * 3600)] and hourly["bucket_width"] == ["1h"]
        assert hourly["start_time"] == [str(DAY + 5 * 3600)]  # 1h and 1m: the last day

        backwards = loraplane(user, "usage", "--start", "2025-12-02", "--end", "2025-12-01")
        assert one_error_line(backwards) == "--start must be before --end"
        for bad in (["--start", "yesterday"], ["--bucket-width", "1w"]):
            out = loraplane(user, "usage", *bad)
            assert out.returncode == 2 and "usage: loraplane usage" in out.stderr
        assert len(api.queries) == 2  # none of these was sent

    endless = {"object": "page", "data": [], "has_more": True, "next_page": "same"}
    with UsagePages([endless]) as api:
        stuck = one_error_line(loraplane(env(tmp_path, api.url, "lp_tenant"), "usage"))
        assert stuck == "the usage answer says there is more but gives no next page" and len(api.queries) == 2


async def test_operator_reads_a_tenants_usage(redis_server: RedisServer, tmp_path: Path) -> None:
    """`tenant usage`: the tenant's rows of ExportUsage, every page, as a table or JSON."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    cp = await start_control_plane(redis_server.url, tmp_path)
    operator = env(tmp_path, LORAPLANE_CONTROLPLANE_ADDR=f"127.0.0.1:{cp.port}", LORAPLANE_OPERATOR_TOKEN=OPERATOR)
    try:
        created = [await asyncio.to_thread(loraplane, operator, "tenant", "create", name, "--json")
                   for name in ("metered", "other")]  # fmt: skip
        ids = [json.loads(out.stdout)["tenant"]["id"] for out in created]
        cells = {
            usage.Cell(ids[0], DAY + 60, "completions", "tiny-llama", ""): usage.Counts(10, 5, 0, 1),
            usage.Cell(ids[0], DAY + 3600, "completions", "tiny-llama:v1", "adp_1"): usage.Counts(300, 40, 100, 3),
            usage.Cell(ids[0], DAY + 86400, "embeddings", "tiny-embed", ""): usage.Counts(50, 0, 0, 5),
            usage.Cell(ids[1], DAY + 60, "completions", "tiny-llama", ""): usage.Counts(1, 1, 0, 1),
        }
        assert await usage.record(client, "cli", cells, usage.Retention(0, 0, 0))
        span = ("--start", "2025-11-30", "--end", "2025-12-02")
        table = await asyncio.to_thread(loraplane, operator, "tenant", "usage", ids[0], *span)
        hourly = await asyncio.to_thread(loraplane, operator, "tenant", "usage", ids[0], *span, "--bucket-width", "1h",
                                         "--json")  # fmt: skip
        nobody = await asyncio.to_thread(loraplane, operator, "tenant", "usage", "ten_nobody")
    finally:
        await cp.stop(0)
        await client.aclose()
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "START (UTC)  MODEL          ADAPTER  INPUT  CACHED  OUTPUT  REQUESTS",
        "2025-11-30   tiny-llama     -        10     0       5       1",
        "2025-11-30   tiny-llama:v1  adp_1    300    100     40      3",
        "2025-12-01   tiny-embed     -        50     0       0       5",
        "total                                360    100     45      9",
    ]
    assert json.loads(hourly.stdout) == [
        {"tenant_id": ids[0], "kind": "completions", "start_time": DAY, "end_time": DAY + 3600, "model": "tiny-llama",
         "adapter_id": "", "input_tokens": 10, "output_tokens": 5, "input_cached_tokens": 0, "num_model_requests": 1},
        {"tenant_id": ids[0], "kind": "completions", "start_time": DAY + 3600, "end_time": DAY + 7200,
         "model": "tiny-llama:v1", "adapter_id": "adp_1", "input_tokens": 300, "output_tokens": 40,
         "input_cached_tokens": 100, "num_model_requests": 3},
        {"tenant_id": ids[0], "kind": "embeddings", "start_time": DAY + 86400, "end_time": DAY + 90000,
         "model": "tiny-embed", "adapter_id": "", "input_tokens": 50, "output_tokens": 0, "input_cached_tokens": 0,
         "num_model_requests": 5},
    ]  # fmt: skip
    assert "ten_nobody" in one_error_line(nobody)


# --- pools and pins on a running stack --------------------------------------------------------

SHARED_WORKER, POOL_WORKER = "embedded-tiny-llama", "embedded-tiny-llama-2"
ENGINE_CONCURRENCY = 4


@pytest.fixture(scope="module")
def pool_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack with two tiny-llama workers, each agent running a vLLM simulator as its engine
    (which it gives `--max-num-seqs 4`, from LORAPLANE_MAX_CONCURRENCY)."""
    env = (
        ("LORAPLANE_VLLM_COMMAND", f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'}"),
        ("LORAPLANE_MAX_CONCURRENCY", str(ENGINE_CONCURRENCY)),
    )
    yield from running_stack(
        tmp_path_factory.mktemp("pool-stack"), with_worker=True, env=env, extra_workers=(WorkerSpec(free_port()),)
    )


def operator_env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    return env(
        tmp_path, LORAPLANE_CONTROLPLANE_ADDR=stack.grpc_addr, LORAPLANE_OPERATOR_TOKEN=stack.secrets["operator_token"]
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def workers(stack: Stack, tmp_path: Path) -> dict[str, dict[str, Any]]:
    listed = json.loads(ok(loraplane(operator_env(stack, tmp_path), "worker", "list", "--json")))
    return {w["worker_id"]: w for w in listed}


def uploaded(stack: Stack, key: str, *names: str) -> dict[str, str]:
    """Adapters uploaded for the tenant of `key`: name -> id."""
    ids = {}
    for name in names:
        r = upload(stack, key, name, ADAPTER, CONFIG.encode())
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    return ids


def test_worker_list_json_on_a_running_stack(pool_stack: Stack, tmp_path: Path) -> None:
    """Both workers, healthy and shared, with the concurrency their agents registered."""
    listed = workers(pool_stack, tmp_path)
    assert sorted(listed) == [SHARED_WORKER, POOL_WORKER]
    for w in listed.values():
        assert (w["state"], w["pool_tenant_id"], w["draining"]) == ("healthy", "", False)
        assert (w["max_adapters"], w["max_concurrency"], w["engine_state"]) == (8, ENGINE_CONCURRENCY, "serving")


def test_a_tenant_pins_adapters_within_its_allowance(pool_stack: Stack, tmp_path: Path) -> None:
    """`adapters pin NAME`: loaded and kept, counted against the tier's 2 pinned slots (the third
    is the data plane's 429, one error line); `adapters list` and `worker list` mark them;
    `adapters unpin NAME` frees the slot."""
    key = pool_stack.operator().create_tenant("pinner", tenant_pb2.TIER_RESERVED).api_key
    user = env(tmp_path, pool_stack.http_url, key)
    ids = uploaded(pool_stack, key, "p1", "p2", "p3")

    assert ok(loraplane(user, "adapters", "pin", "p1")) == f"pinned p1 ({ids['p1']}): 1 of 2 pinned slots used\n"
    assert ok(loraplane(user, "adapters", "pin", ids["p2"])) == f"pinned p2 ({ids['p2']}): 2 of 2 pinned slots used\n"
    assert ok(loraplane(user, "adapters", "pin", "p2")) == f"pinned p2 ({ids['p2']}): 2 of 2 pinned slots used\n"
    refused = one_error_line(loraplane(user, "adapters", "pin", "p3"))
    assert "at most 2" in refused and "unpin one first" in refused
    assert one_error_line(loraplane(user, "adapters", "pin", "p9")) == "no adapter named 'p9'"

    rows = [line.split()[:4] for line in ok(loraplane(user, "adapters", "list")).splitlines()[1:]]
    assert rows == [["p1", "tiny-llama", "ready", "(pinned)"], ["p2", "tiny-llama", "ready", "(pinned)"],
                    ["p3", "tiny-llama", "ready", "33.8"]]  # fmt: skip
    assert [a["pinned"] for a in json.loads(ok(loraplane(user, "adapters", "list", "--json")))] == [True, True, False]
    pinned = {a for w in workers(pool_stack, tmp_path).values() for a in w["pinned_adapter_ids"]}
    assert pinned == {ids["p1"], ids["p2"]}  # loaded, and marked where they are
    text = ok(loraplane(operator_env(pool_stack, tmp_path), "worker", "list"))
    assert f"    {ids['p1']} (pinned)\n" in text and f"    {ids['p2']} (pinned)\n" in text

    assert ok(loraplane(user, "adapters", "unpin", "p1")) == f"unpinned p1 ({ids['p1']})\n"
    assert ok(loraplane(user, "adapters", "pin", "p3")) == f"pinned p3 ({ids['p3']}): 2 of 2 pinned slots used\n"
    assert [a["pinned"] for a in json.loads(ok(loraplane(user, "adapters", "list", "--json")))] == [False, True, True]
    line = next(
        t for t in ok(loraplane(operator_env(pool_stack, tmp_path), "tenant", "list")).splitlines() if "pinner" in t
    )
    assert line.endswith("  pinned 2/2 (tier), spill-over off, shared workers")
    shared = env(tmp_path, pool_stack.http_url, new_tenant(pool_stack, "no-pins"))
    uploaded(pool_stack, shared.get("LORAPLANE_API_KEY", ""), "s1")
    assert "at most 0" in one_error_line(loraplane(shared, "adapters", "pin", "s1"))  # the shared tier has none


def test_an_operator_gives_a_dedicated_tenant_a_worker(pool_stack: Stack, tmp_path: Path) -> None:
    """`worker assign`: only a dedicated tenant (else the control plane's refusal, one line); the
    worker shows its pool, the tenant its worker; `worker unassign` makes it shared again."""
    op = operator_env(pool_stack, tmp_path)
    dedicated = pool_stack.operator().create_tenant("pooled", tenant_pb2.TIER_DEDICATED).tenant.id
    shared = pool_stack.operator().create_tenant("not-pooled", tenant_pb2.TIER_SHARED).tenant.id
    refused = one_error_line(loraplane(op, "worker", "assign", POOL_WORKER, shared))
    assert "shared tier" in refused and "dedicated" in refused
    assert "no-such-worker" in one_error_line(loraplane(op, "worker", "assign", "no-such-worker", dedicated))
    try:
        assigned = ok(loraplane(op, "worker", "assign", POOL_WORKER, dedicated))
        assert assigned.startswith(f"{POOL_WORKER} is in the pool of {dedicated}; evicted ")
        assert workers(pool_stack, tmp_path)[POOL_WORKER]["pool_tenant_id"] == dedicated
        lines = ok(loraplane(op, "worker", "list")).splitlines()
        # evicted adapters' bytes stay on the node: listed as cached once a heartbeat says so
        listed = re.compile(rf"{POOL_WORKER}  tiny-llama  healthy  pool {dedicated}  0/8(, \d+ cached)?  ")
        assert any(listed.match(t) for t in lines), lines
        line = next(t for t in ok(loraplane(op, "tenant", "list")).splitlines() if t.startswith(dedicated))
        assert line.endswith(f"  pinned 0/2 (tier), spill-over off, pool {POOL_WORKER}")
    finally:
        left = ok(loraplane(op, "worker", "unassign", POOL_WORKER))
    assert left == f"{POOL_WORKER} is shared (left the pool of {dedicated})\n"
    assert ok(loraplane(op, "worker", "unassign", POOL_WORKER)) == f"{POOL_WORKER} is shared (was in no pool)\n"
    assert workers(pool_stack, tmp_path)[POOL_WORKER]["pool_tenant_id"] == ""


def test_assigning_a_worker_evicts_the_other_tenants_adapters(pool_stack: Stack, tmp_path: Path) -> None:
    """What `worker assign` evicted: the other tenants' adapters the worker held, named in its
    answer, and gone from the worker."""
    op = operator_env(pool_stack, tmp_path)
    stranger = pool_stack.operator().create_tenant("stranger").api_key
    [adapter_id] = uploaded(pool_stack, stranger, "elsewhere").values()
    pool_stack.operator().force_load(adapter_id, POOL_WORKER)
    wait_for(lambda: adapter_id in workers(pool_stack, tmp_path)[POOL_WORKER]["resident_adapter_ids"], 30)
    dedicated = pool_stack.operator().create_tenant("evictor", tenant_pb2.TIER_DEDICATED).tenant.id
    try:
        assigned = ok(loraplane(op, "worker", "assign", POOL_WORKER, dedicated))
        wait_for(lambda: adapter_id not in workers(pool_stack, tmp_path)[POOL_WORKER]["resident_adapter_ids"], 30)
    finally:
        ok(loraplane(op, "worker", "unassign", POOL_WORKER))
    assert assigned == f"{POOL_WORKER} is in the pool of {dedicated}; evicted {adapter_id}\n"


# --- loraplane up ------------------------------------------------------------------------------


def test_up_runs_one_worker_unless_told(tmp_path: Path) -> None:
    from loraplane.cli import up_config

    plain = up_config(tmp_path)
    assert plain == StackConfig(data_dir=tmp_path, log_dir=tmp_path / "logs", metrics_port=9090)  # as it always was
    three = up_config(tmp_path, workers=3)
    assert [w.vllm_port for w in three.extra_workers] == [8101, 8102] and three.vllm_port == 8100
    assert replace(three, extra_workers=()) == plain


def test_up_lists_its_workers(tmp_path: Path) -> None:
    """`loraplane up --workers 3`: three workers, each with its own id, vLLM port and cache."""
    from loraplane.cli import banner, up_config

    stack = Stack(up_config(tmp_path, workers=3))
    stack.secrets = dict.fromkeys(("operator_token", "agent_token", "worker_api_key", "peer_token"), "s" * 32)
    envs = [stack.env(), *(stack.worker_env(i, spec) for i, spec in enumerate(stack.config.extra_workers, start=2))]
    assert len({e["LORAPLANE_CACHE_DIR"] for e in envs}) == 3
    assert stack.workers() == [
        ("embedded-tiny-llama", "http://127.0.0.1:8100"),
        ("embedded-tiny-llama-2", "http://127.0.0.1:8101"),
        ("embedded-tiny-llama-3", "http://127.0.0.1:8102"),
    ]
    lines = banner(stack).splitlines()
    at = lines.index("  workers                   embedded-tiny-llama (vLLM http://127.0.0.1:8100)")
    assert lines[at + 1 : at + 3] == [
        " " * 28 + "embedded-tiny-llama-2 (vLLM http://127.0.0.1:8101)",
        " " * 28 + "embedded-tiny-llama-3 (vLLM http://127.0.0.1:8102)",
    ]
    one = banner(Stack(up_config(tmp_path), secrets=stack.secrets)).splitlines()
    assert "  worker                    embedded-tiny-llama (vLLM http://127.0.0.1:8100)" in one


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_up_refuses_a_worker_count_that_is_not_one_or_more(bad: str, tmp_path: Path) -> None:
    out = loraplane(env(tmp_path), "up", "--workers", bad)
    assert out.returncode == 2 and f"{bad!r} is not a positive whole number" in out.stderr
