"""vLLM as the agent sees it: the command that starts it and its HTTP API."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from workeragent import vllmguard

log = logging.getLogger(__name__)
IDLE_AFTER_S = 0.5
# The families `parse_activity` reads: parsing only their samples keeps a heartbeat cheap (a whole
# vLLM page is ~100 kB) and an odd line elsewhere on the page harmless.
ACTIVITY_FAMILIES = ("vllm:lora_requests_info", "vllm:num_requests_running", "vllm:num_requests_waiting")
# vLLM's token counters: they move while its engine steps.
TOKEN_FAMILIES = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
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

    async def healthy(self, timeout_s: float = 3.0) -> bool:
        try:
            async with self._session.get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def tokens(self, timeout_s: float = 3.0) -> float | None:
        """Prompt and generated tokens vLLM has processed since it started (its progress), or
        None when it does not say."""
        try:
            async with self._session.get(
                f"{self.base_url}/metrics", headers=self._headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as r:
                text = await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return None
        return parse_tokens(text)

    async def probe(self, model: str, timeout_s: float) -> bool:
        """Whether the engine completes a one-token request (any answer below 500 counts: the
        engine answered)."""
        body = {"model": model, "prompt": "ping", "max_tokens": 1}
        try:
            async with self._session.post(
                f"{self.base_url}/v1/completions", json=body, headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as r:  # fmt: skip
                await r.read()
                return r.status < 500
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

    async def max_loras(self) -> int | None:
        """vLLM's LoRA slots (`--max-loras`) as its /metrics page says, or None when it does not."""
        async with self._session.get(f"{self.base_url}/metrics", headers=self._headers, timeout=self._timeout) as r:
            if r.status != 200:
                raise VllmError(f"GET /metrics answered {r.status}")
            return parse_max_loras(await r.text())

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


def parse_tokens(text: str) -> float | None:
    """The sum of vLLM's token counters on a /metrics page, or None when it has none."""
    wanted = "".join(line + "\n" for line in text.splitlines() if line.startswith(TOKEN_FAMILIES))
    if not wanted:
        return None
    try:
        return sum(s.value for f in text_string_to_metric_families(wanted) for s in f.samples)
    except ValueError:
        return None


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


def parse_max_loras(text: str) -> int | None:
    """The `max_lora` label of vLLM's `vllm:lora_requests_info` (the only word vLLM 0.32's
    /metrics has on LoRA slots), or None when the page has no such sample (vLLM adds the first
    once its engine has stepped)."""
    wanted = "".join(line + "\n" for line in text.splitlines() if line.startswith("vllm:lora_requests_info"))
    try:
        for family in text_string_to_metric_families(wanted):
            for sample in family.samples:
                value = sample.labels.get("max_lora", "")
                if value.isdigit():
                    return int(value)
    except ValueError:
        return None
    return None


def engine_command(
    command: Sequence[str],
    model_path: str,
    served_name: str,
    host: str,
    port: int,
    max_loras: int,
    max_rank: int,
    extra_args: Sequence[str],
    tool_parser: str = "",
    chat_template: str = "",
    max_cpu_loras: int = 0,
) -> list[str]:
    """vLLM's OpenAI server for one model with runtime LoRA updating on, its LoRA loading and
    every other non-serving path reserved to the holder of the agent's secret (`vllmguard`).
    `command` runs the server (default: this Python's `-m vllm.entrypoints.openai.api_server`).
    `max_cpu_loras` above `max_loras`: that many adapters loaded, those not in one of the
    `max_loras` slots waiting in host memory (vLLM's CPU LoRA cache); else vLLM's default (as
    many as the slots)."""
    return [
        *(command or (sys.executable, "-m", "vllm.entrypoints.openai.api_server")),
        "--model", model_path,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--enable-lora",
        "--max-loras", str(max_loras),
        *(("--max-cpu-loras", str(max_cpu_loras)) if max_cpu_loras > max_loras else ()),
        "--max-lora-rank", str(max_rank),
        "--disable-uvicorn-access-log",
        "--middleware", f"{vllmguard.__name__}.{vllmguard.AgentOnly.__name__}",
        *(("--enable-auto-tool-choice", "--tool-call-parser", tool_parser) if tool_parser else ()),
        *(("--chat-template", chat_template) if chat_template else ()),
        # Structured output (`response_format`, forced tool calls) in compact JSON: a model is never
        # left free to pad it with whitespace until its tokens run out.
        "--structured-outputs-config.backend", "xgrammar",
        "--structured-outputs-config.disable_any_whitespace", "true",
        # Usage as billed: the prompt's tokens served from the prefix cache (`cached_tokens`).
        "--enable-prompt-tokens-details",
        *extra_args,
    ]  # fmt: skip


def engine_env(environ: Mapping[str, str], api_key: str, agent_secret: str) -> dict[str, str]:
    env = dict(environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    for name in MEASURING:  # an agent under coverage measurement does not slow its engine down
        env.pop(name, None)
    env[vllmguard.SECRET_ENV] = agent_secret
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env
