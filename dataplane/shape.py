"""A worker's answer in OpenAI's shape: what the official spec's schemas say, `model` what the
client sent, and nothing that names the engine (its fields, its `system_fingerprint`).

vLLM's answers are close to OpenAI's but not the same: it sends `null` where the spec wants an
object or no field at all (`annotations`, `function_call`, the usage details), leaves out
`refusal` and `top_logprobs` the spec requires, and adds fields of its own (`stop_reason`,
`token_ids`, `prompt_logprobs`, `kv_transfer_params`, a `system_fingerprint` naming its
version). Each answer (and each event of a stream) is rewritten here once: parse, fix, dump.

A stream that fails once started (its 200 sent) carries the error as an event: vLLM's
`{"error": {...}}` (a chat or text completion stream's) names the engine's exception class and
has an integer `code`; it is told in OpenAI's words, as `errors.worker_error` tells a whole
error answer (a Responses stream's `error` event too, as the spec's ResponseErrorEvent).
"""

from __future__ import annotations

from typing import Any

import orjson

from dataplane import errors
from dataplane.metering import Seen

# Fields of the engine's own, at the top of an answer and in each choice.
ENGINE_FIELDS = ("prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params",
                 "metrics", "system_fingerprint", "input_messages", "output_messages")  # fmt: skip
CHOICE_ENGINE_FIELDS = ("stop_reason", "token_ids", "routed_experts", "prompt_logprobs", "prompt_token_ids")
# A chat message's (or delta's) fields the spec lets be null; others are left out when null.
NULLABLE = ("content", "refusal")
USAGE_DETAILS = ("prompt_tokens_details", "completion_tokens_details")


def body(raw: bytes, model: str, seen: Seen | None = None) -> bytes:
    """A whole JSON answer, reshaped (as it was when it is not a JSON object); its usage noted
    in `seen`."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if not isinstance(obj, dict):
        return raw
    if seen is not None:
        seen.answer(obj)
    return orjson.dumps(answer(obj, model))


# What of a stream's usage the client asked for (`stream_options`); the worker is always asked
# for all of it (`continuous_usage_stats`), for metering.
NO_USAGE, FINAL_USAGE, CONTINUOUS_USAGE = 0, 1, 2


def events(
    lines: bytes,
    model: str,
    seen: Seen | None = None,
    wanted: int = CONTINUOUS_USAGE,
    prompt_param: str | None = None,
) -> bytes:
    """Whole lines of a server-sent event stream: each `data: {...}` event reshaped, the rest as
    it is; the usage each event reports noted in `seen`, and left out where the client did not
    ask for it (an event that carries only usage goes, with the blank line that ends it); an
    error event in OpenAI's words (`prompt_param`: the request's prompt parameter, which a
    prompt's error names)."""
    out = []
    dropped = False
    for line in lines.split(b"\n"):
        if dropped and not line.strip(b"\r"):
            dropped = False
            continue
        shaped = _event(line, model, seen, wanted, prompt_param)
        dropped = shaped is None
        if shaped is not None:
            out.append(shaped)
    return b"\n".join(out)


def _event(line: bytes, model: str, seen: Seen | None, wanted: int, prompt_param: str | None) -> bytes | None:
    if not line.startswith(b"data: {"):
        return line
    end = len(line.rstrip(b"\r"))
    try:
        obj = orjson.loads(line[6:end])
    except orjson.JSONDecodeError:
        return line
    if not isinstance(obj, dict):
        return line
    if seen is not None:
        seen.event(obj)
    failure = stream_error(obj, prompt_param)
    if failure is not None:
        return b"data: " + orjson.dumps(failure) + line[end:]
    if wanted != CONTINUOUS_USAGE and "usage" in obj and "choices" in obj:
        if obj["choices"]:  # a chunk's running count
            del obj["usage"]
        elif wanted == NO_USAGE:  # the usage event
            return None
    return b"data: " + orjson.dumps(answer(obj, model)) + line[end:]


