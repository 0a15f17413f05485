"""Whether the engine's GPUs are free again after an engine ended (NVML, where present).

A killed engine's GPU memory is released by the driver shortly after its last process is gone;
a new engine started before then cannot allocate and fails. So after a reap the agent waits,
up to a bound, until no compute process is left on the GPUs this node's engine uses
(`CUDA_VISIBLE_DEVICES`, else all). NVML reports pids of the host's namespace, which a
container cannot map to its own, so the test is "no compute process at all", not "none of
those pids": the engine is the only GPU user on its GPU set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from types import ModuleType

log = logging.getLogger(__name__)


def _nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]  # nvidia-ml-py: installed with the `vllm` extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:  # a node without a driver (CPU build)
        log.debug("NVML unavailable: %s", err)
        return None
    module: ModuleType = pynvml
    return module


def _devices(nvml: ModuleType, environ: Mapping[str, str]) -> list[int]:
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    indices = [v.strip() for v in visible.split(",") if v.strip()]
    if indices and all(i.isdigit() for i in indices):
        return [int(i) for i in indices]
    return list(range(nvml.nvmlDeviceGetCount()))


def first_device(environ: Mapping[str, str] = os.environ) -> tuple[int, str] | None:
    """The total memory (bytes) and name of the first GPU the engine uses, or None on a node
    without NVML or GPUs. Blocking."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        devices = _devices(nvml, environ)
        if not devices:
            return None
        handle = nvml.nvmlDeviceGetHandleByIndex(devices[0])
        name = nvml.nvmlDeviceGetName(handle)
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total), name.decode() if isinstance(name, bytes) else str(name)
    except nvml.NVMLError as err:
        log.warning("cannot read the GPU's memory and name (NVML: %s)", err)
        return None
    finally:
        nvml.nvmlShutdown()


def holders(nvml: ModuleType, devices: list[int]) -> int:
    """Compute processes on the devices, with the memory they hold."""
    count = 0
    for index in devices:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        count += len(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    return count


async def wait_released(timeout_s: float, environ: Mapping[str, str] = os.environ) -> bool:
    """True once the engine's GPUs hold no compute process (at once on a node without NVML);
    False if some still do after `timeout_s` (logged: the next engine may fail to allocate)."""
    nvml = await asyncio.to_thread(_nvml)
    if nvml is None:
        return True
    try:
        devices = _devices(nvml, environ)
        deadline = time.monotonic() + timeout_s
        while (left := await asyncio.to_thread(holders, nvml, devices)) > 0:
            if time.monotonic() > deadline:
                log.error(
                    "GPU memory still held by %d processes on devices %s %.0fs after the engine ended; "
                    "starting the next engine anyway", left, devices, timeout_s,
                )  # fmt: skip
                return False
            await asyncio.sleep(0.5)
        return True
    except nvml.NVMLError as err:
        log.warning("cannot tell whether the GPUs are free (NVML: %s); starting the next engine", err)
        return True
    finally:
        nvml.nvmlShutdown()
