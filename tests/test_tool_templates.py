"""Tool calling on the catalog's chat models, against the installed vLLM: every chat model of
deploy/catalog.json names a tool-call parser vLLM registers (workers start it with
`--enable-auto-tool-choice --tool-call-parser`), and the chat templates loraplane ships for models
whose own template renders no tools (Gemma 2, Phi-3: loraplane/chat_templates/) write tools,
assistant tool calls and tool results in the format that parser reads, in the model's own turns.

vLLM renders and parses here as its chat server does (`parse_chat_messages`,
`safe_apply_chat_template`, the `Parser` that `ParserManager.get_parser` composes), with a
tokenizer built here that carries each model's special tokens (no weights: what the real model
writes when given these prompts is not checked here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loraplane.catalog import Catalog

ROOT = Path(__file__).resolve().parents[1]
CATALOG = Catalog.load(ROOT / "deploy" / "catalog.json")

# The models given a template here, each with its tokenizer's special tokens (bos, eos, the turn
# markers) and its template as published in the model's tokenizer_config.json: without tools
# and a system message, loraplane's template renders exactly what that one renders.
GEMMA2_PUBLISHED = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_PUBLISHED = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MODELS: dict[str, dict[str, Any]] = {
    "gemma-2-9b-it": {
        "special": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "published": GEMMA2_PUBLISHED,
        "user": "<start_of_turn>user\n",
        "assistant": "<start_of_turn>model\n",
        "end": "<end_of_turn>\n",
        "counts": {"<start_of_turn>": 4, "<end_of_turn>": 3},  # the tool loop's turns, and the one to write
    },
    "phi-3-mini-4k-instruct": {
        "special": ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "published": PHI3_PUBLISHED,
        "user": "<|user|>\n",
        "assistant": "<|assistant|>\n",
        "end": "<|end|>\n",
        "counts": {"<|system|>": 1, "<|user|>": 2, "<|assistant|>": 2, "<|end|>": 4},
    },
}

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now, as <text> & 'quotes'.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
# An OpenAI chat request's messages, as the SDK sends them: arguments a JSON string, the tool
# call's turn without content, two results in a row.
TOOL_LOOP = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "C"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12 C, rain"},
]
PLAIN = [
    {"role": "user", "content": "  Hello there "},
    {"role": "assistant", "content": "Hi! "},
    {"role": "user", "content": "What can you do?"},
]
# What the model writes for a call: the format of the template's history and instructions.
OUTPUT = (
    "Let me look that up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)

# Run apart: importing vLLM warns, which the test run treats as an error. Reads a JSON job on
# stdin, prints a JSON answer as its last line; run in the repository's root, as the agent runs
# vLLM in the image's (/app): the catalog's template paths are relative to it.
RUN_VLLM = r"""
import json, sys, types
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.parser.parser_manager import ParserManager
from vllm.renderers.chat_utils import load_chat_template, parse_chat_messages
from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template
from vllm.tool_parsers import ToolParserManager

job = json.load(sys.stdin)
# What parse_chat_messages reads of the model's config for text-only messages.
MODEL_CONFIG = types.SimpleNamespace(multimodal_config=None, enable_prompt_embeds=False)


def tokenizer(spec):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=spec["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([job["output"], json.dumps(job["tool_loop"])] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"])


def render(tok, template, body):
    # As vLLM's chat server: tools as their model_dump, the request's own chat params.
    request = ChatCompletionRequest(model="m", **body)
    tools = None if request.tools is None else [tool.model_dump() for tool in request.tools]
    params = request.build_chat_params(template, "auto").with_defaults({"tools": tools, "tokenize": False})
    content_format = _detect_content_format(template, default="openai")
    conversation, _, _ = parse_chat_messages(request.messages, MODEL_CONFIG, content_format)
    return safe_apply_chat_template(MODEL_CONFIG, tok, conversation, **params.get_apply_chat_template_kwargs())


