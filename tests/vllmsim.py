"""A vLLM simulator, a test fake for the tests and benchmarks (not part of the runtime package):
it speaks the parts of vLLM's HTTP API loraplane uses (OpenAI completions and chat, streaming or
not; runtime LoRA load and unload; `/v1/models`, `/health`, `/metrics`), holds LoRA adapters as
vLLM's two-level cache does, streams tokens at a set rate and takes a load time proportional to the
adapter's size. No model runs, so many simulated workers fit on one machine. A completion
request with `"sim_vllm": true` is answered in vLLM 0.32's exact shapes (`n` choices, `logprobs`,
`stream_options.include_usage`, the null fields vLLM serializes and its default
`system_fingerprint`), for tests of what clients get of vLLM's answers. As vLLM 0.32 does, always:
`/v1/embeddings` with `"encoding_format": "base64"` answers little-endian float32 in base64;
`/v1/responses` answers the Responses API (its stream as `event:`/`data:` pairs); and a chat
completion with a `response_format` (`json_schema`, `json_object`) or a forced tool (`tool_choice`
a named function, or `"required"`) answers what structured output gives a model that finishes: a
JSON document made from the schema, deterministically, or a call of the tool with such arguments.
`max_completion_tokens` takes precedence over `max_tokens`. A `sim_vllm` stream with
`"sim_fail": "generation_error"` fails after its first token as vLLM 0.32's does when the engine
ends a request with an error (`finish_reason` "error"): an `{"error": ...}` event, then `[DONE]`.
With `--max-num-seqs N`, as vLLM's scheduler does, at most N requests generate at once and the
others wait their turn in arrival order (a waiting stream's first token comes once it runs);
`/metrics` counts them running and waiting.
With `--leak-unloads N` (or after `POST /sim/leak {"unloads": N}`) the next N unloads (-1: every
one) leak their slot, as a known vLLM bug class does: the unload answers success and the adapter
leaves `/v1/models`, but its slot stays taken until the process restarts, so later loads are
refused for lack of a free slot while fewer than `max_loras` adapters are listed.
Adapters, as in vLLM 0.32 (vllm/lora/model_manager.py and worker_manager.py, the LRU managers):
up to `--max-cpu-loras` of them (default: `--max-loras`; fewer is refused) are loaded in host
memory, and of those at most `--max-loras` are active in a LoRA slot. A load activates its
adapter; a request for one that is not active activates it, paying `--swap-in-ms` (counted in
`/metrics` as `vllmsim:lora_swap_ins_total`); activating one with every slot taken deactivates the
least recently used. A load past `--max-cpu-loras` drops the least recently used from host memory
(and its slot), as vLLM's CPU cache does: it stays listed in `/v1/models` (vLLM's API server still
knows it), and a request for it loads it again from its path (the load time, then the swap-in).
Unlike vLLM, a request for an adapter is never held back for want of a slot it could take.
From the repository's root:

    python -m tests.vllmsim --port 8100 --max-loras 8 --tokens-per-s 50 --load-ms-per-mb 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable
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
    max_num_seqs: int = 0  # most requests generating at once (vLLM's --max-num-seqs); 0: no limit
    leak_unloads: int = 0  # the first N unloads leak their slot; -1: every one
    max_cpu_loras: int = 0  # adapters loaded at once, in slots and host memory; 0: max_loras
    swap_in_ms: float = 0.0  # what activating an adapter in host memory takes a request

    def __post_init__(self) -> None:
        if self.max_cpu_loras and self.max_cpu_loras < self.max_loras:  # vLLM's refusal (vllm/config/lora.py)
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}).")

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras or self.max_loras


@dataclass
class Sim:
    config: SimConfig
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    loading: set[str] = field(default_factory=set)
    running: Counter[str] = field(default_factory=Counter)  # model name -> requests generating
    waiting: Counter[str] = field(default_factory=Counter)  # model name -> requests waiting for a slot
    loads: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)  # the last requests' bodies, for tests
    slots_taken: int = 0  # of max_num_seqs, by requests generating or handed a slot
    queue: deque[asyncio.Future[None]] = field(default_factory=deque)  # the waiting requests' turns, in order
    leak_unloads: int = 0  # the next N unloads leak their slot; -1: every one
    leaked: int = 0  # LoRA slots taken by adapters unloaded (and no longer listed)
    # vLLM's two caches, least recently used first: the adapters loaded in host memory (its CPU
    # cache, `max_cpu_loras` of them), and of those the ones active in a LoRA slot (`max_loras`)
    host: OrderedDict[str, None] = field(default_factory=OrderedDict)
    active: OrderedDict[str, None] = field(default_factory=OrderedDict)
    ready_at: dict[str, float] = field(default_factory=dict)  # monotonic time an adapter's swap-in is done
    swap_ins: int = 0  # activations a request waited for
    reloads: int = 0  # adapters loaded again from their path by a request (dropped from host memory)

    def __post_init__(self) -> None:
        self.leak_unloads = self.config.leak_unloads

    def hold(self, name: str) -> None:
        """The adapter in host memory, the most recently used; the least recently used dropped
        (and deactivated) when that would hold more than `max_cpu_loras`."""
        if name in self.host:
            self.host.move_to_end(name)
            return
        if len(self.host) >= self.config.host_capacity:
            oldest, _ = self.host.popitem(last=False)
            self.active.pop(oldest, None)
        self.host[name] = None

    def activate(self, name: str) -> bool:
        """The adapter (in host memory) in a LoRA slot, the most recently used: the least recently
        used deactivated when every slot is active. False when no slot is free even so (leaked)."""
        if name in self.active:
            self.active.move_to_end(name)
            return True
        if len(self.active) >= self.config.max_loras:
            self.active.popitem(last=False)
        if len(self.active) + self.leaked >= self.config.max_loras:
            return False
        self.active[name] = None
        return True

    def ready(self, model: str) -> bool:
        """Whether a request for `model` runs at once (the base model, or an adapter active and
        swapped in); if so, the adapter is the most recently used in both caches."""
        if model == self.config.model:
            return True
        if model not in self.active or self.ready_at.get(model, 0.0) > time.monotonic():
            return False
        self.host.move_to_end(model)
        self.active.move_to_end(model)
        return True

    async def swap_in(self, model: str) -> None:
        """A request's adapter active before it runs: loaded again from its path if it left host
        memory, swapped into a slot if it is not in one (or waited for if its swap-in is under
        way)."""
        if self.ready(model) or model not in self.adapters:
            return
        delay = 0.0
        if model not in self.host:
            delay += _load_s(self.config, self.adapters[model])
            self.reloads += 1
        self.hold(model)
        if model not in self.active:
            if not self.activate(model):
                return  # slots leaked: vLLM's engine would fail the request; this one runs
            self.swap_ins += 1
            delay += self.config.swap_in_ms / 1000
            self.ready_at[model] = time.monotonic() + delay
        else:
            self.active.move_to_end(model)
        wait = self.ready_at.get(model, 0.0) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def generating(self, model: str) -> AsyncIterator[None]:
        """A request generating, once one of `max_num_seqs` slots is free: a request that finds
        none free (or others waiting) waits its turn, first come first served, as vLLM's
        scheduler does; one whose client leaves (its task cancelled) leaves the queue."""
        limit = self.config.max_num_seqs
        if limit and (self.slots_taken >= limit or self.queue):
            turn = asyncio.get_running_loop().create_future()
            self.queue.append(turn)
            self.waiting[model] += 1
            try:
                await turn  # a finishing request hands its slot over
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed a slot, then cancelled: pass it on
                    self._free_slot()
                elif turn in self.queue:
                    self.queue.remove(turn)
                raise
            finally:
                self.waiting[model] -= 1
        elif limit:
            self.slots_taken += 1
        self.running[model] += 1
        try:
            await self.swap_in(model)
            yield
        finally:
            self.running[model] -= 1
            if limit:
                self._free_slot()

    def _free_slot(self) -> None:
        """A slot given up: the first request waiting takes it, else it is free."""
        while self.queue:
            turn = self.queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.slots_taken -= 1

    def slot_free(self) -> bool:
        limit = self.config.max_num_seqs
        return not limit or (self.slots_taken < limit and not self.queue)

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
        sim.loading.add(name)
        try:
            await asyncio.sleep(_load_s(config, path))
        finally:
            sim.loading.discard(name)
        sim.hold(name)  # into host memory, then into a slot, as vLLM's add_adapter does
        if not sim.activate(name):  # every slot taken, by leaked ones
            sim.host.pop(name, None)
            return sim.error(400, f"no free LoRA slot (max_loras={config.max_loras})")
        sim.ready_at.pop(name, None)
        sim.adapters[name] = path
        sim.loads += 1
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: Request) -> Response:
        name = (await request.json()).get("lora_name", "")
        if sim.adapters.pop(name, None) is None:
            return sim.error(404, f"The lora adapter '{name}' cannot be found.")
        sim.host.pop(name, None)
        sim.ready_at.pop(name, None)
        held = name in sim.active  # a slot (one only in host memory has none to leak)
        sim.active.pop(name, None)
        if held and sim.leak_unloads:  # answered as a success, the adapter gone from /v1/models: its slot kept
            sim.leaked += 1
            if sim.leak_unloads > 0:
                sim.leak_unloads -= 1
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def seen(request: Request) -> Response:
        state = {"requests": sim.seen, "running": sum(sim.running.values()), "waiting": sum(sim.waiting.values()),
                 "max_num_seqs": config.max_num_seqs, "loads": sim.loads, "leaked": sim.leaked,
                 "leak_unloads": sim.leak_unloads, "max_loras": config.max_loras,
                 "max_cpu_loras": config.host_capacity, "swap_ins": sim.swap_ins, "reloads": sim.reloads}  # fmt: skip
        # host memory and slots: least recently used first
        return JSONResponse({**state, "adapters": sorted(sim.adapters), "host": list(sim.host),
                             "active": list(sim.active)})  # fmt: skip

    async def leak(request: Request) -> Response:
        """`{"unloads": N}`: the next N unloads leak their slot (-1: every one; 0: none)."""
        unloads = (await request.json()).get("unloads")
        if type(unloads) is not int or unloads < -1:
            return sim.error(400, "'unloads' must be a whole number, -1 or more")
        sim.leak_unloads = unloads
        return JSONResponse({"leak_unloads": sim.leak_unloads, "leaked": sim.leaked})

    async def metrics(request: Request) -> Response:
        def adapters(requests: Counter[str]) -> str:
            return ",".join(sorted(n for n, c in requests.items() if c and n != config.model))

        running, waiting = sum(sim.running.values()), sum(sim.waiting.values())
        lines = [
            f'vllm:lora_requests_info{{max_lora="{config.max_loras}",running_lora_adapters="{adapters(sim.running)}",'
            f'waiting_lora_adapters="{adapters(sim.waiting)}"}} {time.time()}',
            f'vllm:num_requests_running{{model_name="{config.model}"}} {float(running)}',
            f'vllm:num_requests_waiting{{model_name="{config.model}"}} {float(waiting)}',
            f"vllmsim:lora_swap_ins_total {float(sim.swap_ins)}",  # the simulator's own: no vLLM counts these
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def admit(request: Request) -> tuple[dict[str, Any], str] | Response:
        """A generation request's body and model, seen; or the answer refusing it (its key, its model)."""
        if not sim.authorized(request):
            return JSONResponse({"error": "Unauthorized"}, 401)
        body = await request.json()
        sim.seen = [*sim.seen[-49:], body]
        model = body.get("model")
        if model != config.model and model not in sim.adapters:
            return sim.error(404, f"The model `{model}` does not exist.")
        return body, model

    def completion(chat: bool) -> Any:
        async def endpoint(request: Request) -> Response:
            admitted = await admit(request)
            if isinstance(admitted, Response):
                return admitted
            body, model = admitted
            tokens = _max_tokens(body)
            rate = float(body.get("sim_tokens_per_s", config.tokens_per_s))  # a benchmark's override
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if body.get("stream"):
                linger = float(body.get("sim_linger_s", 0))  # between `[DONE]` and the body's end
                stream = _stream(sim, rid, model, tokens, chat, rate, linger, body)
                return StreamingResponse(stream, media_type="text/event-stream")
            if await _client_left_during(request, _generate(sim, model, tokens / rate if rate else 0.0)):
                return Response(status_code=499)  # vLLM, too, aborts a request whose client left
            return JSONResponse(_completion_body(chat, model, tokens, body))

        return endpoint

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        sim.seen = [*sim.seen[-49:], body]
        if body.get("model") != config.model:
            return sim.error(404, f"The model `{body.get('model')}` does not exist.")
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        as_base64 = body.get("encoding_format") == "base64"  # little-endian float32, as vLLM encodes it
        data = [{"index": i, "object": "embedding", "embedding": _embedding(str(x), as_base64)}
                for i, x in enumerate(inputs)]  # fmt: skip
        usage: dict[str, int | None] = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        if body.get("sim_vllm") is True:  # vLLM 0.32's EmbeddingResponse, model_dump()ed
            usage |= {"completion_tokens": 0, "prompt_tokens_details": None, "completion_tokens_details": None}
            return JSONResponse({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                 "model": config.model, "data": data, "usage": usage})  # fmt: skip
        return JSONResponse({"object": "list", "data": data, "model": config.model, "usage": usage})

    async def responses(request: Request) -> Response:
        admitted = await admit(request)
        if isinstance(admitted, Response):
            return admitted
        body, model = admitted
        mot = body.get("max_output_tokens")
        tokens = mot if type(mot) is int and mot > 0 else 16
        rate = float(body.get("sim_tokens_per_s", config.tokens_per_s))
        if body.get("stream"):
            return StreamingResponse(_responses_stream(sim, model, tokens, rate, body), media_type="text/event-stream")
        if await _client_left_during(request, _generate(sim, model, tokens / rate if rate else 0.0)):
            return Response(status_code=499)
        text = " ".join(["tok"] * tokens)
        item = _response_message(f"msg_{uuid.uuid4().hex[:16]}", text, "completed")
        rid, created = f"resp_{uuid.uuid4().hex[:16]}", int(time.time())
        return JSONResponse(_response_object(rid, created, model, tokens, body, [item], "incomplete"))

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/sim/state", seen),
        Route("/sim/leak", leak, methods=["POST"]),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/v1/chat/completions", completion(chat=True), methods=["POST"]),
        Route("/v1/completions", completion(chat=False), methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
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
        simple = simple and sim.slot_free()  # an answer taking no time takes no slot from anyone
        if not (simple and authorized and (model in sim.adapters or model == sim.config.model) and sim.ready(model)):
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
        tokens = _max_tokens(body)
        out = orjson.dumps(_completion_body(chat, model, tokens, body))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


def _completion_body(chat: bool, model: str, tokens: int, body: dict[str, Any] | None = None) -> dict[str, Any]:
    out = _output(chat, tokens, body or {})
    if body is not None and body.get("sim_vllm") is True:
        return _vllm_body(chat, model, out, body)
    tokens = out.tokens
    choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": out.text}
        if out.tool_calls:
            choice["message"]["tool_calls"] = out.tool_calls
    else:
        choice["text"] = out.text
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
    }


