"""Generated hostile adapters against the validator: every case is accepted or refused with
InvalidAdapter (a 422 with its reason), nothing else escapes, and each answers quickly.
A seeded few hundred cases per test by default; LORAPLANE_FUZZ_EXAMPLES=10000 for the long run."""

from __future__ import annotations

import io
import json
import os
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.errors import InvalidAdapter
from controlplane.validation import check_lora, parse_config, read_header, validate
from loraplane import tinymodel
from loraplane.catalog import Architecture, BaseModel
from tests.support import TINY, figure, lora_tensors, safetensors_bytes

EXAMPLES = int(os.environ.get("LORAPLANE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "x"]

ints = st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 256, 2**63, 2**64]))
json_scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=20))
names = st.one_of(
    st.builds(
        lambda layer, parent, module, ab: f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight",
        st.one_of(st.integers(-1, 3), st.text(max_size=3)), st.sampled_from(["self_attn", "mlp", "x"]),
        st.sampled_from(MODULES), st.sampled_from(["A", "B", "C"]),
    ),
    st.text(max_size=40),
)  # fmt: skip
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "F64", ""]), json_scalars),
        "shape": st.one_of(st.lists(ints, max_size=6), json_scalars),
        "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), json_scalars),
        "extra": json_scalars,
    },
)
headers = st.dictionaries(names, st.one_of(entries, json_scalars), max_size=8)


def body(header: object, data: bytes, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


TRIED = [0]


@pytest.fixture(scope="module", autouse=True)
def count() -> Iterator[None]:
    yield
    figure("hostile adapter files and configs tried on the validator (all refused or valid, none crashed)", TRIED[0])


def judge(blob: bytes) -> None:
    TRIED[0] += 1
    started = time.monotonic()
    try:
        tensors = read_header(io.BytesIO(blob), len(blob))
        check_lora(tensors, TINY, max_rank=64)
    except InvalidAdapter as err:
        assert str(err)  # every refusal says why
    assert time.monotonic() - started < 1.0


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(blob: bytes) -> None:
    judge(blob)


@FUZZ
@given(headers, st.binary(max_size=512), st.one_of(st.none(), ints.filter(lambda n: 0 <= n < 2**64)))
def test_structured_headers(header: dict[str, object], data: bytes, declared: int | None) -> None:
    judge(body(header, data, declared))


@FUZZ
@given(st.data())
def test_a_valid_adapter_with_one_thing_changed(data: st.DataObject) -> None:
    """Mutations of a real adapter: a byte flipped, cut short, grown, or a header value swapped."""
    good = safetensors_bytes(lora_tensors(rank=data.draw(st.sampled_from([1, 4, 8]))))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "header"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        blob = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1 :]
    elif kind == "truncate":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "append":
        blob = good + data.draw(st.binary(min_size=1, max_size=64))
    else:
        (n,) = struct.unpack("<Q", good[:8])
        header = json.loads(good[8 : 8 + n])
        name = data.draw(st.sampled_from(sorted(header)))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(json_scalars | st.lists(ints, max_size=4))
        blob = body(header, good[8 + n :])
    judge(blob)


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.dictionaries(st.text(max_size=12), json_scalars | st.lists(json_scalars))
                 .map(lambda d: json.dumps(d).encode())))  # fmt: skip
def test_adapter_configs(raw: bytes) -> None:
    TRIED[0] += 1
    try:
        parse_config(raw)
    except InvalidAdapter as err:
        assert str(err)


def test_a_shape_of_many_huge_dimensions_is_refused_at_once() -> None:
    header = {"t": {"dtype": "F32", "shape": [2**62] * 50_000, "data_offsets": [0, 4]}}
    started = time.monotonic()
    judge(body(header, b"\0" * 4))
    assert time.monotonic() - started < 0.5


