"""Adapter validation: everything is checked before any worker sees a byte.

The safetensors header is parsed without loading tensors; names, pairs, ranks and
shapes are checked against the base model's architecture; an uploaded
`adapter_config.json` is read against a strict schema and never handed on as is.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from controlplane.errors import InvalidAdapter
from loraplane.catalog import Architecture
from loraplane.limits import DTYPE_BYTES

MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 4096
MAX_CONFIG_BYTES = 64 << 10
# How zip archives and pickles (torch.save's formats) begin: named in the refusal of a file that
# is not a safetensors file, never a reason for one (a safetensors header length of 640, 896,
# 1152 or 1408 bytes begins with the same two bytes as a pickle).
ZIP_OR_PICKLE = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

# base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
TENSOR_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d{1,5})\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$"
)
MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    target_modules: tuple[str, ...]
    tensor_count: int


@dataclass(frozen=True)
class AdapterConfig:
    rank: int | None
    lora_alpha: float | None
    target_modules: tuple[str, ...] | None
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r


# PEFT features vLLM does not serve (vllm/lora/peft_helper.py), each refused by name with why:
# {config field: (what it is, why not)} for a field whose value is anything but "off".
UNSERVED = {
    "use_dora": ("DoRA (use_dora)", "vLLM does not serve DoRA adapters"),
    "lora_bias": ("LoRA bias (lora_bias)", "vLLM does not serve LoRA bias terms"),
    "fan_in_fan_out": ("fan_in_fan_out", "its tensors are transposed (GPT-2-style Conv1D), which vLLM does not load"),
    "alora_invocation_tokens": ("Activated LoRA (alora_invocation_tokens)", "vLLM does not serve aLoRA"),
    "layer_replication": ("layer_replication", "vLLM does not replicate base model layers"),
    "use_qalora": ("QALoRA (use_qalora)", "vLLM does not serve QALoRA"),
    "use_bdlora": ("block-diagonal LoRA (use_bdlora)", "vLLM does not serve BD-LoRA"),
}
# init_lora_weights values that only set the starting weights (the saved adapter is a plain LoRA);
# the others (PiSSA, OLoRA, CorDA, LoftQ) change the base model's weights when PEFT loads it.
PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


def _not_safetensors(head: bytes, reason: str) -> InvalidAdapter:
    """The refusal of a file whose structure is not safetensors': named as a zip or pickle when
    it begins as one."""
    if head.startswith(ZIP_OR_PICKLE):
        reason = "not a safetensors file (looks like a zip or pickle); only adapter_model.safetensors is accepted"
    return InvalidAdapter(reason)


def read_header(f: BinaryIO, file_size: int) -> dict[str, dict[str, object]]:
    """The tensors of a safetensors file, with every structural check applied."""
    head = f.read(8)
    if len(head) < 8:
        raise InvalidAdapter("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER_BYTES:
        raise _not_safetensors(head, f"safetensors header length {n} is out of bounds (2..{MAX_HEADER_BYTES})")
    if 8 + n > file_size:
        raise _not_safetensors(head, "safetensors header length points past the end of the file")
    raw = f.read(n)
    try:
        header = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _not_safetensors(head, f"safetensors header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise InvalidAdapter("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidAdapter("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InvalidAdapter(f"too many tensors ({len(header)} > {MAX_TENSORS})")
    data_len = file_size - 8 - n
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise InvalidAdapter(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise InvalidAdapter(f"tensor {name!r}: dtype {dtype!r} not allowed (F16, BF16, F32)")
        if not (isinstance(shape, list) and all(_uint(d) for d in shape)):
            raise InvalidAdapter(f"tensor {name!r}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)):
            raise InvalidAdapter(f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise InvalidAdapter(f"tensor {name!r}: data_offsets out of bounds")
        if math.prod(shape) * DTYPE_BYTES[dtype] != end - begin:
            raise InvalidAdapter(f"tensor {name!r}: {end - begin} bytes do not match {dtype} {shape}")
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise InvalidAdapter(f"tensor {name!r}: data_offsets overlap or leave a gap")
        at = end
    if at != data_len:
        raise InvalidAdapter("safetensors data does not end where the last tensor does")
    return header


def check_lora(header: dict[str, dict[str, object]], arch: Architecture, max_rank: int) -> AdapterInfo:
    """PEFT LoRA names, A/B pairs, one rank ≤ max_rank, shapes of the base model."""
    if not header:
        raise InvalidAdapter("the adapter has no tensors")
    pairs: dict[tuple[int, str], dict[str, list[int]]] = {}
    for name, t in header.items():
        m = TENSOR_NAME.match(name)
        if not m:
            raise InvalidAdapter(f"tensor {name!r} is not a PEFT LoRA weight of a supported module")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if MODULE_PARENT[module] != parent:
            raise InvalidAdapter(f"tensor {name!r}: {module} is not under {parent}")
        if layer >= arch.num_hidden_layers:
            raise InvalidAdapter(
                f"tensor {name!r}: layer {layer} does not exist (base model has {arch.num_hidden_layers})"
            )
        shape = t["shape"]
        assert isinstance(shape, list)
        if len(shape) != 2:
            raise InvalidAdapter(f"tensor {name!r}: LoRA weights are 2-D, got shape {shape}")
        pairs.setdefault((layer, module), {})[ab] = shape
    ranks = set()
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"{where}: lora_A and lora_B must both be present")
        fan_in, fan_out = arch.module_shape(module)  # type: ignore[misc]
        (ra, in_a), (out_b, rb) = ab["A"], ab["B"]
        if ra != rb:
            raise InvalidAdapter(f"{where}: lora_A rank {ra} != lora_B rank {rb}")
        if in_a != fan_in or out_b != fan_out:
            raise InvalidAdapter(
                f"{where}: shapes A{ab['A']} B{ab['B']} do not match the base model "
                f"(expected A[r, {fan_in}] and B[{fan_out}, r])"
            )
        ranks.add(ra)
    if len(ranks) != 1:
        raise InvalidAdapter(f"modules have different ranks {sorted(ranks)}; one rank per adapter is supported")
    (rank,) = ranks
    if rank < 1:
        raise InvalidAdapter("rank must be at least 1")
    if rank > max_rank:
        raise InvalidAdapter(f"rank {rank} exceeds this base model's maximum of {max_rank}")
    return AdapterInfo(
        rank=rank,
        target_modules=tuple(sorted({m for _, m in pairs})),
        tensor_count=len(header),
    )


def parse_config(raw: bytes) -> AdapterConfig:
    """Read what we use from an uploaded adapter_config.json; refuse what we can't honour."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter("adapter_config.json must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter("adapter_config.json: peft_type must be LORA")
    for name, (feature, why) in UNSERVED.items():
        if cfg.get(name) not in (None, False, [], {}, 0):
            raise InvalidAdapter(f"adapter_config.json: {feature} is not supported: {why}")
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool) and not (isinstance(init, str) and init.lower() in PLAIN_INITS):
        raise InvalidAdapter(
            f"adapter_config.json: init_lora_weights={str(init)[:40]!r} is not supported: inits such as PiSSA, "
            "OLoRA, CorDA and LoftQ change the base model's weights when the adapter is loaded; convert the "
            "adapter to a plain LoRA (PEFT's path_initial_model_for_weight_conversion)"
        )
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapter(f"adapter_config.json: bias={str(cfg['bias'])[:40]!r} is not supported: vLLM serves "
                             'no bias terms of an adapter (only "none")')  # fmt: skip
    if cfg.get("modules_to_save") not in (None, []):
        raise InvalidAdapter(
            "adapter_config.json: modules_to_save is not supported: vLLM serves no fully trained copies of base "
            "model modules (lm_head, embed_tokens …) in an adapter"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field) not in (None, {}):
            raise InvalidAdapter(f"adapter_config.json: {field} is not supported by loraplane yet")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter("adapter_config.json: use_rslora must be true or false")
    rank = cfg.get("r")
    if rank is not None and not _uint(rank):
        raise InvalidAdapter("adapter_config.json: r must be a non-negative integer")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and not _positive_number(alpha):
        raise InvalidAdapter("adapter_config.json: lora_alpha must be a positive number")
    targets = cfg.get("target_modules")
    if targets is not None:
        if isinstance(targets, str) or not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise InvalidAdapter("adapter_config.json: target_modules must be a list of module names")
        targets = tuple(sorted(set(targets)))
    return AdapterConfig(
        rank=rank, lora_alpha=float(alpha) if alpha is not None else None, target_modules=targets, use_rslora=rslora
    )