# vLLM 0.32's answers, field for field (vllm/entrypoints/openai/{chat_completion,completion}/
# protocol.py and serving.py): whole answers are `model_dump()`ed, None fields included; stream
# chunks `model_dump_json(exclude_unset=True)`, the usage chunk with `exclude_none=True`.
VLLM_FINGERPRINT = "vllm-0.32.0-5d41402a"  # `--fingerprint-mode full` (the default): version and config hash
# What vLLM 0.32's chat and completion stream generators send when the engine ends a request with
# an error: GenerationError, `create_streaming_error_response` (json.dumps of ErrorResponse).
VLLM_STREAM_ERROR = (b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
                     b'"param": null, "code": 500}}\n\n')  # fmt: skip
PROMPT_TOKENS = 8
TOKEN = {"token": "tok", "logprob": -0.25, "bytes": [116, 111, 107]}


def _vllm_options(chat: bool, body: dict[str, Any]) -> tuple[int, int | None, bool]:
    """`n`, how many top logprobs (None: no logprobs) and `include_usage`, where they are what
    vLLM accepts (else ignored: the simulator answers what vLLM would refuse)."""
    n = body.get("n")
    n = n if type(n) is int and 1 <= n <= 16 else 1
    top: int | None = None
    if chat and body.get("logprobs") is True:
        t = body.get("top_logprobs")
        top = t if type(t) is int and 0 <= t <= 20 else 0
    elif not chat and type(lp := body.get("logprobs")) is int and 0 <= lp <= 5:
        top = lp
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return n, top, include_usage


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
            "total_tokens": PROMPT_TOKENS + completion_tokens}  # fmt: skip