# The accepted space beyond one rank on q/v: each variant is a file and config validate() takes.
LLAMA = BaseModel(
    "tiny-llama", "chat", "/m", True, 64, 8, Architecture.from_model_config({**tinymodel.DIMENSIONS, "vocab_size": 512})
)
PHI3 = BaseModel(
    "tiny-phi3",
    "chat",
    "/m",
    True,
    64,
    8,
    Architecture.from_model_config({**tinymodel.DIMENSIONS, "architectures": ["Phi3ForCausalLM"], "vocab_size": 512}),
)
EMBEDDINGS = {
    "base_model.model.model.embed_tokens.lora_embedding_A": ("F32", [4, 512]),
    "base_model.model.model.embed_tokens.lora_embedding_B": ("F32", [256, 4]),
    "base_model.model.lm_head.lora_A.weight": ("F32", [4, 256]),
    "base_model.model.lm_head.lora_B.weight": ("F32", [512, 4]),
}
VARIANTS: list[tuple[BaseModel, dict[str, tuple[str, list[int]]], dict[str, object]]] = [
    (LLAMA, {**lora_tensors(rank=8, modules=("q_proj",)), **lora_tensors(rank=4, modules=("down_proj",))},
     {"r": 8, "lora_alpha": 16, "rank_pattern": {"down_proj": 4}, "alpha_pattern": {r"layers\.1\..*": 2}}),
    (LLAMA, lora_tensors(rank=4, modules=("q_proj", "v_proj")),
     {"r": 4, "target_modules": r".*\.(q|v)_proj", "use_rslora": True, "exclude_modules": ["o_proj"]}),
    (LLAMA, lora_tensors(rank=4, modules=("q_proj",), layers=2),
     {"r": 4, "target_modules": ["model.layers.0.self_attn.q_proj", "q_proj"], "layers_to_transform": [0, 1]}),
    (LLAMA, {**lora_tensors(rank=4, modules=("q_proj",)), **EMBEDDINGS},
     {"r": 4, "target_modules": ["q_proj", "embed_tokens", "lm_head"]}),
    (PHI3, lora_tensors(rank=4, modules=("qkv_proj", "gate_up_proj"), arch=PHI3.architecture),  # type: ignore[arg-type]
     {"r": 4, "target_modules": "all-linear"}),
]  # fmt: skip
patterns = st.text(alphabet=st.sampled_from(list("qkvo_proj.*+?()[]{}|^$\\0123456789,")), max_size=24)


def judge_variant(model: BaseModel, data: bytes, config: bytes) -> None:
    TRIED[0] += 1
    started = time.monotonic()
    try:
        validate(io.BytesIO(data), len(data), model, config, None)
    except InvalidAdapter as err:
        assert str(err)
    assert time.monotonic() - started < 1.0


def test_every_variant_is_accepted_as_it_is() -> None:
    for model, tensors, config in VARIANTS:
        data = safetensors_bytes(tensors)
        assert validate(io.BytesIO(data), len(data), model, json.dumps(config).encode(), None).info.rank >= 1


@FUZZ
@given(st.data())
def test_an_accepted_variant_with_one_thing_changed(data: st.DataObject) -> None:
    """Mutations of each newly accepted kind of adapter: a config value or pattern swapped for a
    hostile one, a field added, a tensor's shape changed."""
    model, tensors, config = data.draw(st.sampled_from(VARIANTS))
    config, tensors = json.loads(json.dumps(config)), dict(tensors)
    kind = data.draw(st.sampled_from(["value", "pattern", "field", "shape"]))
    if kind == "value":
        config[data.draw(st.sampled_from(sorted(config)))] = data.draw(
            json_scalars
            | patterns
            | st.lists(json_scalars | patterns, max_size=4)
            | st.dictionaries(patterns, json_scalars, max_size=4)
        )
    elif kind == "pattern":
        field = data.draw(st.sampled_from(["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"]))
        config[field] = data.draw(
            st.one_of(
                patterns, st.lists(patterns, max_size=3), st.dictionaries(patterns, st.integers(-2, 70), max_size=3)
            )
        )
    elif kind == "field":
        config[data.draw(st.text(max_size=24))] = data.draw(json_scalars)
    else:
        name = data.draw(st.sampled_from(sorted(tensors)))
        tensors[name] = ("F32", data.draw(st.lists(st.integers(0, 600), min_size=1, max_size=3)))
    judge_variant(model, safetensors_bytes(tensors), json.dumps(config).encode())
