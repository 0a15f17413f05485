"""The production base models of deploy/catalog.json, against adapters of the size a real
fine-tune of each has: rank 16, every linear module on every layer, bf16, tensors named and
adapter_config.json written as PEFT writes them. Each adapter is accepted for its own base
model and refused for another one, with the mismatch named.

The adapters are sparse files (the header, then a hole up to the full size), so the 70B
model's ~414 MB adapter costs neither memory nor disk."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane import validation
from controlplane.errors import InvalidAdapter
from loraplane.catalog import Architecture, BaseModel, Catalog
from loraplane.limits import MAX_ADAPTER_BYTES

ROOT = Path(__file__).resolve().parents[2]
CATALOG_PATH = ROOT / "deploy" / "catalog.json"
RANK = 16
LORA_ALPHA = 32
BF16_BYTES = 2

# What each model's published Hugging Face config.json says (head_dim: as given there, or
# hidden_size / num_attention_heads where it gives none), and its repository, the
# base_model_name_or_path PEFT writes. deploy/catalog.json must say the same.
PUBLISHED: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct", {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "tie_word_embeddings": True,
    }),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "tie_word_embeddings": False,
    }),
    "llama-3.1-70b-instruct": ("meta-llama/Llama-3.1-70B-Instruct", {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "tie_word_embeddings": False,
    }),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 152064, "tie_word_embeddings": False,
    }),
    "mistral-7b-instruct-v0.3": ("mistralai/Mistral-7B-Instruct-v0.3", {
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 32768, "tie_word_embeddings": False,
    }),
    "gemma-2-9b-it": ("google/gemma-2-9b-it", {
        "architectures": ["Gemma2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "vocab_size": 256000, "tie_word_embeddings": True,
    }),
    "phi-3-mini-4k-instruct": ("microsoft/Phi-3-mini-4k-instruct", {
        "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 96,
        "vocab_size": 32064, "tie_word_embeddings": False,
    }),
}  # fmt: skip
MODELS = sorted(PUBLISHED)

# For each model's adapter, a production model it must be refused for. Llama 3.1 8B and
# Mistral 7B v0.3 have the same linear layers, so neither is the other's refusal.
REFUSED_BY = {
    "llama-3.2-1b-instruct": "llama-3.1-8b-instruct",
    "llama-3.1-8b-instruct": "llama-3.1-70b-instruct",
    "llama-3.1-70b-instruct": "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct": "llama-3.1-8b-instruct",
    "mistral-7b-instruct-v0.3": "gemma-2-9b-it",
    "gemma-2-9b-it": "llama-3.1-70b-instruct",
    "phi-3-mini-4k-instruct": "llama-3.1-8b-instruct",
}

# The fields PEFT (0.21) writes to adapter_config.json for a plain LoRA, but the ones that
# vary per adapter: base_model_name_or_path, r, lora_alpha, target_modules.
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_dropout": 0.05, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16,
    "rank_pattern": {}, "revision": None, "target_parameters": None, "task_type": "CAUSAL_LM",
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}  # fmt: skip


def catalog() -> Catalog:
    return Catalog.load(CATALOG_PATH)


def raw_architecture(name: str) -> dict[str, Any]:
    """A model's architecture as deploy/catalog.json gives it (config.json's keys)."""
    entries = json.loads(CATALOG_PATH.read_text())["models"]
    (entry,) = [e for e in entries if e["name"] == name]
    arch: dict[str, Any] = entry["architecture"]
    return arch


def linear_modules(cfg: dict[str, Any]) -> dict[str, tuple[str, int, int]]:
    """{module: (parent, in_features, out_features)} of every LoRA-targetable linear layer of a
    decoder layer, from the published config (not the catalog's copy of it): Phi-3 fuses q, k, v
    into qkv_proj and gate, up into gate_up_proj."""
    return Architecture.from_model_config(cfg).layer_modules()


@dataclass(frozen=True)
class Adapter:
    path: Path
    size: int
    config: bytes
    modules: tuple[str, ...]


def write_adapter(path: Path, cfg: dict[str, Any], rank: int = RANK) -> int:
    """adapter_model.safetensors of a rank-`rank` bf16 LoRA on every linear module of every
    layer, as safetensors writes it (names sorted, header padded to 8 bytes), its data a hole:
    the header length, the header, then truncate() to the full size. Its size."""
    shapes: dict[str, list[int]] = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (parent, fan_in, fan_out) in linear_modules(cfg).items():
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = [rank, fan_in]
            shapes[f"{prefix}.lora_B.weight"] = [fan_out, rank]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        n = math.prod(shapes[name]) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    size = 8 + len(raw) + offset
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(size)
    return size


def peft_config(name: str, modules: tuple[str, ...]) -> bytes:
    """adapter_config.json as PEFT's save_pretrained writes it for this model's adapter."""
    cfg = PEFT_DEFAULTS | {
        "base_model_name_or_path": PUBLISHED[name][0],
        "r": RANK,
        "lora_alpha": LORA_ALPHA,
        "target_modules": list(modules),
    }
    return json.dumps(cfg, indent=2, sort_keys=True).encode()


@pytest.fixture(params=MODELS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Adapter]]:
    """(model name, its adapter), the file deleted when the test ends."""
    name: str = request.param
    cfg = PUBLISHED[name][1]  # the published config, not the catalog: a wrong catalog entry refuses it
    path = tmp_path / f"{name}.safetensors"
    size = write_adapter(path, cfg)
    modules = tuple(linear_modules(cfg))
    try:
        yield name, Adapter(path=path, size=size, config=peft_config(name, modules), modules=modules)
    finally:
        path.unlink(missing_ok=True)


def validate(adapter: Adapter, model: BaseModel) -> validation.Validated:
    with adapter.path.open("rb") as f:
        return validation.validate(f, adapter.size, model, adapter.config, None, catalog=catalog())


def model(name: str) -> BaseModel:
    found = catalog().get(name)
    assert found is not None, f"{name} is not in deploy/catalog.json"
    return found


def test_catalog_carries_the_published_configs() -> None:
    loaded = catalog()
    for name, (_, published) in PUBLISHED.items():
        assert raw_architecture(name) == published, name
        entry = loaded.get(name)
        assert entry is not None and entry.lora and entry.kind == "chat", name
        assert entry.path == f"/models/{name}" and entry.max_rank == 64 and entry.max_adapters_per_worker == 8
        arch = entry.architecture
        assert arch is not None, name
        assert (arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers) == (
            published["hidden_size"],
            published["intermediate_size"],
            published["num_hidden_layers"],
        )
        assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (
            published["num_attention_heads"],
            published["num_key_value_heads"],
            published["head_dim"],
        )
    assert set(PUBLISHED) <= set(loaded.models)


def test_adapter_is_accepted_for_its_own_base_model(adapter: tuple[str, Adapter]) -> None:
    name, a = adapter
    assert a.size < MAX_ADAPTER_BYTES, f"a rank-{RANK} adapter of {name} is over the upload limit"
    result = validate(a, model(name))
    assert result.info.rank == RANK
    assert result.info.target_modules == tuple(sorted(a.modules))
    assert result.lora_alpha == LORA_ALPHA
    clean = json.loads(result.clean_config)
    assert clean["peft_type"] == "LORA" and clean["r"] == RANK and clean["lora_alpha"] == LORA_ALPHA
    assert sorted(clean["target_modules"]) == sorted(a.modules)
    assert clean["bias"] == "none" and clean["use_dora"] is False and clean["use_rslora"] is False
    # The uploaded config is never handed on as is: PEFT's bookkeeping stays behind.
    assert not {"megatron_core", "loftq_config", "inference_mode", "peft_version"} & set(clean)


def test_adapter_is_refused_for_another_base_model(adapter: tuple[str, Adapter]) -> None:
    name, a = adapter
    other = REFUSED_BY[name]
    with pytest.raises(InvalidAdapter) as refused:
        validate(a, model(other))
    reason = str(refused.value)
    assert "do not match the base model" in reason, reason
    # The catalog is given, so the refusal names the model the adapter is for.
    _, fits, hint = reason.partition("; it fits ")
    assert fits and name in hint.split(":")[0].split(", "), reason
    if name == "llama-3.1-8b-instruct":  # on the 70B model: its twin in shape is named with it
        assert f"it fits {name}" in reason and "mistral-7b-instruct-v0.3" in hint, reason


def test_an_adapter_trained_on_a_twin_in_shape_is_refused_by_its_config(tmp_path: Path) -> None:
    """Llama 3.1 8B and Mistral 7B v0.3 have the same shapes: an adapter whose config says it was
    trained on the catalog's Mistral is refused for the Llama, and accepted for the Mistral."""
    cfg = PUBLISHED["mistral-7b-instruct-v0.3"][1]
    path = tmp_path / "mistral.safetensors"
    modules = tuple(linear_modules(cfg))
    a = Adapter(path, write_adapter(path, cfg), peft_config("mistral-7b-instruct-v0.3", modules), modules)
    with pytest.raises(InvalidAdapter, match="trained on mistralai/Mistral-7B-Instruct-v0.3 .*MistralForCausalLM"):
        validate(a, model("llama-3.1-8b-instruct"))
    assert validate(a, model("mistral-7b-instruct-v0.3")).info.rank == RANK
    # Trained on the base model of the served one (not in the catalog): accepted.
    base = Adapter(path, a.size, a.config.replace(b"Mistral-7B-Instruct-v0.3", b"Mistral-7B-v0.3"), modules)
    assert validate(base, model("mistral-7b-instruct-v0.3")).info.rank == RANK