def _continuous_usage(body: dict[str, Any]) -> bool:
    """`stream_options.continuous_usage_stats` (with `include_usage`): usage in every event."""
    options = body.get("stream_options")
    return (
        isinstance(options, dict)
        and options.get("include_usage") is True
        and options.get("continuous_usage_stats") is True
    )


def _chat_logprobs(tokens: int, top: int) -> dict[str, Any]:
    alternatives = [{**TOKEN, "token": f"t{k}", "logprob": -1.0 - k, "bytes": list(f"t{k}".encode())}
                    for k in range(top)]  # fmt: skip
    return {"content": [{**TOKEN, "top_logprobs": alternatives} for _ in range(tokens)]}


def _completion_logprobs(tokens: int, top: int, offset: int = 0) -> dict[str, Any]:
    return {
        "text_offset": [offset + 4 * i for i in range(tokens)],
        "token_logprobs": [TOKEN["logprob"]] * tokens,
        "tokens": [TOKEN["token"]] * tokens,
        "top_logprobs": [{TOKEN["token"]: TOKEN["logprob"], **{f"t{k}": -1.0 - k for k in range(top - 1)}}
                         for _ in range(tokens)],
    }  # fmt: skip


def _vllm_body(chat: bool, model: str, out: Output, body: dict[str, Any]) -> dict[str, Any]:
    n, top, _ = _vllm_options(chat, body)
    tokens, text = out.tokens, out.text
    choices: list[dict[str, Any]] = []
    for i in range(n):
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                       "audio": None, "function_call": None}  # fmt: skip
            if out.tool_calls:  # ChatMessage drops an empty `tool_calls`
                message["tool_calls"] = out.tool_calls
            message["reasoning"] = None
            logprobs = None if top is None else _chat_logprobs(tokens, top)
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": out.finish_reason,
                            "stop_reason": None, "token_ids": None, "routed_experts": None})  # fmt: skip
        else:
            logprobs = None if top is None else _completion_logprobs(tokens, top)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                            "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                            "prompt_token_ids": None, "routed_experts": None})  # fmt: skip
    usage = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + n * tokens,
             "completion_tokens": n * tokens, "prompt_tokens_details": None,
             "completion_tokens_details": None}  # fmt: skip
    answer: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": VLLM_FINGERPRINT,
        "usage": usage,
    }
    if chat:
        answer |= {"prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None}
    return answer | {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def _vllm_chunks(rid: str, model: str, tokens: int, chat: bool, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """A vLLM stream's events, token by token: the events each token brings (one per choice),
    the role events first (chat), the usage event last (when asked for)."""
    n, top, include_usage = _vllm_options(chat, body)
    continuous = _continuous_usage(body)
    out = _output(chat, tokens, body)
    tokens = out.tokens
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model}  # fmt: skip
    steps: list[list[dict[str, Any]]] = []
    if chat:
        steps.append([{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}],
                       "prompt_token_ids": None, "prompt_text": None} for i in range(n)])  # fmt: skip
        if continuous:
            for chunk in steps[0]:
                chunk["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 0, "total_tokens": PROMPT_TOKENS}
    for t in range(tokens):
        last = t == tokens - 1
        step = []
        for i in range(n):
            if chat:
                logprobs = None if top is None else _chat_logprobs(1, top)
                choice: dict[str, Any] = {"index": i, "delta": out.deltas[t], "logprobs": logprobs,
                                          "finish_reason": out.finish_reason if last else None}  # fmt: skip
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = None
            else:
                logprobs = None if top is None else _completion_logprobs(1, top, 4 * t)
                choice = {"index": i, "text": out.deltas[t]["content"], "logprobs": logprobs,
                          "finish_reason": out.finish_reason if last else None,
                          "stop_reason": None, "prompt_token_ids": None, "token_ids": None}  # fmt: skip
            chunk = {**head, "choices": [choice]}
            if continuous:  # as vLLM counts it: this choice's tokens so far
                chunk["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": t + 1,
                                  "total_tokens": PROMPT_TOKENS + t + 1}  # fmt: skip
            if last and not include_usage:
                chunk["system_fingerprint"] = VLLM_FINGERPRINT
            step.append(chunk)
        steps.append(step)
    if include_usage:
        usage = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + n * tokens,
                 "completion_tokens": n * tokens}  # fmt: skip
        steps[-1].append({**head, "choices": [], "usage": usage, "system_fingerprint": VLLM_FINGERPRINT})
    return steps


