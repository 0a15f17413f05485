from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import validation
from controlplane.errors import InvalidAdapter
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
        ({A.replace("q_proj", "lm_head"): ("F32", [8, 256])}, "not a PEFT LoRA weight"),
        ({A.replace("self_attn", "mlp"): ("F32", [8, 256])}, "is not under mlp"),
        (lora_tensors(layers=3), "layer 2 does not exist"),
        (_without(lora_tensors(), "lora_B.weight"), "must both be present"),
        (lora_tensors(rank=65), "exceeds this base model's maximum of 64"),
        (lora_tensors(rank=0), "rank must be at least 1"),
        ({A: ("F32", [8, 128]), B: ("F32", [256, 8])}, "do not match the base model"),
        ({A: ("F32", [8, 256]), B: ("F32", [256, 4])}, "lora_A rank 8 != lora_B rank 4"),
        ({A: ("F32", [8, 256, 1]), B: ("F32", [256, 8])}, "2-D"),
        (
            {**lora_tensors(rank=8, modules=("q_proj",)), **lora_tensors(rank=4, modules=("v_proj",))},
            "different ranks",
        ),
    ],
)
def test_wrong_lora_is_refused_with_the_reason(tensors: dict[str, tuple[str, list[int]]], reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=reason):
        check(safetensors_bytes(tensors))


def test_rank_limit_is_the_base_models() -> None:
    with pytest.raises(InvalidAdapter, match="maximum of 4"):
        check(safetensors_bytes(lora_tensors(rank=8)), max_rank=4)


INFO = validation.AdapterInfo(rank=8, target_modules=("q_proj", "v_proj"), tensor_count=8)


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
        (b'{"bias": "all"}', "bias='all' is not supported"),
        (b'{"use_rslora": "yes"}', "use_rslora must be true or false"),
        (b'{"r": "8"}', "r must be a non-negative integer"),
        (b'{"lora_alpha": "16"}', "lora_alpha must be a positive number"),
        (b'{"lora_alpha": 1e308}', "lora_alpha must be a positive number"),
        (b'{"target_modules": "q_proj"}', "target_modules must be a list"),
        (b'{"modules_to_save": ["lm_head"]}', "modules_to_save is not supported: vLLM serves no fully trained"),
        (b'{"rank_pattern": {"q_proj": 4}}', "rank_pattern is not supported"),
        (b"[" * 100000 + b"]" * 100000, "larger than"),
    ],
)
def test_hostile_or_unsupported_config_is_refused(config: bytes, reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=reason):
        validation.parse_config(config)


def test_config_must_agree_with_the_tensors() -> None:
    with pytest.raises(InvalidAdapter, match="r=16 but the tensors have rank 8"):
        validation.reconcile(INFO, validation.parse_config(b'{"r": 16}'), None)
    with pytest.raises(InvalidAdapter, match="do not cover"):
        validation.reconcile(INFO, validation.parse_config(b'{"target_modules": ["q_proj"]}'), None)


def test_alpha_comes_from_the_form_then_the_config_then_the_rank() -> None:
    cfg = validation.parse_config(b'{"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}')
    assert validation.reconcile(INFO, cfg, 4.0) == 4.0
    assert validation.reconcile(INFO, cfg, None) == 32.0
    assert validation.reconcile(INFO, None, None) == 8.0


def test_the_config_workers_get_is_ours() -> None:
    raw = validation.clean_config(INFO, 16.0)
    cfg = json.loads(raw)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and cfg["target_modules"] == ["q_proj", "v_proj"]
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


def test_an_rslora_adapter_is_served_with_the_scaling_peft_defines() -> None:
    """PEFT's own config for rsLoRA (and the plain inits vLLM takes) is accepted, and the config
    workers get makes vLLM's own PEFTHelper scale by alpha / sqrt(r), as PEFT does."""
    import math

    from peft import LoraConfig
    from vllm.lora.peft_helper import PEFTHelper

    written = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True).to_dict()
    written = {k: sorted(v) if isinstance(v, set) else v for k, v in written.items()}  # as PEFT saves it
    cfg = validation.parse_config(json.dumps(written).encode())
    assert cfg.use_rslora
    alpha = validation.reconcile(INFO, cfg, None)
    clean = json.loads(validation.clean_config(INFO, alpha, cfg.use_rslora))
    assert PEFTHelper.from_dict(clean).vllm_lora_scaling_factor == pytest.approx(16 / math.sqrt(8))
    plain = json.loads(validation.clean_config(INFO, alpha))
    assert PEFTHelper.from_dict(plain).vllm_lora_scaling_factor == pytest.approx(16 / 8)
    for init in ("gaussian", "eva", "orthogonal", True, False):
        assert validation.parse_config(json.dumps({"init_lora_weights": init}).encode()).use_rslora is False
