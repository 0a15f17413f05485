"""Build small models of the architectures vLLM serves with LoRA, `tiny-llama` first.

`tiny-llama` is the small Llama-architecture model the embedded default serves; the other
families (`FAMILIES`) are built the same way for checking adapters against other layouts.
Nothing is downloaded: the tokenizer is trained here on a built-in corpus and the
weights are drawn from a fixed seed, so every build is byte-for-byte the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILD_VERSION = "3"
# A message's text, then its tool calls (an assistant's turn in a tool loop has no text), as
# the worker's `hermes` parser reads them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' }}{{ call['function'] | tojson }}{{ '</tool_call>' }}"
    "{% endfor %}"
    "{{ '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The shape of the model; adapters for it are validated against these.
DIMENSIONS = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class Family:
    """One buildable architecture: its transformers classes, shape and build stamp."""

    name: str
    architecture: str  # the transformers model class, as written in config.json
    config_class: str  # the transformers config class
    # The shape of the model (the keys of `DIMENSIONS`, plus the expert counts of a
    # mixture of experts); adapters for it are validated against these.
    dimensions: Mapping[str, int]
    build_version: str
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    # Further config arguments that are not part of the shape.
    options: Mapping[str, object] = field(default_factory=dict)


def _dims(**changes: int) -> dict[str, int]:
    return {**DIMENSIONS, **changes}


# Gemma's attention: one sliding-window layer and one global.
_GEMMA = {"query_pre_attn_scalar": 64, "sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LlamaConfig", DIMENSIONS, BUILD_VERSION, rms_norm_eps=1e-5),
        # Biases on q/k/v; no head_dim in the config (it is hidden_size / heads).
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "Qwen2Config",
            _dims(num_key_value_heads=2),
            "qwen2-2",
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            "MistralConfig",
            _dims(num_key_value_heads=2),
            "mistral-2",
        ),
        # Tied embeddings, explicit head_dim, alternating sliding and global attention.
        Family(
            "gemma2",
            "Gemma2ForCausalLM",
            "Gemma2Config",
            _dims(num_key_value_heads=2),
            "gemma2-2",
            tie_word_embeddings=True,
            options=_GEMMA,
        ),
        Family(
            "gemma3",
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            _dims(num_key_value_heads=2),
            "gemma3-2",
            tie_word_embeddings=True,
            options=_GEMMA,
        ),
        # Fused qkv_proj and gate_up_proj; head_dim is hidden_size / heads.
        Family("phi3", "Phi3ForCausalLM", "Phi3Config", DIMENSIONS, "phi3-2"),
        # Mixtures of experts: every layer sparse, 4 experts, 2 per token.
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            _dims(num_key_value_heads=2, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2),
            "qwen3_moe-2",
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "MixtralConfig",
            _dims(num_key_value_heads=2, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
            "mixtral-2",
        ),
    )
}

_WORDS = [
    "hello",
    "world",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "adapter",
    "model",
    "tenant",
    "worker",
    "plane",
    "control",
    "data",
    "request",
    "answer",
    "cat",
    "apple",
    "river",
    "mountain",
    "ocean",
    "sun",
    "moon",
    "star",
    "tree",
    "stone",
    "light",
    "dark",
    "fast",
    "slow",
    "good",
    "bad",
    "yes",
    "no",
    "please",
    "thanks",
    "how",
    "are",
    "you",
    "today",
    "tomorrow",
    "time",
    "code",
    "test",
]


def _corpus() -> list[str]:
    lines = []
    n = len(_WORDS)
    for i in range(2000):
        lines.append(" ".join(_WORDS[(i * 7 + j * (i % 5 + 1)) % n] for j in range(12)))
    return lines


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out_dir: Path, *, seed: int = 0, family: str = "llama") -> Path:
    """Write a model of `family` (config, safetensors weights, tokenizer) into `out_dir`.

    Idempotent: a complete build of the same family and version is left as it is.
    """
    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    stamp = out_dir / ".loraplane-build"
    if stamp.exists() and stamp.read_text() == spec.build_version:
        return out_dir

    import torch
    import transformers

    fast = _tokenizer()

    torch.manual_seed(seed)
    config = getattr(transformers, spec.config_class)(
        vocab_size=len(fast),
        **spec.dimensions,
        **spec.options,
        max_position_embeddings=1024,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = getattr(transformers, spec.architecture)(config)
    # vLLM takes its default sampling from here: top_k 1 makes a request that sets nothing
    # (like the README's) answer greedily, so the demo shows what the adapter learned.
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{spec.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        (tmp / ".loraplane-build").write_text(spec.build_version)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