def _load_s(config: SimConfig, path: str) -> float:
    """What loading the adapter at `path` takes: the base time, and the time per MB of its weights."""
    weights = Path(path) / "adapter_model.safetensors"
    size_mb = weights.stat().st_size / 1e6 if weights.exists() else 0.0
    return (config.load_ms_base + config.load_ms_per_mb * size_mb) / 1000


def _max_tokens(body: dict[str, Any]) -> int:
    """As vLLM reads them: `max_completion_tokens` (what LangChain sends) over `max_tokens`."""
    mct = body.get("max_completion_tokens")
    return mct if type(mct) is int else int(body.get("max_tokens") or 16)


def _embedding(text: str, as_base64: bool) -> list[float] | str:
    vector = [round(len(text) / 100, 3)] * 8
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector


@dataclass
class Output:
    """What the model generates for a request: its text, the stream's deltas (one per token),
    its tool calls and why it stopped."""

    text: str
    deltas: list[dict[str, Any]]
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.deltas)


def _output(chat: bool, tokens: int, body: dict[str, Any]) -> Output:
    """`tokens` "tok"s, stopped by the length; or, for a chat completion asking for structured
    output or forcing a tool call, a JSON document valid for the schema, generated as a model does
    that finishes (stopped by the length only if the document takes more than `tokens`)."""
    fmt, tool = body.get("response_format"), _forced_tool(body) if chat else None
    if tool is not None:
        name, schema = tool
        arguments = json.dumps(_instance(schema, schema), ensure_ascii=False)
        pieces, finish = _pieces(arguments, tokens)
        forced = "required" if body.get("tool_choice") == "required" else "named"
        call = {"id": f"chatcmpl-tool-{uuid.uuid4().hex[:16]}", "type": "function",
                "function": {"name": name, "arguments": "".join(pieces)}}  # fmt: skip
        deltas: list[dict[str, Any]] = [
            {
                "content": None,
                "tool_calls": [{"id": call["id"], "type": "function", "index": 0, "function": {"name": name}}],
            }
        ]  # the name, then the arguments token by token (as vLLM streams a named tool's call)
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces[1:]]
        deltas[0]["tool_calls"][0]["function"]["arguments"] = pieces[0]
        # vLLM: "tool_calls" for a required call that finished, the sampler's reason for a named one
        return Output("", deltas, "tool_calls" if forced == "required" and finish == "stop" else finish, [call])
    if chat and isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        spec = fmt.get("json_schema")
        wanted = spec.get("schema") if isinstance(spec, dict) else None
        document = json.dumps(_instance(wanted, wanted)) if isinstance(wanted, dict) else "{}"
        pieces, finish = _pieces(document, tokens)
        return Output("".join(pieces), [{"content": p} for p in pieces], finish)
    return Output(" ".join(["tok"] * tokens), [{"content": "tok "} for _ in range(tokens)], "length")


