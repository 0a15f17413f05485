"""vLLM as the agent sees it: a supervised process and its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from workeragent import vllmguard

log = logging.getLogger(__name__)
IDLE_AFTER_S = 0.5
# The families `parse_activity` reads: parsing only their samples keeps a heartbeat cheap (a whole
# vLLM page is ~100 kB) and an odd line elsewhere on the page harmless.
ACTIVITY_FAMILIES = ("vllm:lora_requests_info", "vllm:num_requests_running", "vllm:num_requests_waiting")
# Variables that start coverage.py in every Python process that inherits them (see scripts/test).
MEASURING = ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")


class VllmError(Exception):
    pass


class VllmClient:
    """The few vLLM calls the agent makes: health, resident adapters, load, unload."""

    def __init__(self, base_url: str, api_key: str, agent_secret: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if agent_secret:
            self._headers[vllmguard.SECRET_HEADER] = agent_secret
        self._timeout = aiohttp.ClientTimeout(total=30)
        self.running = self.waiting = 0.0  # requests, as the last `activity()` measured

    async def healthy(self) -> bool:
        try:
            async with self._session.get(f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def resident(self) -> list[str]:
        """Names of the LoRA adapters vLLM reports holding (models with a parent)."""
        async with self._session.get(f"{self.base_url}/v1/models", headers=self._headers, timeout=self._timeout) as r:
            if r.status != 200:
                raise VllmError(f"GET /v1/models answered {r.status}")
            body = await r.json()
        return sorted(m["id"] for m in body.get("data", []) if m.get("parent"))

    async def busy(self) -> set[str]:
        return (await self.activity())[0]

    async def activity(self) -> tuple[set[str], int]:
        """Adapters with requests running or waiting, from vLLM's `vllm:lora_requests_info`, and
        how many requests are running or waiting in all (`vllm:num_requests_running|waiting`).

        vLLM adds a lora_requests_info sample (valued at its time) per engine step; the newest
        is the current state while the engine steps (every few ms when busy); an engine silent
        for IDLE_AFTER_S runs nothing.
        """
        async with self._session.get(f"{self.base_url}/metrics", headers=self._headers, timeout=self._timeout) as r:
            if r.status != 200:
                raise VllmError(f"GET /metrics answered {r.status}")
            text = await r.text()
        try:
            newest, names, running, waiting = parse_activity(text)
        except ValueError as err:
            raise VllmError(f"GET /metrics answered an unreadable page: {err}") from None
        self.running, self.waiting = running, waiting  # for the agent's metrics
        in_flight = running + waiting
        if time.time() - newest > IDLE_AFTER_S:
            return set(), int(in_flight)
        return {n for n in names.split(",") if n}, int(in_flight)

    async def load(self, name: str, path: str) -> None:
        await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload(self, name: str) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": name})

    async def _post(self, path: str, body: dict[str, str]) -> None:
        async with self._session.post(
            f"{self.base_url}{path}", json=body, headers=self._headers, timeout=self._timeout
        ) as r:
            if r.status != 200:
                text = (await r.text())[:500]
                raise VllmError(f"{path} answered {r.status}: {text}")


def parse_activity(text: str) -> tuple[float, str, float, float]:
    """From vLLM's /metrics page: the newest `lora_requests_info` sample's time and its adapters
    (running and waiting, comma-separated), and the requests running and waiting (summed over
    engines)."""
    newest, names, running, waiting = 0.0, "", 0.0, 0.0
    wanted = "".join(line + "\n" for line in text.splitlines() if line.startswith(ACTIVITY_FAMILIES))
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if sample.name == "vllm:lora_requests_info" and sample.value > newest:
                newest = sample.value
                names = ",".join(sample.labels.get(k, "") for k in ("running_lora_adapters", "waiting_lora_adapters"))
            elif sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
    return newest, names, running, waiting


class VllmProcess:
    """Starts vLLM's OpenAI server for one model with runtime LoRA updating on, its LoRA
    loading and every other non-serving path reserved to the holder of `agent_secret`."""

    def __init__(
        self,
        model_path: str,
        served_name: str,
        host: str,
        port: int,
        api_key: str,
        agent_secret: str,
        max_loras: int,
        max_rank: int,
        extra_args: Sequence[str],
        pidfile: Path,
    ) -> None:
        self.args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_path,
            "--served-model-name", served_name,
            "--host", host,
            "--port", str(port),
            "--enable-lora",
            "--max-loras", str(max_loras),
            "--max-lora-rank", str(max_rank),
            "--disable-uvicorn-access-log",
            "--middleware", f"{vllmguard.__name__}.{vllmguard.AgentOnly.__name__}",
            *extra_args,
        ]  # fmt: skip
        self._api_key = api_key
        self._agent_secret = agent_secret
        self._pidfile = pidfile
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None

    async def start(self) -> None:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        for name in MEASURING:  # an agent under coverage measurement does not slow its engine down
            env.pop(name, None)
        env[vllmguard.SECRET_ENV] = self._agent_secret
        if self._api_key:
            env["VLLM_API_KEY"] = self._api_key
        log.info("starting vLLM: %s", " ".join(self.args))
        self.proc = await asyncio.create_subprocess_exec(*self.args, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self._pidfile.write_text(str(self.pid))

    def adopt(self) -> bool:
        """Take over the vLLM a previous agent started (the agent died, vLLM did not)."""
        try:
            pid = int(self._pidfile.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        self.proc, self.pid = None, pid
        log.info("adopted the running vLLM (pid %d)", pid)
        return True

    async def wait(self) -> int | None:
        """Until vLLM exits: its exit code, or None for an adopted process (not our child)."""
        if self.proc is not None:
            return await self.proc.wait()
        while self.pid is not None and _alive(self.pid):
            await asyncio.sleep(0.5)
        return None

    async def stop(self, grace: float = 10.0) -> None:
        if self.pid is None or not _alive(self.pid):
            return
        # vLLM runs its engine in child processes: signal the whole process group.
        _killpg(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            _killpg(self.pid, signal.SIGKILL)
            await self.wait()
        self._pidfile.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
