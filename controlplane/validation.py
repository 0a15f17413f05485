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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import regex

from controlplane.errors import InvalidAdapter
from loraplane.catalog import EMBED_TOKENS, LM_HEAD, Architecture, BaseModel, Catalog
from loraplane.limits import DTYPE_BYTES

MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 4096
MAX_CONFIG_BYTES = 64 << 10
# How zip archives and pickles (torch.save's formats) begin: named in the refusal of a file that
# is not a safetensors file, never a reason for one (a safetensors header length of 640, 896,
# 1152 or 1408 bytes begins with the same two bytes as a pickle).
ZIP_OR_PICKLE = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

# PEFT's name of a LoRA tensor: base_model.model.<module key>.<lora_A|lora_B>.weight for a linear
# layer, base_model.model.<module key>.<lora_embedding_A|lora_embedding_B> for an embedding.
TENSOR_NAME = re.compile(r"^base_model\.model\.([A-Za-z0-9_.]{1,200}?)\.(?:lora_([AB])\.weight|lora_embedding_([AB]))$")
# How PEFT names the tensors of features vLLM does not serve, for a file uploaded without its config.
TENSOR_FEATURES = [
    (re.compile(r"\.lora_magnitude_vector$"), "a DoRA magnitude (use_dora)"),
    (re.compile(r"\.lora_[AB]\.bias$"), "a LoRA bias (lora_bias)"),
    (re.compile(r"\.trainable_tokens_delta$"), "a trainable-tokens delta (trainable_token_indices)"),
    (
        re.compile(r"^base_model\.model\.(?!.*lora_).*\.(weight|bias)$"),
        "a full copy of a base model module (modules_to_save)",
    ),
]
# The base model's own embeddings, as PEFT saves them beside embedding LoRA (vLLM skips them).
BASE_EMBEDDINGS = {
    f"base_model.model.{EMBED_TOKENS}.base_layer.weight",
    f"base_model.model.{LM_HEAD}.base_layer.weight",
}
LAYER_MODULE = re.compile(r"^model\.layers\.(\d{1,5})\.(\w{1,32})\.(\w{1,32})$")
# User patterns (target_modules, rank_pattern …) are regular expressions PEFT applies: matched here
# with the `regex` module's time limit, bounded in size, and never handed on to a worker.
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 1024
PATTERN_TIMEOUT_S = 0.05


@dataclass(frozen=True)
class AdapterInfo:
    rank: int  # the largest
    target_modules: tuple[str, ...]  # short names: q_proj … lm_head, embed_tokens
    tensor_count: int
    ranks: tuple[tuple[str, int], ...] = ()  # (PEFT module key, rank), sorted


@dataclass(frozen=True)
class AdapterConfig:
    rank: int | None
    lora_alpha: float | None
    target_modules: tuple[str, ...] | str | None  # a list of names or paths, or one regex / "all-linear"
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    base_model: str = ""  # base_model_name_or_path: what it was trained on