def _forced_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The tool a request forces a call of (`tool_choice` a named function, or "required": the
    first tool) and its parameters' schema."""
    tools = [
        t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        tools = [t for t in tools if t.get("name") == name]
    elif choice != "required":
        return None
    if not tools:
        return None
    parameters = tools[0].get("parameters")
    return str(tools[0].get("name")), parameters if isinstance(parameters, dict) else {"type": "object"}


def _pieces(text: str, tokens: int) -> tuple[list[str], str]:
    """`text` as a model's tokens (4 characters each), cut at `tokens`, and the finish reason."""
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)] or [""]
    return (pieces, "stop") if len(pieces) <= tokens else (pieces[:tokens], "length")


def _instance(schema: Any, root: Any, depth: int = 0) -> Any:
    """A JSON value valid for `schema`, deterministically: `const`, else the first of `enum`, of
    `anyOf`/`oneOf`/`allOf` and of a list of types; an object's required properties; `$ref`s into
    the root's `$defs`/`definitions`; arrays of `minItems` items."""
    if not isinstance(schema, dict) or depth > 32:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _instance(target, root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _instance(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        required = [k for k in schema.get("required") or [] if isinstance(k, str)]
        return {k: _instance(properties.get(k, {}), root, depth + 1) for k in required}
    if kind == "array":
        count = schema.get("minItems")
        return [_instance(schema.get("items", {}), root, depth + 1) for _ in range(count if type(count) is int else 0)]
    if kind == "string":
        low = schema.get("minLength")
        return "tok" * max(1, -(-low // 3) if type(low) is int else 1)
    if kind == "integer":
        low = schema.get("minimum")
        return max(0, int(low)) if isinstance(low, (int, float)) else 0
    if kind == "number":
        low = schema.get("minimum")
        return max(0.0, float(low)) if isinstance(low, (int, float)) else 0.0
    if kind == "boolean":
        return True
    return None


# The Responses API (vllm/entrypoints/openai/responses/protocol.py's ResponsesResponse.from_request):
# an answer stopped by the length is "incomplete", `incomplete_details` saying why.
def _response_object(
    rid: str, created: int, model: str, tokens: int, body: dict[str, Any], output: list[dict[str, Any]], status: str
) -> dict[str, Any]:
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools and choice in ("auto", "none"):
        choice = "none"
    include = body.get("include") or []
    top = body.get("top_logprobs", 0) if "message.output_text.logprobs" in include else None
    usage = None
    if status != "in_progress":
        usage = {"input_tokens": PROMPT_TOKENS,
                 "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "input_tokens_per_turn": [],
                                          "cached_tokens_per_turn": []},
                 "output_tokens": tokens,
                 "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [],
                                           "tool_output_tokens_per_turn": []},
                 "total_tokens": PROMPT_TOKENS + tokens}  # fmt: skip
    return {
        "id": rid,
        "created_at": created,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": _number(body.get("temperature"), 1.0),
        "tool_choice": choice,
        "tools": tools,
        "top_p": _number(body.get("top_p"), 1.0),
        "background": bool(body.get("background")),
        "max_output_tokens": tokens,
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": body.get("previous_response_id"),
        "prompt": body.get("prompt"),
        "reasoning": body.get("reasoning"),
        "service_tier": body.get("service_tier") or "auto",
        "status": status,
        "text": body.get("text"),
        "top_logprobs": top,
        "truncation": body.get("truncation") or "disabled",
        "usage": usage,
        "user": body.get("user"),
        "presence_penalty": _number(body.get("presence_penalty"), 0.0),
        "frequency_penalty": _number(body.get("frequency_penalty"), 0.0),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "input_messages": None,
        "output_messages": None,
    }


def _number(value: Any, default: float) -> float:
    """A sampling parameter as vLLM's SamplingParams holds it: a float, its default if unset."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _response_message(mid: str, text: str | None, status: str) -> dict[str, Any]:
    """An output message item; `text` None: one that has no content part yet."""
    content = [] if text is None else [_text_part(text, None)]
    return {"id": mid, "content": content, "role": "assistant", "status": status, "type": "message", "phase": None}


def _text_part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


async def _responses_stream(
    sim: Sim, model: str, tokens: int, rate: float, body: dict[str, Any]
) -> AsyncIterator[bytes]:
    """vLLM's Responses stream: `event: <type>` and `data: <event>` per event, numbered in order."""
    rid, mid, created = f"resp_{uuid.uuid4().hex[:16]}", f"msg_{uuid.uuid4().hex[:16]}", int(time.time())
    sequence = 0

    def event(kind: str, fields: dict[str, Any]) -> bytes:
        nonlocal sequence
        data = {**fields, "sequence_number": sequence, "type": kind}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    text = " ".join(["tok"] * tokens)
    head = {"item_id": mid, "output_index": 0}
    async with sim.generating(model):
        started = _response_object(rid, created, model, tokens, body, [], "in_progress")
        yield event("response.created", {"response": started})
        yield event("response.in_progress", {"response": started})
        yield event(
            "response.output_item.added", {"item": _response_message(mid, None, "in_progress"), "output_index": 0}
        )
        yield event("response.content_part.added", {"content_index": 0, **head, "part": _text_part("", [])})
        for t in range(tokens):
            if rate:
                await asyncio.sleep(1 / rate)
            delta = "tok" if t == 0 else " tok"
            yield event("response.output_text.delta", {"content_index": 0, "delta": delta, **head, "logprobs": []})
        yield event("response.output_text.done", {"content_index": 0, **head, "logprobs": [], "text": text})
        yield event("response.content_part.done", {"content_index": 0, **head, "part": _text_part(text, None)})
        item = _response_message(mid, text, "completed")
        yield event("response.output_item.done", {"item": item, "output_index": 0})
        done = _response_object(rid, created, model, tokens, body, [item], "incomplete")
        yield event("response.completed", {"response": done})


async def _generate(sim: Sim, model: str, seconds: float) -> None:
    """A request answered whole: its turn for a slot, then `seconds` of generating."""
    async with sim.generating(model):
        if seconds:
            await asyncio.sleep(seconds)


async def _client_left_during(request: Request, work: Awaitable[None]) -> bool:
    """Whether the client left before `work` (waiting and generating) was done; if so, it is
    stopped."""

    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher, task = asyncio.ensure_future(left()), asyncio.ensure_future(work)
    try:
        await asyncio.wait((watcher, task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # nothing, if it is done
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        return True
    task.result()  # what the work raised, if anything
    return False


async def _stream(
    sim: Sim,
    rid: str,
    model: str,
    tokens: int,
    chat: bool,
    rate: float,
    linger: float = 0.0,
    body: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """Chunks carry `sim_t`, when they were sent, so a benchmark can measure what a proxy adds."""
    async with sim.generating(model):
        if body is not None and body.get("sim_vllm") is True:
            steps = _vllm_chunks(rid, model, tokens, chat, body)
            fail = body.get("sim_fail") == "generation_error"
            for k, step in enumerate(steps[: 2 if chat else 1] if fail else steps):  # failing: the first token's
                if rate and k:
                    await asyncio.sleep(1 / rate)
                for chunk in step:
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
            if fail:
                yield VLLM_STREAM_ERROR
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(linger)
            return
        created = int(time.time())
        out = _output(chat, tokens, body or {})
        _, _, include_usage = _vllm_options(chat, body or {})
        continuous = _continuous_usage(body or {})
        for i, delta in enumerate(out.deltas):
            if rate:
                await asyncio.sleep(1 / rate)
            last = i == out.tokens - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason if last else None}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta["content"]
            obj = "chat.completion.chunk" if chat else "text_completion"
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                     "sim_t": time.time()}  # fmt: skip
            if continuous:
                chunk["usage"] = _usage(i + 1)
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        if include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                     "usage": _usage(out.tokens)}  # fmt: skip
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"
        await asyncio.sleep(linger)


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
    p.add_argument("--max-num-seqs", type=int, default=0, help="most requests generating at once (0: no limit)")
    p.add_argument("--leak-unloads", type=int, default=0, help="the first N unloads leak their slot (-1: every one)")
    p.add_argument("--max-cpu-loras", type=int, help="adapters loaded at once, in slots and host memory (default: "
                   "--max-loras)")  # fmt: skip
    p.add_argument("--swap-in-ms", type=float, default=0.0, help="what a request waits for its adapter's swap-in")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", ""))
    # As an agent's engine (LORAPLANE_VLLM_COMMAND): vLLM's name flag; its other flags ignored.
    p.add_argument("--served-model-name", default="")
    p.add_argument("--engine-child", action="store_true", help="run a child ignoring SIGTERM, like an engine core")
    p.add_argument("--fail-if", type=Path, help="fail to start, as an engine that cannot allocate, while this exists")
    a, _ = p.parse_known_args()
    if a.max_cpu_loras is not None and a.max_cpu_loras < a.max_loras:  # vLLM's refusal (vllm/config/lora.py)
        p.error(f"max_cpu_loras ({a.max_cpu_loras}) must be >= max_loras ({a.max_loras}).")
    if a.fail_if and a.fail_if.exists():
        print("ERROR 11-30 12:00:00 [core.py:700] EngineCore failed to start.", file=sys.stderr)
        print(f"RuntimeError: {a.fail_if.read_text().strip()}", file=sys.stderr)
        sys.exit(1)
    if a.engine_child:
        core = subprocess.Popen([sys.executable, "-c", ENGINE_CORE])
        threading.Thread(target=_exit_with, args=(core,), daemon=True).start()
    model = a.served_model_name or a.model
    config = SimConfig(
        model, a.max_loras, a.tokens_per_s, a.load_ms_per_mb, api_key=a.api_key, max_num_seqs=a.max_num_seqs,
        leak_unloads=a.leak_unloads, max_cpu_loras=a.max_cpu_loras or 0, swap_in_ms=a.swap_in_ms,
    )  # fmt: skip
    uvicorn.run(create_app(config), host=a.host, port=a.port, log_level="warning", loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