def reconcile(info: AdapterInfo, cfg: AdapterConfig | None, lora_alpha: float | None) -> float:
    """Check a config against the tensors; the alpha to use (form field > config > rank)."""
    if cfg is not None:
        if cfg.rank is not None and cfg.rank != info.rank:
            raise InvalidAdapter(f"adapter_config.json says r={cfg.rank} but the tensors have rank {info.rank}")
        if cfg.target_modules is not None and not set(info.target_modules) <= set(cfg.target_modules):
            raise InvalidAdapter(
                f"adapter_config.json target_modules {list(cfg.target_modules)} do not cover "
                f"the tensors' modules {list(info.target_modules)}"
            )
    if lora_alpha is not None:
        if not _positive_number(lora_alpha):
            raise InvalidAdapter("lora_alpha must be a positive number")
        return float(lora_alpha)
    if cfg is not None and cfg.lora_alpha is not None:
        return cfg.lora_alpha
    return float(info.rank)


def clean_config(info: AdapterInfo, lora_alpha: float, use_rslora: bool = False) -> bytes:
    """The adapter_config.json workers get: written by us, only what vLLM needs, every field that
    changes the math included."""
    return json.dumps(
        {
            "peft_type": "LORA",
            "r": info.rank,
            "lora_alpha": lora_alpha,
            "target_modules": list(info.target_modules),
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": use_rslora,
            "use_dora": False,
            "modules_to_save": None,
        },
        sort_keys=True,
    ).encode()


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e6


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