@dataclass(frozen=True)
class Validated:
    info: AdapterInfo
    lora_alpha: float
    clean_config: bytes


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
    "trainable_token_indices": (
        "trainable tokens (trainable_token_indices)",
        "vLLM serves no retrained embedding rows in an adapter",
    ),
    "target_parameters": (
        "LoRA on parameters (target_parameters)",
        "loraplane serves LoRA on linear modules only, not on MoE experts",
    ),
    "monteclora_config": ("MonteCLoRA (monteclora_config)", "vLLM does not serve Monte Carlo LoRA"),
    "arrow_config": ("Arrow routing (arrow_config)", "vLLM does not route between LoRA experts"),
    "kasa_config": ("KaSA (kasa_config)", "KaSA changes the base model's weights, which vLLM does not do"),
    "modules_to_save": (
        "modules_to_save",
        "vLLM serves no fully trained copies of base model modules (lm_head, embed_tokens …) in an adapter",
    ),
}
# The variants PEFT configures with a sub-config object: any object turns it on, an empty one with
# its defaults (PEFT reads `{}` as the sub-config's dataclass, which is always true).
SUBCONFIGS = {"use_bdlora", "monteclora_config", "arrow_config", "kasa_config"}
# Every other field of PEFT's LoraConfig (0.21), read below or without effect on a served adapter
# (bookkeeping, dropout, training-time options, the configs of refused inits).
KNOWN_FIELDS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
    "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
}  # fmt: skip
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
    """PEFT LoRA names of modules the architecture has, A/B pairs, ranks ≤ max_rank, its shapes."""
    if not header:
        raise InvalidAdapter("the adapter has no tensors")
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, t in header.items():
        if name in BASE_EMBEDDINGS:
            _check_base_embedding(name, t, arch)
            continue
        m = TENSOR_NAME.match(name)
        if not m:
            feature = next((f for pattern, f in TENSOR_FEATURES if pattern.search(name)), "")
            if feature:
                raise InvalidAdapter(f"tensor {name!r} is {feature}, which vLLM does not serve")
            raise InvalidAdapter(f"tensor {name!r} is not a PEFT LoRA weight")
        key, ab, embedding = m[1], m[2] or m[3], m[3] is not None
        if embedding != (key == EMBED_TOKENS):
            raise InvalidAdapter(
                f"tensor {name!r}: PEFT names an embedding's weights lora_embedding_A/B and a linear layer's "
                "lora_A/B.weight"
            )
        shape = t["shape"]
        assert isinstance(shape, list)
        if len(shape) != 2:
            raise InvalidAdapter(f"tensor {name!r}: LoRA weights are 2-D, got shape {shape}")
        pairs.setdefault(key, {})[ab] = shape
    ranks: dict[str, int] = {}
    shorts = set()
    for key, ab in sorted(pairs.items()):
        short, fan_in, fan_out = _module(arch, key)
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"{key}: lora_A and lora_B must both be present")
        (ra, in_a), (out_b, rb) = ab["A"], ab["B"]
        if ra != rb:
            raise InvalidAdapter(f"{key}: lora_A rank {ra} != lora_B rank {rb}")
        if in_a != fan_in or out_b != fan_out:
            raise InvalidAdapter(
                f"{key}: shapes A{ab['A']} B{ab['B']} do not match the base model "
                f"(expected A[r, {fan_in}] and B[{fan_out}, r])"
            )
        if ra < 1:
            raise InvalidAdapter("rank must be at least 1")
        if ra > max_rank:
            raise InvalidAdapter(f"{key}: rank {ra} exceeds this base model's maximum of {max_rank}")
        ranks[key] = ra
        shorts.add(short)
    return AdapterInfo(
        rank=max(ranks.values()),
        target_modules=tuple(sorted(shorts)),
        tensor_count=len(header),
        ranks=tuple(sorted(ranks.items())),
    )


def _check_base_embedding(name: str, t: dict[str, object], arch: Architecture) -> None:
    """PEFT saves the base model's embeddings with an adapter that has LoRA on them (its
    save_embedding_layers): frozen copies, which vLLM skips. Accepted only in the base model's shape."""
    short = name.split(".")[-3]
    why = arch.embedding_lora()
    if why:
        raise InvalidAdapter(f"tensor {name!r}: LoRA on {short} is not supported for this base model: {why}")
    if t["shape"] != [arch.vocab_size, arch.hidden_size]:
        raise InvalidAdapter(
            f"tensor {name!r}: the adapter carries {short} of shape {t['shape']}, not the base model's "
            f"[{arch.vocab_size}, {arch.hidden_size}] (a resized vocabulary is not served)"
        )


