from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import validation
from controlplane.errors import InvalidAdapter
from loraplane.catalog import Architecture, BaseModel, Catalog
from tests.support import TINY, lora_tensors, safetensors_bytes


def check(data: bytes, max_rank: int = 64) -> validation.AdapterInfo:
    header = validation.read_header(io.BytesIO(data), len(data))
    return validation.check_lora(header, TINY, max_rank)


def test_a_well_formed_adapter_passes_with_rank_and_modules() -> None:
    info = check(safetensors_bytes(lora_tensors(rank=8, modules=("q_proj", "v_proj", "down_proj"))))
    assert info.rank == 8
    assert info.target_modules == ("down_proj", "q_proj", "v_proj")
    assert info.tensor_count == 12


@contextlib.contextmanager
def safe_open_bytes(data: bytes) -> Iterator[Path]:
    """`data` in a file, for a reader that wants a path."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adapter_model.safetensors"
        path.write_bytes(data)
        yield path


def _raw(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"\x05\x00", "shorter than"),
        (struct.pack("<Q", 0), "out of bounds"),
        (struct.pack("<Q", 2**64 - 1), "out of bounds"),
        (struct.pack("<Q", 100) + b"{}", "past the end"),
        (b"PK\x03\x04" + b"\0" * 100, "zip or pickle"),
        (b"\x80\x04\x95" + b"\0" * 100, "zip or pickle"),
        (_raw(b"{not json"), "not valid JSON"),
        (_raw(b'{"x": NaN}'), "not valid JSON"),
        (_raw([1, 2]), "not a JSON object"),
        (_raw({A: {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'I64' not allowed"),
        (_raw({A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "do not match"),
        (_raw({A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "does not end"),
        (_raw({A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 99]}}, b"\0" * 4), "out of bounds"),
        (_raw({A: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
        (_raw({A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4), "exactly"),
        (
            _raw(
                {
                    A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    B: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 8,
            ),
            "overlap or leave a gap",
        ),
        (
            _raw(
                {
                    A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    B: {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                b"\0" * 12,
            ),
            "overlap or leave a gap",
        ),
    ],
)
def test_malformed_safetensors_is_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=reason):
        validation.read_header(io.BytesIO(data), len(data))


def _without(tensors: dict[str, tuple[str, list[int]]], suffix: str) -> dict[str, tuple[str, list[int]]]:
    return {k: v for k, v in tensors.items() if not k.endswith(suffix)}


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({}, "no tensors"),
        ({"model.layers.0.q_proj.weight": ("F32", [4, 4])}, "not a PEFT LoRA weight"),
        ({A.replace("q_proj", "lm_head"): ("F32", [8, 256])}, "LlamaForCausalLM has no LoRA-targetable lm_head"),
        ({A.replace("q_proj", "qkv_proj"): ("F32", [8, 256])}, "is the adapter for another architecture"),
        ({A.replace("layers.0", "layers.x"): ("F32", [8, 256])}, "not a LoRA-targetable module"),
        ({"base_model.model.model.embed_tokens.lora_A.weight": ("F32", [8, 256])}, "lora_embedding_A/B"),
        ({A.replace("lora_A.weight", "lora_embedding_A"): ("F32", [8, 256])}, "lora_embedding_A/B"),
        ({A.replace("lora_A.weight", "lora_magnitude_vector"): ("F32", [256])}, r"a DoRA magnitude \(use_dora\)"),
        ({B.replace("weight", "bias"): ("F32", [256])}, r"a LoRA bias \(lora_bias\), which vLLM does not serve"),
        ({"base_model.model.lm_head.weight": ("F32", [512, 256])}, r"a full copy of a base model module"),
        (
            {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": ("F32", [2, 256])},
            r"trainable-tokens delta",
        ),
        ({A.replace("self_attn", "mlp"): ("F32", [8, 256])}, "is not under mlp"),
        (lora_tensors(layers=3), "layer 2 does not exist"),
        (_without(lora_tensors(), "lora_B.weight"), "must both be present"),
        (lora_tensors(rank=65), "exceeds this base model's maximum of 64"),
        (lora_tensors(rank=0), "rank must be at least 1"),
        ({A: ("F32", [8, 128]), B: ("F32", [256, 8])}, "do not match the base model"),
        ({A: ("F32", [8, 256]), B: ("F32", [256, 4])}, "lora_A rank 8 != lora_B rank 4"),
        ({A: ("F32", [8, 256, 1]), B: ("F32", [256, 8])}, "2-D"),
    ],
)
def test_wrong_lora_is_refused_with_the_reason(tensors: dict[str, tuple[str, list[int]]], reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=reason):
        check(safetensors_bytes(tensors))


def test_rank_limit_is_the_base_models() -> None:
    with pytest.raises(InvalidAdapter, match="maximum of 4"):
        check(safetensors_bytes(lora_tensors(rank=8)), max_rank=4)


# Phi-3 mini 4k instruct's published config.json, as far as adapters are concerned.
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False,
}  # fmt: skip
TINY_MODEL = BaseModel("tiny-llama", "chat", "/models/tiny-llama", True, 64, 8, TINY)


def validate(
    tensors: dict[str, tuple[str, list[int]]],
    config: dict[str, Any] | None = None,
    lora_alpha: float | None = None,
    model: BaseModel = TINY_MODEL,
    catalog: Catalog | None = None,
) -> validation.Validated:
    data = safetensors_bytes(tensors)
    raw = json.dumps(config).encode() if config is not None else None
    return validation.validate(io.BytesIO(data), len(data), model, raw, lora_alpha, catalog)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (b"[]", "must be a JSON object"),
        (b'{"r": NaN}', "not valid JSON"),
        (b'{"peft_type": "IA3"}', "peft_type must be LORA"),
        (b'{"use_dora": true}', r"DoRA \(use_dora\) is not supported: vLLM does not serve DoRA"),
        (b'{"lora_bias": true}', r"LoRA bias \(lora_bias\) is not supported"),
        (b'{"fan_in_fan_out": true}', "fan_in_fan_out is not supported: its tensors are transposed"),
        (b'{"alora_invocation_tokens": [1, 2]}', r"Activated LoRA \(alora_invocation_tokens\) is not supported"),
        (b'{"layer_replication": [[0, 2]]}', "layer_replication is not supported"),
        (b'{"init_lora_weights": "pissa"}', "init_lora_weights='pissa' is not supported: inits such as PiSSA"),
        (b'{"init_lora_weights": "loftq"}', "init_lora_weights='loftq' is not supported"),
        (b'{"init_lora_weights": "olora"}', "init_lora_weights='olora' is not supported: inits such as PiSSA, OLoRA"),
        (b'{"init_lora_weights": "corda"}', "init_lora_weights='corda' is not supported: inits such as PiSSA"),
        (b'{"use_qalora": true}', r"QALoRA \(use_qalora\) is not supported: vLLM does not serve QALoRA"),
        (
            b'{"use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["o_proj"], "nblocks": 2}}',
            r"block-diagonal LoRA \(use_bdlora\) is not supported: vLLM does not serve BD-LoRA",
        ),
        (
            b'{"monteclora_config": {"num_samples": 8, "use_entropy": false, "dirichlet_prior": 0.1}}',
            r"MonteCLoRA \(monteclora_config\) is not supported: vLLM does not serve Monte Carlo LoRA",
        ),
        (
            b'{"arrow_config": {"top_k": 3, "router_temperature": 1.0, "use_gks": false}}',
            r"Arrow routing \(arrow_config\) is not supported: vLLM does not route between LoRA experts",
        ),
        # PEFT reads an empty sub-config as one with its defaults: the variant is on.
        (b'{"use_bdlora": {}}', r"block-diagonal LoRA \(use_bdlora\) is not supported"),
        (b'{"monteclora_config": {}}', r"MonteCLoRA \(monteclora_config\) is not supported"),
        (b'{"arrow_config": {}}', r"Arrow routing \(arrow_config\) is not supported"),
        (b'{"kasa_config": {}}', r"KaSA \(kasa_config\) is not supported"),
        (b'{"bias": "all"}', "bias='all' is not supported"),
        (b'{"use_rslora": "yes"}', "use_rslora must be true or false"),
        (b'{"r": "8"}', "r must be a positive integer"),
        (b'{"r": 0}', "r must be a positive integer"),
        (b'{"lora_alpha": "16"}', "lora_alpha must be a positive number"),
        (b'{"lora_alpha": 1e308}', "lora_alpha must be a positive number"),
        (b'{"target_modules": "(q_proj"}', "is not a regular expression"),
        (b'{"target_modules": [1]}', "target_modules must hold names"),
        (b'{"target_modules": {"q_proj": 1}}', "target_modules must be a list"),
        (b'{"exclude_modules": ["' + b"x" * 600 + b'"]}', "exclude_modules must hold names of 1-512"),
        (b'{"layers_to_transform": [-1]}', "layers_to_transform must be"),
        (b'{"rank_pattern": {"q_proj": 0}}', r"rank_pattern\['q_proj'\] must be a positive number"),
        (b'{"rank_pattern": ["q_proj"]}', "rank_pattern must be an object"),
        (b'{"alpha_pattern": {"q_proj": "16"}}', "alpha_pattern"),
        (b'{"trainable_token_indices": [1, 2]}', r"trainable tokens \(trainable_token_indices\) is not supported"),
        (b'{"target_parameters": ["experts.gate_up_proj"]}', "target_parameters"),
        (b'{"kasa_config": {"x": 1}}', "KaSA"),
        (b'{"future_lora_option": true}', "'future_lora_option' is not supported: it is not a LoRA option"),
        (b'{"modules_to_save": ["lm_head"]}', "modules_to_save is not supported: vLLM serves no fully trained"),
        (b"[" * 100000 + b"]" * 100000, "larger than"),
    ],
)
def test_hostile_or_unsupported_config_is_refused(config: bytes, reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=reason):
        validation.parse_config(config)


def test_config_must_agree_with_the_tensors() -> None:
    with pytest.raises(InvalidAdapter, match="r=16 for model.layers.0.self_attn.q_proj but the tensors have rank 8"):
        validate(lora_tensors(), {"r": 16})
    with pytest.raises(InvalidAdapter, match="do not cover the tensors' module model.layers.0.self_attn.v_proj"):
        validate(lora_tensors(), {"target_modules": ["q_proj"]})


def test_alpha_comes_from_the_form_then_the_config_then_the_rank() -> None:
    config = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    assert validate(lora_tensors(), config, 4.0).lora_alpha == 4.0
    assert validate(lora_tensors(), config).lora_alpha == 32.0
    assert validate(lora_tensors()).lora_alpha == 8.0


def test_the_config_workers_get_is_ours() -> None:
    cfg = json.loads(validate(lora_tensors(), {"lora_alpha": 16, "base_model_name_or_path": "x"}).clean_config)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert "auto_mapping" not in cfg and "base_model_name_or_path" not in cfg


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_a_header_length_that_begins_like_a_pickle_is_still_a_safetensors_file(length: int) -> None:
    """A header of 640 bytes is `80 02 00 …` little-endian: pickle protocol 2's first two bytes.
    The file is valid (safetensors itself reads it): accepted, never refused for a byte pattern."""
    from safetensors import safe_open

    data = safetensors_bytes(lora_tensors(rank=4, modules=("q_proj",)))
    (n,) = struct.unpack("<Q", data[:8])
    assert n <= length
    padded = struct.pack("<Q", length) + data[8 : 8 + n] + b" " * (length - n) + data[8 + n :]  # as safetensors pads
    assert padded[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    with safe_open_bytes(padded) as path, safe_open(str(path), framework="numpy") as f:
        assert len(list(f.keys())) == 4  # A and B, two layers
    assert check(padded).rank == 4


# PEFT configurations trainers write, each saved by PEFT itself for tiny-llama: the config workers
# get must make vLLM's PEFTHelper give every module the rank and scaling PEFT gives it.
PEFT_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "rsLoRA": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "all-linear": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "rank and alpha patterns": {
        "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
        "rank_pattern": {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        "alpha_pattern": {"down_proj": 32, "^model.layers.0.self_attn.v_proj": 3},
    },
    "patterns with rsLoRA": {
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj"], "use_rslora": True,
        "rank_pattern": {"o_proj": 16}, "alpha_pattern": {"layers.1.self_attn.q_proj": 64},
    },
    "a regular expression": {"r": 4, "target_modules": r".*\.(q_proj|v_proj)"},
    "full module paths": {"r": 4, "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]},
    "layers_to_transform": {"r": 4, "target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
    "layers_pattern": {
        "r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers",
    },
    "exclude_modules": {"r": 4, "target_modules": "all-linear", "exclude_modules": ["down_proj", "gate_proj"]},
    "embeddings and lm_head": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens", "lm_head"]},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> BaseModel:
    arch = Architecture.from_model_config(json.loads((tiny_model / "config.json").read_text()))
    return BaseModel("tiny-llama", "chat", str(tiny_model), True, 64, 8, arch)


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_every_module_gets_the_rank_and_scaling_peft_gives_it(
    name: str, tiny_model: Path, tiny: BaseModel, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm.lora.peft_helper import PEFTHelper

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(**PEFT_CONFIGS[name]))
    peft_says = {
        module_name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for module_name, module in model.named_modules()
        if isinstance(getattr(module, "r", None), dict) and "default" in module.r
    }
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_()
    with warnings.catch_warnings():  # PEFT saves the base embeddings beside embedding LoRA, and says so
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with weights.open("rb") as f:
        found = validation.validate(
            f, weights.stat().st_size, tiny, (tmp_path / "adapter_config.json").read_bytes(), None
        )
    assert {key for key, _ in found.info.ranks} == set(peft_says)
    vllm = PEFTHelper.from_dict(json.loads(found.clean_config))
    for module_name, (rank, scale) in peft_says.items():
        served_rank, served_scale = vllm.get_rank_and_scaling(module_name)
        assert served_rank == rank and served_scale == pytest.approx(scale), module_name


def test_the_plain_inits_vllm_takes_are_accepted() -> None:
    for init in ("gaussian", "eva", "orthogonal", "mica", "lora_ga", True, False):
        assert validation.parse_config(json.dumps({"init_lora_weights": init}).encode()).use_rslora is False


def test_layers_pattern_names_the_layer_list_layers_to_transform_counts_in() -> None:
    """PEFT finds a module's layer index after `<layers_pattern>.`: a pattern that names the model's
    layer list is accepted, one that names another model's (GPT-2's `h`) leaves the tensors uncovered."""
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1]}
    for pattern in ("layers", ["layers"], ["h", "layers"]):
        assert validate(lora_tensors(), config | {"layers_pattern": pattern}).info.rank == 8
    with pytest.raises(InvalidAdapter, match="do not cover the tensors' module model.layers.0.self_attn.q_proj"):
        validate(lora_tensors(), config | {"layers_pattern": ["h"]})
    with pytest.raises(InvalidAdapter, match="do not cover the tensors' module model.layers.0.self_attn.q_proj"):
        validate(lora_tensors(), config | {"layers_to_transform": [1], "layers_pattern": "layers"})


def test_modules_of_different_ranks_need_the_config_that_says_so() -> None:
    mixed = {**lora_tensors(rank=8, modules=("q_proj",)), **lora_tensors(rank=4, modules=("v_proj",))}
    with pytest.raises(InvalidAdapter, match=r"different ranks \[4, 8\]; upload the adapter's adapter_config.json"):
        validate(mixed)
    with pytest.raises(
        InvalidAdapter, match="says r=8 for model.layers.0.self_attn.v_proj but the tensors have rank 4"
    ):
        validate(mixed, {"r": 8})
    found = validate(mixed, {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}})
    assert found.info.rank == 8
    assert json.loads(found.clean_config)["rank_pattern"] == {
        r"model\.layers\.0\.self_attn\.v_proj": 4,
        r"model\.layers\.1\.self_attn\.v_proj": 4,
    }


def test_a_pattern_that_takes_long_to_match_is_refused_quickly() -> None:
    """Patterns are the uploader's regular expressions: matched under a time limit, and never
    handed on (workers get exact, escaped module names)."""
    started = time.monotonic()
    for pattern in [r"(.*a){25}", r"(x+x+)+y", r"(.*.*)*\.q_proj$"]:
        with contextlib.suppress(InvalidAdapter):
            validate(lora_tensors(), {"target_modules": pattern})
        with contextlib.suppress(InvalidAdapter):
            validate(lora_tensors(), {"rank_pattern": {pattern: 8}})
    assert time.monotonic() - started < 2


def test_phi3s_fused_projections_are_its_lora_targets() -> None:
    phi3 = Architecture.from_model_config(PHI3_MINI)
    tensors = lora_tensors(rank=16, modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), arch=phi3)
    assert tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] == ("F32", [3 * 3072, 16])
    assert tensors["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"] == ("F32", [2 * 8192, 16])
    model = BaseModel("phi-3-mini", "chat", "/models/phi-3-mini", True, 64, 8, phi3)
    assert validate(tensors, model=model).info.target_modules == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")
    with pytest.raises(InvalidAdapter, match="Phi3ForCausalLM has no LoRA-targetable q_proj"):
        validate(
            lora_tensors(modules=("q_proj",), arch=dataclasses.replace(phi3, name="LlamaForCausalLM")), model=model
        )


def test_a_shape_mismatch_names_the_catalog_model_the_adapter_fits(tiny: BaseModel) -> None:
    phi3 = BaseModel("phi-3-mini", "chat", "/p", True, 64, 8, Architecture.from_model_config(PHI3_MINI))
    catalog = Catalog({"tiny-llama": tiny, "phi-3-mini": phi3})
    tensors = lora_tensors(rank=8, modules=("o_proj",), arch=phi3.architecture)  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapter, match="do not match the base model .*; it fits phi-3-mini"):
        validate(tensors, model=tiny, catalog=catalog)


@pytest.mark.parametrize(
    ("arch", "reason"),
    [
        ({"architectures": ["Qwen2ForCausalLM"]}, "vLLM serves no LoRA on the embeddings of Qwen2ForCausalLM"),
        ({"architectures": ["MistralForCausalLM"]}, "vLLM serves no LoRA on the embeddings of MistralForCausalLM"),
        (
            {"architectures": ["GemmaForCausalLM"], "tie_word_embeddings": True},
            "vLLM serves no LoRA on the embeddings of GemmaForCausalLM",
        ),
        (
            {"architectures": ["Gemma2ForCausalLM"], "tie_word_embeddings": True},
            "vLLM serves no LoRA on the embeddings of Gemma2ForCausalLM",
        ),
        (
            {"architectures": ["Gemma3ForCausalLM"], "tie_word_embeddings": True},
            "vLLM serves no LoRA on the embeddings of Gemma3ForCausalLM",
        ),
        ({"tie_word_embeddings": True}, "it ties its input and output embeddings"),
        ({"vocab_size": None}, "the catalog gives no vocab_size"),
    ],
)
def test_embedding_lora_is_refused_where_vllm_does_not_serve_it(
    tiny: BaseModel, arch: dict[str, Any], reason: str
) -> None:
    assert tiny.architecture is not None
    base = {**dataclasses.asdict(tiny.architecture), "architectures": [tiny.architecture.name]}
    cfg = {k: v for k, v in (base | arch).items() if v is not None and k != "name"}
    model = dataclasses.replace(tiny, architecture=Architecture.from_model_config(cfg))
    tensors = {
        "base_model.model.lm_head.lora_A.weight": ("F32", [8, 256]),
        "base_model.model.lm_head.lora_B.weight": ("F32", [tiny.architecture.vocab_size, 8]),
    }
    with pytest.raises(InvalidAdapter, match=f"LoRA on lm_head is not supported for this base model: {reason}"):
        validate(tensors, model=model)