def parse(parser_cls, tok, text, tools):
    # A complete answer, then the same one streamed a token at a time.
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                    tool_choice="auto")
    parser = parser_cls(tok, request.tools)
    request = parser.adjust_request(request)
    _, content, calls = parser.parse(text, request, enable_auto_tools=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    parser, seen, sent, streamed = parser_cls(tok, request.tools), "", 0, {}
    for i in range(len(ids)):
        now = tok.decode(ids[: i + 1])
        if now.endswith("\ufffd") and i < len(ids) - 1:  # half a character: vLLM's detokenizer waits
            continue
        delta = parser.parse_delta(now[len(seen):], ids[sent : i + 1], request, prompt_token_ids=[0],
                                   finished=i == len(ids) - 1)
        seen, sent = now, i + 1
        for call in (delta.tool_calls if delta else None) or []:
            entry = streamed.setdefault(str(call.index), {"name": "", "arguments": ""})
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    return {
        "skip_special_tokens": request.skip_special_tokens,
        "content": content,
        "calls": [{"name": c.name, "arguments": c.arguments} for c in calls or []],
        "streamed": [streamed[k] for k in sorted(streamed, key=int)],
    }


answer = {"registered": sorted(set(ToolParserManager.lazy_parsers) | set(ToolParserManager.tool_parsers)),
          "templates": {}, "models": {}}
for path in job["templates"]:
    answer["templates"][path] = load_chat_template(path)  # as vLLM reads --chat-template
for name, model in job["models"].items():
    tok = tokenizer(model)
    template = load_chat_template(model["chat_template"])
    parser_cls = ParserManager.get_parser(tool_parser_name=model["tool_parser"], enable_auto_tools=True,
                                          model_name=model["repo"], tokenizer=tok)
    tools = job["tools"]
    plain = {"messages": job["plain"]}
    with_tools = {"messages": job["tool_loop"], "tools": tools, "tool_choice": "auto"}
    prompt = render(tok, template, with_tools)
    # The template's own tool-call turn, parsed back.
    turn = prompt.split(model["assistant"])[1].split(model["end"])[0]
    answer["models"][name] = {
        "content_format": _detect_content_format(template, default="openai"),
        "prompt": prompt,
        "ids": tok(prompt, add_special_tokens=False)["input_ids"],
        "special_ids": {t: tok.convert_tokens_to_ids(t) for t in model["special"]},
        "plain": render(tok, template, plain),
        "plain_published": render(tok, model["published"], plain),
        "plain_ended": render(tok, template, {**plain, "add_generation_prompt": False}),
        "plain_ended_published": render(tok, model["published"], {**plain, "add_generation_prompt": False}),
        "output": parse(parser_cls, tok, job["output"], tools),
        "own_turn": parse(parser_cls, tok, turn, tools),
        "prose": parse(parser_cls, tok, "It is sunny in Paris.", tools),
    }
print(json.dumps(answer))
"""


def _catalog_entry(name: str) -> dict[str, Any]:
    model = CATALOG.get(name)
    assert model is not None, f"{name} is not in deploy/catalog.json"
    assert model.tool_parser and model.chat_template, (
        f"{name}: deploy/catalog.json names no tool_parser or chat_template"
    )
    return {"tool_parser": model.tool_parser, "chat_template": model.chat_template, "repo": model.repo}


@pytest.fixture(scope="module")
def vllm() -> dict[str, Any]:
    job = {
        "models": {name: {**spec, **_catalog_entry(name)} for name, spec in MODELS.items()},
        "templates": sorted({m.chat_template for m in CATALOG.models.values() if m.chat_template}),
        "tools": [WEATHER, TIME],
        "tool_loop": TOOL_LOOP,
        "plain": PLAIN,
        "output": OUTPUT,
    }
    run = subprocess.run(
        [sys.executable, "-c", RUN_VLLM],
        input=json.dumps(job),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    answer: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return answer


def test_every_chat_model_names_a_tool_parser_vllm_registers(request: pytest.FixtureRequest) -> None:
    chat = [m for m in CATALOG.models.values() if m.kind == "chat"]
    assert {m.name for m in chat} >= set(MODELS)
    for model in chat:
        assert model.tool_parser, f"{model.name}: no tool_parser, so `tools` with tool_choice auto is a 400"
    registered = request.getfixturevalue("vllm")["registered"]
    for model in chat:
        assert model.tool_parser in registered, f"{model.name}: vLLM has no tool parser {model.tool_parser!r}"


def test_catalog_chat_templates_are_files_shipped_in_the_worker_image(vllm: dict[str, Any]) -> None:
    """A relative `chat_template` is opened in the agent's working directory: the image's /app,
    where the Dockerfile copies loraplane/ (and the repository's root in development)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)  # the agent (and the vLLM it starts) runs there
    for model in CATALOG.models.values():
        if not model.chat_template:
            continue
        path = Path(model.chat_template)
        assert not path.is_absolute() and path.parts[0] == "loraplane", model.chat_template
        assert re.search(rf"^COPY {path.parts[0]} {path.parts[0]}$", dockerfile, re.M)
        assert vllm["templates"][model.chat_template] == (ROOT / path).read_text()  # a file, not a literal
    assert {name: CATALOG.models[name].chat_template for name in MODELS} == {
        "gemma-2-9b-it": "loraplane/chat_templates/gemma-2-hermes-tools.jinja",
        "phi-3-mini-4k-instruct": "loraplane/chat_templates/phi-3-hermes-tools.jinja",
    }


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_template_renders_tools_calls_and_results_in_the_models_turns(vllm: dict[str, Any], name: str) -> None:
    spec, got = MODELS[name], vllm["models"][name]
    prompt: str = got["prompt"]
    assert got["content_format"] == "string"  # vLLM hands it message contents as text
    # The tool list, as the JSON vLLM gives it, in the first turn (Gemma: the user's; Phi-3: the system's).
    first = prompt.split(spec["end"])[0]
    for tool in ("get_weather", "get_time"):
        assert f'"name": "{tool}"' in first
    listing = first.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in listing] == ["get_weather", "get_time"]
    assert json.loads(listing[0])["function"]["parameters"] == WEATHER["function"]["parameters"]
    assert "The weather in a city now, as <text> & 'quotes'." in first  # not HTML-escaped
    assert "<tool_call>\n" in first and "Answer briefly." in first
    # The assistant's calls in the parser's format, arguments as JSON objects; both results in one user turn.
    calls = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}\n</tool_call>'
    )
    results = "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n12 C, rain\n</tool_response>"
    tail = f"{spec['assistant']}{calls}{spec['end']}{spec['user']}{results}{spec['end']}{spec['assistant']}"
    assert prompt.endswith(tail)
    if name == "gemma-2-9b-it":  # no system turn: the system message and the tools open the user's
        assert prompt.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\n# Tools\n")
        assert first.endswith("</tool_call>\n\nWeather in Paris and Zürich?")
        assert "<start_of_turn>system" not in prompt
    else:
        assert prompt.startswith("<|system|>\nAnswer briefly.\n\n# Tools\n")
        assert f"{spec['end']}{spec['user']}Weather in Paris and Zürich?{spec['end']}" in prompt
        assert [m for m in re.findall(r"<\|\w+\|>", prompt)] == [
            "<|system|>", "<|end|>", "<|user|>", "<|end|>", "<|assistant|>", "<|end|>",
            "<|user|>", "<|end|>", "<|assistant|>",
        ]  # fmt: skip
    # The markers are the tokenizer's special tokens, each one token.
    for marker, count in spec["counts"].items():
        assert got["ids"].count(got["special_ids"][marker]) == count, marker


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_tools_the_template_is_the_models_own(vllm: dict[str, Any], name: str) -> None:
    got = vllm["models"][name]
    assert got["plain"] == got["plain_published"]
    assert got["plain_ended"] == got["plain_ended_published"]
    assert "<tools>" not in got["plain"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_parser_reads_the_calls_the_template_teaches(vllm: dict[str, Any], name: str) -> None:
    got = vllm["models"][name]
    expected = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
        {"name": "get_time", "arguments": {}},
    ]
    for way in ("calls", "streamed"):
        calls = got["output"][way]
        assert [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls] == expected, way
    assert got["output"]["content"] == "Let me look that up.\n"
    assert got["output"]["skip_special_tokens"] is False
    # The template's own history turn reads back as the calls it was rendered from.
    for way in ("calls", "streamed"):
        own = [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in got["own_turn"][way]]
        assert own == [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}},
        ], way
    assert got["prose"]["calls"] == [] and got["prose"]["content"] == "It is sunny in Paris."
