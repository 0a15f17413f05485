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
from controlplane.validation import check_lora, parse_config, read_header
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