def _module(arch: Architecture, key: str) -> tuple[str, int, int]:
    """A module key's short name and the dimensions its A and B multiply: (name, A's columns, B's rows)."""
    if key in (EMBED_TOKENS, LM_HEAD):
        short = key.rpartition(".")[2]
        why = arch.embedding_lora()
        if why:
            raise InvalidAdapter(f"LoRA on {short} is not supported for this base model: {why}")
        if key == EMBED_TOKENS:
            return short, arch.vocab_size, arch.hidden_size
        return short, arch.hidden_size, arch.vocab_size
    m = LAYER_MODULE.match(key)
    layers = arch.layer_modules()
    if not m:
        raise InvalidAdapter(f"{key!r} is not a LoRA-targetable module of {arch.name}")
    layer, parent, short = int(m[1]), m[2], m[3]
    if short not in layers:
        raise InvalidAdapter(
            f"{key}: {arch.name} has no LoRA-targetable {short} (its layers have {', '.join(layers)}); "
            "is the adapter for another architecture?"
        )
    if layers[short][0] != parent:
        raise InvalidAdapter(f"{key}: {short} is not under {parent}")
    if layer >= arch.num_hidden_layers:
        raise InvalidAdapter(f"{key}: layer {layer} does not exist (base model has {arch.num_hidden_layers})")
    return short, layers[short][1], layers[short][2]


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
        if _set(cfg.get(name)) or (name in SUBCONFIGS and isinstance(cfg.get(name), dict)):
            raise InvalidAdapter(f"adapter_config.json: {feature} is not supported: {why}")
    for name in sorted(set(cfg) - set(UNSERVED) - KNOWN_FIELDS):
        if _set(cfg[name]):
            raise InvalidAdapter(
                f"adapter_config.json: {name[:64]!r} is not supported: it is not a LoRA option loraplane knows "
                "(PEFT 0.21's), so it cannot tell whether it changes the adapter's output"
            )
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
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter("adapter_config.json: use_rslora must be true or false")
    rank = cfg.get("r")
    if rank is not None and not (_uint(rank) and rank > 0):
        raise InvalidAdapter("adapter_config.json: r must be a positive integer")
    alpha = cfg.get("lora_alpha")
    if alpha is not None and not _positive_number(alpha):
        raise InvalidAdapter("adapter_config.json: lora_alpha must be a positive number")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_uint(i) for i in layers)):
        raise InvalidAdapter("adapter_config.json: layers_to_transform must be a layer index or a list of them")
    return AdapterConfig(
        rank=rank,
        lora_alpha=float(alpha) if alpha is not None else None,
        target_modules=_names(cfg, "target_modules"),
        use_rslora=rslora,
        rank_pattern=_pattern(cfg, "rank_pattern", lambda v: _uint(v) and v > 0),  # type: ignore[operator]
        alpha_pattern=tuple((k, float(v)) for k, v in _pattern(cfg, "alpha_pattern", _positive_number)),
        exclude_modules=_names(cfg, "exclude_modules"),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=_names_list(cfg, "layers_pattern"),
        base_model=str(cfg.get("base_model_name_or_path") or "")[:200],
    )


def _set(value: object) -> bool:
    """Whether a config field is set to something other than off / empty."""
    return value not in (None, False, [], {}, 0, "")


