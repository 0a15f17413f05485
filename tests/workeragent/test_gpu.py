"""Waiting for an ended engine's GPUs (`workeragent/gpu.py`). No GPU here: NVML is played by a
stand-in module with NVML's calls, whose devices hold processes for a number of queries."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from workeragent import gpu


class FakeNvml(types.ModuleType):
    class NVMLError(Exception):
        pass

    def __init__(self, held: dict[int, int]) -> None:
        super().__init__("pynvml")
        self.held = held  # device index -> queries during which it still lists a process
        self.asked: list[int] = []
        self.shut = False
        self.described: dict[int, tuple[int, bytes]] = {}  # device index -> (total memory, name)

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.held)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:  # noqa: N802
        return types.SimpleNamespace(total=self.described[handle][0])

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802 (older nvidia-ml-py: bytes)
        return self.described[handle][1]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[object]:  # noqa: N802
        self.asked.append(handle)
        if self.held[handle] > 0:
            self.held[handle] -= 1
            return [object()]
        return []


@pytest.fixture
def nvml() -> Iterator[FakeNvml]:
    fake = FakeNvml({0: 0, 1: 0})
    sys.modules["pynvml"] = fake
    yield fake
    del sys.modules["pynvml"]


async def test_waits_until_the_devices_hold_no_process(nvml: FakeNvml) -> None:
    nvml.held = {0: 2, 1: 1}
    assert await gpu.wait_released(10, environ={})
    assert nvml.held == {0: 0, 1: 0} and nvml.shut


async def test_gives_up_after_the_bound(nvml: FakeNvml) -> None:
    nvml.held = {0: 10**6, 1: 0}
    assert not await gpu.wait_released(0.6, environ={})


async def test_only_the_engines_devices_count(nvml: FakeNvml) -> None:
    nvml.held = {0: 10**6, 1: 0}  # device 0 is another engine's
    assert await gpu.wait_released(5, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert set(nvml.asked) == {1}


async def test_a_node_without_nvml_does_not_wait() -> None:
    sys.modules.pop("pynvml", None)
    assert await gpu.wait_released(5, environ={})  # nvidia-ml-py is not installed here


def test_the_first_device_described_is_the_engines_first(nvml: FakeNvml) -> None:
    nvml.described = {0: (24 << 30, b"NVIDIA L4"), 1: (80 << 30, b"NVIDIA H100 80GB HBM3")}
    assert gpu.first_device({}) == (24 << 30, "NVIDIA L4")
    assert gpu.first_device({"CUDA_VISIBLE_DEVICES": "1,0"}) == (80 << 30, "NVIDIA H100 80GB HBM3")
    assert nvml.shut


def test_a_node_without_nvml_describes_no_device() -> None:
    sys.modules.pop("pynvml", None)
    assert gpu.first_device({}) is None
