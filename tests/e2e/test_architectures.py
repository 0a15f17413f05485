"""Adapters PEFT writes, for every architecture family vLLM's CPU build serves with LoRA here,
served through loraplane exactly as transformers + PEFT compute them; and adapters PEFT defines
as the same function answering the same.

One stack: tiny-llama (the first worker) and a tiny model of each other family, each on its own
real vLLM (Mistral in the long suite, LORAPLANE_RELIABILITY_LONG=1). The mixture-of-experts
families (Qwen3-MoE, Mixtral) are not among them: vLLM 0.32's CPU build routes MoE with LoRA
through Triton, which it does not have (docs/adapters.md)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from loraplane import tinymodel
from loraplane.stack import Stack, WorkerSpec
from tests import trainers
from tests.conftest import new_tenant, running_stack, upload
from tests.controlplane.test_trainers import MATRIX
from tests.reference import openai_clients, reference, reference_logprob
from tests.support import LONG, free_port, safetensors_bytes, with_metadata

PROMPT = "hello"
MAX_TOKENS = 16
# Mistral's vLLM class is Llama's with its own attention and MLP: served in the long suite only
# (a vLLM each costs ~30 s of a CI run's two cores); its shapes and targets are checked always.
OTHERS = ("qwen2", "gemma2", "phi3", *(("mistral",) if LONG else ()))
FAMILIES = ("llama", *OTHERS)
# What vLLM's model classes serve LoRA on beyond the decoder layers' linear modules.
EMBEDDING_LORA = {"llama", "phi3"}


@pytest.fixture(scope="module")
def arch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("arch-stack")
    models = tuple((f"tiny-{f}", tinymodel.build(tmp / "models" / f, family=f)) for f in OTHERS)
    workers = tuple(
        WorkerSpec(free_port(), env=(("LORAPLANE_BASE_MODEL", name), ("LORAPLANE_WORKER_ID", f"embedded-{name}")))
        for name, _ in models
    )
    yield from running_stack(tmp, with_worker=True, extra_workers=workers, lora_models=models)


def base_dir(stack: Stack, family: str) -> Path:
    if family == "llama":
        return stack.config.data_dir / "models" / "tiny-llama"
    return stack.config.data_dir.parent / "models" / family


@pytest.fixture
def client(arch_stack: Stack) -> Iterator[Callable[[str], openai.OpenAI]]:
    yield from openai_clients(arch_stack, timeout=120)


def answer(client: openai.OpenAI, model: str) -> tuple[str, float]:
    """The greedy answer, and the log-probability of its first token."""
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=MAX_TOKENS,
        logprobs=True,
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    return choice.message.content or "", choice.logprobs.content[0].logprob


def peft_says(base: Path, adapter: Path | None) -> tuple[str, float]:
    """transformers + PEFT's greedy answer (vLLM holds back a last incomplete UTF-8 character that
    transformers decodes as U+FFFD) and first-token log-probability."""
    return reference(base, adapter, PROMPT, MAX_TOKENS).rstrip("\ufffd"), reference_logprob(base, adapter, PROMPT)


def put(stack: Stack, key: str, family: str, name: str, adapter: Path, **fields: str) -> dict[str, Any]:
    r = upload(
        stack, key, name, (adapter / "adapter_model.safetensors").read_bytes(),
        config=(adapter / "adapter_config.json").read_bytes(), base_model=f"tiny-{family}", **fields,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def layers(family: str) -> tuple[str, str]:
    """An attention and an MLP module of the family's layers."""
    return ("qkv_proj", "gate_up_proj") if family == "phi3" else ("q_proj", "up_proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_with_every_option_answers_as_peft_computes_it(
    family: str, arch_stack: Stack, client: Callable[[str], openai.OpenAI], tmp_path: Path
) -> None:
    """all-linear, rsLoRA, a rank_pattern and an alpha_pattern at once, as PEFT writes them."""
    base = base_dir(arch_stack, family)
    attention, mlp = layers(family)
    adapter = trainers.peft_adapter(
        base, tmp_path / "a", seed=3, r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
        rank_pattern={attention: 4}, alpha_pattern={mlp: 64, "down_proj": 4},
    )  # fmt: skip
    key = new_tenant(arch_stack, f"every-option-{family}")
    put(arch_stack, key, family, "every", adapter)
    c = client(key)
    served, served_logprob = answer(c, f"tiny-{family}:every")
    expected, expected_logprob = peft_says(base, adapter)
    assert served == expected
    assert served_logprob == pytest.approx(expected_logprob, abs=1e-3)
    base_text, base_logprob = answer(c, f"tiny-{family}")
    assert base_text != served or abs(base_logprob - served_logprob) > 1e-3  # the adapter changes the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_and_lm_head_lora_where_vllm_serves_it(
    family: str, arch_stack: Stack, client: Callable[[str], openai.OpenAI], tmp_path: Path
) -> None:
    base = base_dir(arch_stack, family)
    adapter = trainers.peft_adapter(
        base, tmp_path / "e", seed=4, r=8, lora_alpha=8, target_modules=[layers(family)[0], "embed_tokens", "lm_head"]
    )
    key = new_tenant(arch_stack, f"embeddings-{family}")
    if family not in EMBEDDING_LORA:
        r = upload(
            arch_stack, key, "emb", (adapter / "adapter_model.safetensors").read_bytes(),
            config=(adapter / "adapter_config.json").read_bytes(), base_model=f"tiny-{family}",
        )  # fmt: skip
        assert r.status_code == 422, r.text
        assert "LoRA on " in r.text and "vLLM serves no LoRA on the embeddings" in r.text, r.text
        return
    put(arch_stack, key, family, "emb", adapter)
    served, served_logprob = answer(client(key), f"tiny-{family}:emb")
    expected, expected_logprob = peft_says(base, adapter)
    assert served == expected
    assert served_logprob == pytest.approx(expected_logprob, abs=1e-3)