def _pattern_text(value: object, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATTERN_CHARS:
        raise InvalidAdapter(f"adapter_config.json: {field} must hold names of 1-{MAX_PATTERN_CHARS} characters")
    try:
        regex.compile(value)
    except (regex.error, RecursionError, OverflowError) as err:
        raise InvalidAdapter(
            f"adapter_config.json: {field}: {value[:64]!r} is not a regular expression: {err}"
        ) from None
    return value


def _names(cfg: dict[str, object], field: str) -> tuple[str, ...] | str | None:
    """A field PEFT reads as one regular expression (a string) or a list of names (or suffixes)."""
    value = cfg.get(field)
    if value is None or isinstance(value, str):
        return None if value is None else _pattern_text(value, field)
    return _names_list(cfg, field)


def _names_list(cfg: dict[str, object], field: str) -> tuple[str, ...]:
    value = cfg.get(field) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise InvalidAdapter(f"adapter_config.json: {field} must be a list of at most {MAX_PATTERNS} names")
    return tuple(sorted({_pattern_text(v, field) for v in value}))


def _pattern(cfg: dict[str, object], field: str, valid: Callable[[object], bool]) -> tuple[tuple[str, Any], ...]:
    """PEFT's {module pattern: value}, in its order (the first pattern that matches wins)."""
    value = cfg.get(field) or {}
    if not isinstance(value, dict) or len(value) > MAX_PATTERNS:
        raise InvalidAdapter(f"adapter_config.json: {field} must be an object of at most {MAX_PATTERNS} patterns")
    for key, v in value.items():
        _pattern_text(key, field)
        if not valid(v):
            raise InvalidAdapter(f"adapter_config.json: {field}[{key[:64]!r}] must be a positive number")
    return tuple(value.items())


def _matches(pattern: str, template: str, key: str, field: str) -> regex.Match[str] | None:
    """`template` (with `{}` for the user's pattern) matched against a module key, time-bounded."""
    try:
        return regex.match(template.replace("{}", pattern), key, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise InvalidAdapter(f"adapter_config.json: {field}: {pattern[:64]!r} takes too long to match") from None


def _lookup(patterns: tuple[tuple[str, Any], ...], key: str, field: str) -> Any:
    """PEFT's rule for rank_pattern and alpha_pattern: the first key that matches a suffix of the
    module's name at a "." boundary."""
    for pattern, value in patterns:
        if _matches(pattern, r"(.*\.)?({})$", key, field):
            return value
    return None


def _in(names: tuple[str, ...] | str, key: str, field: str, all_linear: bool) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a regular expression the
    whole key must match ("all-linear": every linear layer but the output); a list names keys or
    their suffixes."""
    if isinstance(names, str):
        if names == "all-linear":
            return all_linear
        return _matches(names, r"(?:{})\Z", key, field) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def _targeted(cfg: AdapterConfig, key: str) -> bool:
    """Whether PEFT, loading the adapter with this config, puts a LoRA layer on module `key`."""
    all_linear = LAYER_MODULE.match(key) is not None
    if cfg.exclude_modules is not None and _in(cfg.exclude_modules, key, "exclude_modules", all_linear):
        return False
    assert cfg.target_modules is not None
    if not _in(cfg.target_modules, key, "target_modules", all_linear):
        return False
    if isinstance(cfg.target_modules, str) or cfg.layers_to_transform is None:
        return True
    found = None
    for pattern in cfg.layers_pattern or ("[^.]*",):
        found = _matches(pattern, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", key, "layers_pattern")
        if found:
            break
    return found is not None and int(found["idx"]) in cfg.layers_to_transform


def scaling(info: AdapterInfo, cfg: AdapterConfig | None, lora_alpha: float | None) -> dict[str, tuple[int, float]]:
    """Each module's (rank, alpha) as PEFT computes them, after checking the config against the
    tensors; the base alpha is the form field's, else the config's, else the rank."""
    if lora_alpha is not None and not _positive_number(lora_alpha):
        raise InvalidAdapter("lora_alpha must be a positive number")
    ranks = dict(info.ranks)
    if cfg is None:
        if len(set(ranks.values())) > 1:
            raise InvalidAdapter(
                f"modules have different ranks {sorted(set(ranks.values()))}; upload the adapter's "
                "adapter_config.json (with its rank_pattern) so each is scaled as it was trained"
            )
        cfg = AdapterConfig(rank=None, lora_alpha=None, target_modules=None)
    out = {}
    for key, rank in ranks.items():
        if cfg.target_modules is not None and not _targeted(cfg, key):
            raise InvalidAdapter(
                f"adapter_config.json target_modules {_shown(cfg.target_modules)} do not cover the tensors' "
                f"module {key} (PEFT would not load its weights)"
            )
        expected = _lookup(cfg.rank_pattern, key, "rank_pattern") or cfg.rank
        if expected is not None and expected != rank:
            said = "rank_pattern" if expected != cfg.rank else f"r={cfg.rank}"
            raise InvalidAdapter(f"adapter_config.json says {said} for {key} but the tensors have rank {rank}")
        alpha = _lookup(cfg.alpha_pattern, key, "alpha_pattern")
        if alpha is None:
            alpha = lora_alpha if lora_alpha is not None else cfg.lora_alpha
        out[key] = (rank, float(alpha if alpha is not None else cfg.rank or rank))
    return out


def _shown(names: tuple[str, ...] | str) -> str:
    return repr(names[:64]) if isinstance(names, str) else str(list(names[:8]))[:200]


def common(modules: dict[str, tuple[int, float]]) -> tuple[int, float]:
    """The rank and the alpha most modules have."""
    r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return r, alpha


def clean_config(info: AdapterInfo, modules: dict[str, tuple[int, float]], use_rslora: bool = False) -> bytes:
    """The adapter_config.json workers get: written by us, only what vLLM needs, every field that
    changes the math included. `r` and `lora_alpha` are the most common rank and alpha; a module
    with another gets an exact entry in rank_pattern / alpha_pattern (no user pattern is handed on)."""
    r, alpha = common(modules)
    return json.dumps(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": list(info.target_modules),
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "use_rslora": use_rslora,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {re.escape(k): rank for k, (rank, _) in sorted(modules.items()) if rank != r},
            "alpha_pattern": {re.escape(k): a for k, (_, a) in sorted(modules.items()) if a != alpha},
        },
        sort_keys=True,
    ).encode()


def validate(
    f: BinaryIO,
    size: int,
    model: BaseModel,
    config: bytes | None,
    lora_alpha: float | None,
    catalog: Catalog | None = None,
) -> Validated:
    """Every check of an adapter's file and config for a base model; what workers get (blocking).
    A file that does not fit the model is refused with the catalog's models it does fit named."""
    assert model.architecture is not None
    cfg = parse_config(config) if config else None  # first: a refused feature is named as such
    header = read_header(f, size)
    try:
        info = check_lora(header, model.architecture, model.max_rank)
    except InvalidAdapter as err:
        fits = [m.name for m in (catalog.models.values() if catalog else ()) if m != model and _fits(header, m)]
        if fits:
            raise InvalidAdapter(f"{err}; it fits {', '.join(fits[:5])}: is it for that base model?") from None
        raise
    if cfg and cfg.base_model and catalog:
        _check_trained_on(cfg.base_model, model, catalog)
    modules = scaling(info, cfg, lora_alpha)
    return Validated(info, common(modules)[1], clean_config(info, modules, cfg is not None and cfg.use_rslora))


def _check_trained_on(repo: str, model: BaseModel, catalog: Catalog) -> None:
    """Shapes alike are not models alike (Llama 3.1 8B and Mistral 7B have the same): an adapter
    whose config names a catalog model of another architecture is refused."""
    assert model.architecture is not None
    for other in catalog.models.values():
        arch = other.architecture
        if other.repo.lower() == repo.lower() and arch and arch.name != model.architecture.name:
            raise InvalidAdapter(
                f"adapter_config.json says it was trained on {repo} ({other.name}, {arch.name}); "
                f"{model.name} is {model.architecture.name}: it would not compute what it was trained to"
            )


def _fits(header: dict[str, dict[str, object]], model: BaseModel) -> bool:
    if not model.lora or model.architecture is None:
        return False
    try:
        check_lora(header, model.architecture, model.max_rank)
    except InvalidAdapter:
        return False
    return True


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53


def _positive_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e6


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
