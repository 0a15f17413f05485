"""The catalog's architecture table against the installed vLLM's own model classes: the LoRA
targets and embedding support loraplane validates for are the ones vLLM wraps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplane import tinymodel
from loraplane.catalog import FAMILIES, Architecture, Catalog

# Run apart: importing vLLM's model modules warns, which the test run treats as an error.
READ_VLLM = """
import json, sys
from vllm.model_executor.models.interfaces import supports_lora
from vllm.model_executor.models.registry import ModelRegistry
out = {}
for name in sys.argv[1:]:
    cls = ModelRegistry._try_load_model_cls(name)  # vLLM's class for a config's `architectures`
    out[name] = cls is not None and {"lora": supports_lora(cls), "packed": cls.packed_modules_mapping,
                                     "embeddings": sorted(getattr(cls, "embedding_modules", None) or {})}
print(json.dumps(out))
"""


def test_each_architectures_lora_targets_are_vllms() -> None:
    run = subprocess.run(
        [sys.executable, "-c", READ_VLLM, *sorted(FAMILIES)], capture_output=True, text=True, timeout=300, check=True
    )
    vllm = json.loads(run.stdout.strip().splitlines()[-1])
    for name in FAMILIES:
        cls = vllm[name]
        assert cls and cls["lora"], name
        arch = Architecture.from_model_config({**tinymodel.DIMENSIONS, "architectures": [name], "vocab_size": 512})
        # vLLM fuses q/k/v and gate/up into one layer each and loads LoRA on the checkpoint's parts.
        packed = cls["packed"]
        assert set(arch.layer_modules()) == {*packed["qkv_proj"], *packed["gate_up_proj"], "o_proj", "down_proj"}
        assert arch.family.embeddings == (cls["embeddings"] == ["embed_tokens", "lm_head"]), name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_lora_model_of_an_architecture_outside_the_table_stops_the_catalog(family: str, tmp_path: Path) -> None:
    """Mixtures of experts are not served here (docs/adapters.md): a `"lora": true` entry of one is
    refused when the catalog loads, with what to do; the same entry with `"lora": false` loads."""
    spec = tinymodel.FAMILIES[family]
    assert spec.architecture not in FAMILIES
    config = {**spec.dimensions, "architectures": [spec.architecture], "vocab_size": 512}
    (tmp_path / family).mkdir()
    (tmp_path / family / "config.json").write_text(json.dumps(config))
    entry: dict[str, object] = {"name": f"tiny-{family}", "kind": "chat", "path": str(tmp_path / family)}
    reason = (
        f'architecture {spec.architecture} is not one loraplane validates adapters for .*; give the model "lora": false'
    )
    catalog = tmp_path / "catalog.json"
    # Read from the model's config.json (a chat model's "lora" is true unless it says otherwise), or inline.
    for refused in (entry, entry | {"lora": True}, entry | {"lora": True, "architecture": config}):
        Catalog.write(catalog, [refused])
        with pytest.raises(ValueError, match=reason):
            Catalog.load(catalog)
    Catalog.write(catalog, [entry | {"lora": False}])
    model = Catalog.load(catalog).get(f"tiny-{family}")
    assert model is not None and not model.lora and model.architecture is None
