"""The tenant's `loraplane` verbs, run as a user runs them (a subprocess) against a running stack."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2_grpc

from controlplane.store import Store
from loraplane.stack import Stack
from loraplane.state import usage
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


@pytest.mark.parametrize(
    "args",
    [
        ["adapters", "list", "--help"], ["adapters", "upload", "--help"], ["chat", "--help"], ["usage", "--help"],
        ["tenant", "set-limits", "--help"], ["tenant", "usage", "--help"],
    ],
)  # fmt: skip
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
        assert await asyncio.to_thread(ok, "list") == line + "rpm 600, tpm 400000, concurrency 32 (tier)\n"
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--rpm", "5") == (
            line + "rpm 5, tpm 400000, concurrency 32 (own)\n"
        )
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--tpm", "0", "--concurrency", "2") == (
            line + "rpm 5, tpm unlimited, concurrency 2 (own)\n"
        )
        assert await asyncio.to_thread(ok, "list") == line + "rpm 5, tpm unlimited, concurrency 2 (own)\n"
        assert await asyncio.to_thread(ok, "set-limits", tenant_id, "--tier-default") == (
            line + "rpm 600, tpm 400000, concurrency 32 (tier)\n"
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