def stream_error(obj: dict[str, Any], prompt_param: str | None = None) -> dict[str, Any] | None:
    """A stream's error event in OpenAI's words (None: `obj` is not one). vLLM's (0.32: a chat
    or text completion stream's, `{"error": {"message", "type": "<its exception class>",
    "param", "code": <HTTP status>}}`) is OpenAI's `{"error": {"message", "type", "param",
    "code"}}`, said as a whole error answer of that status would be; a Responses stream's
    (`"type": "error"`) the spec's ResponseErrorEvent, `code` a string or null."""
    if obj.get("type") == "error":
        err = errors.worker_error(_status(obj.get("code")), obj, prompt_param)
        sequence = obj.get("sequence_number")
        return {"type": "error", "code": err.code, "message": err.message, "param": err.param,
                "sequence_number": sequence if type(sequence) is int else 0}  # fmt: skip
    info = obj.get("error")
    if isinstance(info, dict) and "choices" not in obj and "object" not in obj:
        return {"error": errors.fields(errors.worker_error(_status(info.get("code")), info, prompt_param))}
    return None


def _status(code: object) -> int:
    """The HTTP status an error event's `code` gives (vLLM's is one); a server error if none."""
    return code if type(code) is int and 400 <= code <= 599 else 500


def answer(obj: dict[str, Any], model: str) -> dict[str, Any]:
    if "model" in obj:
        obj["model"] = model
    for name in ENGINE_FIELDS:
        obj.pop(name, None)
    if obj.get("object") == "response":
        _response(obj)
    for key in ("response", "item", "part"):  # what a Responses API stream event carries
        if isinstance(obj.get(key), dict):
            answer(obj[key], model)
    if obj.get("type") == "output_text":
        _output_text(obj)
    elif obj.get("type") == "message":  # an output item
        _message_item(obj)
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            _choice(choice)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        for name in USAGE_DETAILS:
            if usage.get(name, 0) is None:
                del usage[name]
    if obj.get("service_tier", 0) is None:
        del obj["service_tier"]
    return obj


def _response(obj: dict[str, Any]) -> None:
    """A Responses API response: the fields the spec requires, none of the engine's."""
    obj.setdefault("error", None)
    for name in ("presence_penalty", "frequency_penalty"):
        obj.pop(name, None)
    for name in ("user", "usage"):
        if obj.get(name, 0) is None:
            del obj[name]
    if obj.get("text") is None:
        obj["text"] = {"format": {"type": "text"}}
    usage = obj.get("usage")
    if isinstance(usage, dict):
        for details, own in (("input_tokens_details", ("input_tokens_per_turn", "cached_tokens_per_turn")),
                             ("output_tokens_details", ("tool_output_tokens", "output_tokens_per_turn",
                                                        "tool_output_tokens_per_turn"))):  # fmt: skip
            for name in own if isinstance(usage.get(details), dict) else ():
                usage[details].pop(name, None)
    for item in obj.get("output") or ():
        if isinstance(item, dict):
            _message_item(item)


def _message_item(item: dict[str, Any]) -> None:
    for content in item.get("content") or ():
        if isinstance(content, dict) and content.get("type") == "output_text":
            _output_text(content)


def _output_text(content: dict[str, Any]) -> None:
    if content.get("logprobs", 0) is None:
        content["logprobs"] = []


def _choice(choice: dict[str, Any]) -> None:
    for name in CHOICE_ENGINE_FIELDS:
        choice.pop(name, None)
    for key in ("message", "delta"):
        message = choice.get(key)
        if isinstance(message, dict):
            for name in [k for k, v in message.items() if v is None and k not in NULLABLE]:
                del message[name]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and "content" in logprobs:  # a chat choice's (the text one has no refusal)
        logprobs.setdefault("refusal", None)
        for token in logprobs.get("content") or ():
            if isinstance(token, dict):
                token.setdefault("top_logprobs", [])
                token.setdefault("bytes", None)
