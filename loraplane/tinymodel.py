"""Build `tiny-llama`, the small Llama-architecture model the embedded default serves.

Nothing is downloaded: the tokenizer is trained here on a built-in corpus and the
weights are drawn from a fixed seed, so every build is byte-for-byte the same.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUILD_VERSION = "2"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
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


def build(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the model (config, safetensors weights, tokenizer) into `out_dir`.

    Idempotent: a complete build of the same version is left as it is.
    """
    out_dir = Path(out_dir)
    stamp = out_dir / ".loraplane-build"
    if stamp.exists() and stamp.read_text() == BUILD_VERSION:
        return out_dir

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        **DIMENSIONS,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # vLLM takes its default sampling from here: top_k 1 makes a request that sets nothing
    # (like the README's) answer greedily, so the demo shows what the adapter learned.
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        (tmp / ".loraplane-build").write_text(BUILD_VERSION)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
