"""`tool_choice` "required" or a named function, forced through structured output.

A model calls a tool in its own format, which the worker's tool-call parser reads (`auto`); a
forced call cannot wait for the model to choose it. So the data plane asks the worker for an
answer that *is* a call — JSON constrained to {"name": one of the tools, "arguments": that
tool's parameters} (`response_format` json_schema; the tools stay in the prompt) — and hands it
to the client as OpenAI's `tool_calls`, whole or as a stream, whatever the model's size.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from dataplane.errors import BadRequest

NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Forced:
    stream: bool  # the client asked for a stream: the answer is sent as one
    include_usage: bool


def force(body: dict[str, Any]) -> Forced | None:
    """Rewrites a request whose tool choice is forced (in place); None when it is not."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not tools or choice in (None, "auto", "none"):
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array of tools", param="tools")
    functions: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"tools[{i}] must be a function with a name", param=f"tools[{i}]")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}]")
        functions[function["name"]] = parameters
    if choice == "required":
        names = list(functions)
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise BadRequest(f"tool_choice names {str(name)[:64]!r}, which is not among the tools", param="tool_choice")
        names = [name]
    else:
        raise BadRequest("tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice")
    calls = [
        {"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]},
         "required": ["name", "arguments"], "additionalProperties": False}
        for n in names
    ]  # fmt: skip
    body["tool_choice"] = "none"
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": {"anyOf": calls}}}
    options = body.pop("stream_options", None)
    forced = Forced(bool(body.pop("stream", False)), isinstance(options, dict) and bool(options.get("include_usage")))
    return forced


def answer(forced: Forced, raw: bytes) -> tuple[bytes, bytes]:
    """The worker's (whole, reshaped) answer as tool calls: (content type, body)."""
    obj = orjson.loads(raw)
    for choice in obj.get("choices") or ():
        _as_call(choice)
    if not forced.stream:
        return b"application/json", orjson.dumps(obj)
    return b"text/event-stream; charset=utf-8", _as_stream(obj, forced.include_usage)


def _as_call(choice: dict[str, Any]) -> None:
    """A choice whose content is a whole call, as a tool call (one cut short stays as it is)."""
    message = choice.get("message") or {}
    if choice.get("finish_reason") != "stop":
        return
    try:
        call = orjson.loads(message.get("content") or "")
    except orjson.JSONDecodeError:
        return
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return
    message["content"] = None
    message["tool_calls"] = [
        {"id": f"call_{secrets.token_hex(12)}", "type": "function",
         "function": {"name": call["name"], "arguments": orjson.dumps(call.get("arguments", {})).decode()}}
    ]  # fmt: skip
    choice["finish_reason"] = "tool_calls"


def _as_stream(obj: dict[str, Any], include_usage: bool) -> bytes:
    """A whole answer as the chunks of a stream: role, content or tool call, finish, usage."""
    head = {"id": obj.get("id"), "object": "chat.completion.chunk", "created": obj.get("created", int(time.time())),
            "model": obj.get("model")}  # fmt: skip
    chunks = []
    for choice in obj.get("choices") or ():
        i, message = choice.get("index", 0), choice.get("message") or {}
        chunks.append(
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )
        delta: dict[str, Any] = {"content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta = {"tool_calls": [{"index": n, **call} for n, call in enumerate(message["tool_calls"])]}
        chunks.append({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
        chunks.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")})
    events = [head | {"choices": [c]} for c in chunks]
    if include_usage and obj.get("usage"):
        events.append(head | {"choices": [], "usage": obj["usage"]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
