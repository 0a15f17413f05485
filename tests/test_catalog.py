"""The catalog's architecture table against the installed vLLM's own model classes: the LoRA
targets and embedding support loraplane validates for are the ones vLLM wraps."""

from __future__ import annotations

import json
import subprocess
import sys

from loraplane import tinymodel
from loraplane.catalog import FAMILIES, Architecture

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