def _padded(adapter: Path, out: Path, module: str, rank: int) -> Path:
    """The same adapter with every `module` padded with zeros to `rank` (A's new rows and B's new
    columns are zero: the same product), declared uniform."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for name, t in list(tensors.items()):
        if f".{module}." in name:
            pad = rank - (t.shape[0] if "lora_A" in name else t.shape[1])
            width = ((0, pad), (0, 0)) if "lora_A" in name else ((0, 0), (0, pad))
            tensors[name] = np.pad(t, width)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {}, "alpha_pattern": {}}))
    return out


def test_adapters_peft_defines_as_the_same_function_answer_the_same(
    arch_stack: Stack, client: Callable[[str], openai.OpenAI], tmp_path: Path
) -> None:
    """A rank-pattern adapter and its zero-padded uniform twin; targets named short, by full
    path and by a regular expression: each the same function in PEFT, each the same answer."""
    base = base_dir(arch_stack, "llama")
    # q_proj rank 4 with alpha 8: scaling 2, as every other module's 16 / 8.
    patterned = trainers.peft_adapter(
        base, tmp_path / "p", seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 8},
    )  # fmt: skip
    twin = _padded(patterned, tmp_path / "twin", "q_proj", 8)
    weights = (patterned / "adapter_model.safetensors").read_bytes()
    config = json.loads((patterned / "adapter_config.json").read_text())
    modules = [f"model.layers.{i}.{p}.{m}" for i in (0, 1) for p, m in
               (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))]  # fmt: skip
    variants = {
        "short": config | {"target_modules": ["q_proj", "v_proj", "down_proj"]},
        "paths": config | {"target_modules": modules},
        "regex": config | {"target_modules": r".*\.(q_proj|v_proj|down_proj)"},
    }
    key = new_tenant(arch_stack, "same-function")
    put(arch_stack, key, "llama", "twin", twin)
    for i, (name, cfg) in enumerate(variants.items()):  # other bytes each: not deduplicated
        r = upload(arch_stack, key, name, with_metadata(weights, {"v": str(i)}), config=json.dumps(cfg).encode())
        assert r.status_code == 201, r.text
    c = client(key)
    answers = {name: answer(c, f"tiny-llama:{name}") for name in ("twin", *variants)}
    first_text, first_logprob = answers["short"]
    assert first_text == peft_says(base, patterned)[0]
    for name, (text, logprob) in answers.items():
        assert text == first_text, name
        assert logprob == pytest.approx(first_logprob, abs=1e-4), name


def test_the_wrong_architecture_is_refused_with_the_reason(arch_stack: Stack, tmp_path: Path) -> None:
    """A Llama adapter for Phi-3 (fused projections) and a Phi-3 one for Llama, both with the
    right hidden size: refused, the layer the base model lacks named."""
    key = new_tenant(arch_stack, "wrong-arch")
    llama = trainers.peft_adapter(base_dir(arch_stack, "llama"), tmp_path / "l", r=4, target_modules=["q_proj"])
    r = upload(
        arch_stack, key, "l", (llama / "adapter_model.safetensors").read_bytes(), base_model="tiny-phi3"
    )  # fmt: skip
    assert r.status_code == 422 and "Phi3ForCausalLM has no LoRA-targetable q_proj" in r.text, r.text
    fused = safetensors_bytes(
        {
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": ("F32", [4, 256]),
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight": ("F32", [768, 4]),
        }
    )
    r = upload(arch_stack, key, "f", fused, base_model="tiny-qwen2")
    assert r.status_code == 422 and "Qwen2ForCausalLM has no LoRA-targetable qkv_proj" in r.text, r.text


@pytest.mark.parametrize("style", [style for style, expect in MATRIX.items() if expect.accepted])
def test_a_pipelines_adapter_answers_as_peft_computes_it(
    style: str, arch_stack: Stack, trained: dict[str, Path], client: Callable[[str], openai.OpenAI]
) -> None:
    """PEFT defaults, Unsloth, Axolotl, TRL (and its QLoRA's BF16), LLaMA-Factory, and the options
    they expose (rsLoRA, patterns, regular expression, full paths, layers_to_transform, embeddings),
    as tests/controlplane/test_trainers.py uploads them (built on the same tiny-llama)."""
    key = new_tenant(arch_stack, f"pipeline-{style}")
    put(arch_stack, key, "llama", style, trained[style])
    served, served_logprob = answer(client(key), f"tiny-llama:{style}")
    expected, expected_logprob = peft_says(base_dir(arch_stack, "llama"), trained[style])
    assert served == expected
    assert served_logprob == pytest.approx(expected_logprob, abs=1e-3)
