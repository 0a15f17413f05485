"""A vLLM simulator, a test fake for the tests and benchmarks (not part of the runtime package):
it speaks the parts of vLLM's HTTP API loraplane uses (OpenAI completions and chat, streaming or
not; runtime LoRA load and unload; `/v1/models`, `/health`, `/metrics`), holds at most
`max_loras` adapters, streams tokens at a set rate and takes a load time proportional to the
adapter's size. No model runs, so many simulated workers fit on one machine. From the
repository's root:

    python -m tests.vllmsim --port 8100 --max-loras 8 --tokens-per-s 50 --load-ms-per-mb 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class SimConfig:
    model: str = "tiny-llama"
    max_loras: int = 8
    tokens_per_s: float = 0.0  # 0: every token at once
    load_ms_per_mb: float = 20.0
    load_ms_base: float = 5.0
    api_key: str = ""


@dataclass
class Sim:
    config: SimConfig
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    loading: set[str] = field(default_factory=set)
    running: Counter[str] = field(default_factory=Counter)  # model name -> requests in flight
    loads: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)  # the last requests' bodies, for tests

    def error(self, status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)

    def authorized(self, request: Request) -> bool:
        key = self.config.api_key
        return not key or request.headers.get("authorization") == f"Bearer {key}"


def create_app(config: SimConfig) -> Any:
    sim = Sim(config)

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        data = [{"id": config.model, "object": "model", "owned_by": "vllm", "root": config.model, "parent": None}]
        data += [{"id": n, "object": "model", "owned_by": "vllm", "root": p, "parent": config.model}
                 for n, p in sim.adapters.items()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def load(request: Request) -> Response:
        body = await request.json()
        name, path = body.get("lora_name", ""), body.get("lora_path", "")
        if name in sim.adapters or name in sim.loading:
            return sim.error(400, f"The lora adapter '{name}' has already been loaded.")
        if len(sim.adapters) + len(sim.loading) >= config.max_loras:  # a load under way holds its slot
            return sim.error(400, f"no free LoRA slot (max_loras={config.max_loras})")
        weights = Path(path) / "adapter_model.safetensors"
        size_mb = weights.stat().st_size / 1e6 if weights.exists() else 0.0
        sim.loading.add(name)
        try:
            await asyncio.sleep((config.load_ms_base + config.load_ms_per_mb * size_mb) / 1000)
        finally:
            sim.loading.discard(name)
        sim.adapters[name] = path
        sim.loads += 1
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: Request) -> Response:
        name = (await request.json()).get("lora_name", "")
        if sim.adapters.pop(name, None) is None:
            return sim.error(404, f"The lora adapter '{name}' cannot be found.")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def seen(request: Request) -> Response:
        state = {"requests": sim.seen, "running": sum(sim.running.values()), "loads": sim.loads}
        return JSONResponse({**state, "adapters": sorted(sim.adapters)})

    async def metrics(request: Request) -> Response:
        busy = ",".join(sorted(n for n, c in sim.running.items() if c and n != config.model))
        total = sum(sim.running.values())
        lines = [
            f'vllm:lora_requests_info{{max_lora="{config.max_loras}",running_lora_adapters="{busy}",'
            f'waiting_lora_adapters=""}} {time.time()}',
            f'vllm:num_requests_running{{model_name="{config.model}"}} {float(total)}',
            f'vllm:num_requests_waiting{{model_name="{config.model}"}} 0.0',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    def completion(chat: bool) -> Any:
        async def endpoint(request: Request) -> Response:
            if not sim.authorized(request):
                return JSONResponse({"error": "Unauthorized"}, 401)
            body = await request.json()
            sim.seen = [*sim.seen[-49:], body]
            model = body.get("model")
            if model != config.model and model not in sim.adapters:
                return sim.error(404, f"The model `{model}` does not exist.")
            tokens = int(body.get("max_tokens") or 16)
            rate = float(body.get("sim_tokens_per_s", config.tokens_per_s))  # a benchmark's override
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if body.get("stream"):
                linger = float(body.get("sim_linger_s", 0))  # between `[DONE]` and the body's end
                stream = _stream(sim, rid, model, tokens, chat, rate, linger)
                return StreamingResponse(stream, media_type="text/event-stream")
            sim.running[model] += 1
            try:
                if rate and await _client_left_within(request, tokens / rate):
                    return Response(status_code=499)  # vLLM, too, aborts a request whose client left
            finally:
                sim.running[model] -= 1
            return JSONResponse(_completion_body(chat, model, tokens))

        return endpoint

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        sim.seen = [*sim.seen[-49:], body]
        if body.get("model") != config.model:
            return sim.error(404, f"The model `{body.get('model')}` does not exist.")
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [round(len(str(x)) / 100, 3)] * 8}
                for i, x in enumerate(inputs)]  # fmt: skip
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return JSONResponse({"object": "list", "data": data, "model": config.model, "usage": usage})

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/sim/state", seen),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/v1/chat/completions", completion(chat=True), methods=["POST"]),
        Route("/v1/completions", completion(chat=False), methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    return _FastPath(Starlette(routes=routes), sim)


COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


class _FastPath:
    """Non-streaming completions with no token delay answered without Starlette, so that the
    simulator is cheap enough not to be what a throughput benchmark measures."""

    def __init__(self, app: Starlette, sim: Sim) -> None:
        self.app, self.sim = app, sim

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or path not in ("/v1/chat/completions", "/v1/completions")
        ):
            await self.app(scope, receive, send)
            return
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        body = orjson.loads(raw)
        if body.get("sim_fail") == "midway":  # a worker that dies mid-answer
            headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"id":', "more_body": True})
            raise ConnectionAbortedError("simulated failure")
        sim, chat = self.sim, path == "/v1/chat/completions"
        key = sim.config.api_key
        authorized = not key or (b"authorization", f"Bearer {key}".encode()) in scope["headers"]
        model = body.get("model")
        simple = not body.get("stream") and not body.get("sim_tokens_per_s") and not sim.config.tokens_per_s
        if not (simple and authorized and (model == sim.config.model or model in sim.adapters)):
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        sim.seen = [*sim.seen[-49:], body]
        tokens = int(body.get("max_tokens") or 16)
        out = orjson.dumps(_completion_body(chat, model, tokens))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


def _completion_body(chat: bool, model: str, tokens: int) -> dict[str, Any]:
    text = " ".join(["tok"] * tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    }


async def _client_left_within(request: Request, seconds: float) -> bool:
    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(left())
    try:
        await asyncio.wait_for(asyncio.shield(watcher), seconds)
    except TimeoutError:
        return False
    finally:
        watcher.cancel()
    return True


async def _stream(
    sim: Sim, rid: str, model: str, tokens: int, chat: bool, rate: float, linger: float = 0.0
) -> AsyncIterator[bytes]:
    """Chunks carry `sim_t`, when they were sent, so a benchmark can measure what a proxy adds."""
    sim.running[model] += 1
    try:
        created = int(time.time())
        for i in range(tokens):
            if rate:
                await asyncio.sleep(1 / rate)
            last = i == tokens - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = {"content": "tok "}
            else:
                choice["text"] = "tok "
            obj = "chat.completion.chunk" if chat else "text_completion"
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                     "sim_t": time.time()}  # fmt: skip
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
        await asyncio.sleep(linger)
    finally:
        sim.running[model] -= 1


# What an engine core does to its API server's SIGTERM: nothing (it outlives a killed parent).
ENGINE_CORE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"


def _exit_with(core: subprocess.Popen[bytes]) -> None:
    """As vLLM's API server does when its engine core dies."""
    core.wait()
    print("ERROR 11-30 12:00:00 [core_client.py:564] Engine core proc EngineCore_DP0 died", file=sys.stderr)
    os._exit(1)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--tokens-per-s", type=float, default=0.0)
    p.add_argument("--load-ms-per-mb", type=float, default=20.0)
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", ""))
    # As an agent's engine (LORAPLANE_VLLM_COMMAND): vLLM's name flag; its other flags ignored.
    p.add_argument("--served-model-name", default="")
    p.add_argument("--engine-child", action="store_true", help="run a child ignoring SIGTERM, like an engine core")
    p.add_argument("--fail-if", type=Path, help="fail to start, as an engine that cannot allocate, while this exists")
    a, _ = p.parse_known_args()
    if a.fail_if and a.fail_if.exists():
        print("ERROR 11-30 12:00:00 [core.py:700] EngineCore failed to start.", file=sys.stderr)
        print(f"RuntimeError: {a.fail_if.read_text().strip()}", file=sys.stderr)
        sys.exit(1)
    if a.engine_child:
        core = subprocess.Popen([sys.executable, "-c", ENGINE_CORE])
        threading.Thread(target=_exit_with, args=(core,), daemon=True).start()
    model = a.served_model_name or a.model
    config = SimConfig(model, a.max_loras, a.tokens_per_s, a.load_ms_per_mb, api_key=a.api_key)
    uvicorn.run(create_app(config), host=a.host, port=a.port, log_level="warning", loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
