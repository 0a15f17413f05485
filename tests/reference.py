"""What transformers + PEFT compute on the CPU for a base model and adapter: the reference
loraplane's answers are held to; and the OpenAI clients that ask loraplane."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai

from loraplane.stack import Stack


def openai_clients(stack: Stack, timeout: float = 60) -> Iterator[Callable[[str], openai.OpenAI]]:
    """Makes real OpenAI clients for the stack's data plane (a fixture yields from it); closes
    them afterwards."""
    made: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0, timeout=timeout))
        return made[-1]

    yield make
    for client in made:
        client.close()


def _reference_model(base: Path, adapter: Path | None, prompt: str) -> tuple[Any, Any, Any]:
    """transformers + PEFT on the CPU: (tokenizer, model, the prompt's chat ids)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    return tok, model, ids


def reference(base: Path, adapter: Path | None, prompt: str, max_tokens: int) -> str:
    """Greedy output computed independently with transformers + PEFT on the CPU."""
    import torch

    tok, model, ids = _reference_model(base, adapter, prompt)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def reference_logprob(base: Path, adapter: Path | None, prompt: str) -> float:
    """The log-probability of the first answer token greedy decoding picks, by transformers + PEFT."""
    import torch

    _, model, ids = _reference_model(base, adapter, prompt)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return float(torch.log_softmax(logits, dim=-1).max())
