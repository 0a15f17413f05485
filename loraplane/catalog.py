"""The base model catalog: which models exist, what they allow, their shapes.

A JSON file shared by every component:

    {"models": [{"name": "tiny-llama", "kind": "chat", "path": "/models/tiny-llama",
                 "lora": true, "max_rank": 64, "max_adapters_per_worker": 8}]}

`path` is what vLLM serves; the dimensions adapter validation needs are read from
the model's own `config.json` there unless given inline as `architecture`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.limits import NAME


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def module_shape(self, module: str) -> tuple[int, int] | None:
        """(in_features, out_features) of a LoRA-targetable linear layer, or None."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }.get(module)

    @classmethod
    def from_model_config(cls, cfg: Mapping[str, object]) -> Architecture:
        def dim(key: str, default: int | None = None) -> int:
            value = cfg.get(key) or default
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config: {key} must be a positive integer")
            return value

        heads, hidden = dim("num_attention_heads"), dim("hidden_size")
        return cls(
            hidden_size=hidden,
            intermediate_size=dim("intermediate_size"),
            num_hidden_layers=dim("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=dim("num_key_value_heads", heads),
            head_dim=dim("head_dim", hidden // heads),
        )


@dataclass(frozen=True)
class BaseModel:
    name: str
    kind: str  # "chat" or "embedding"
    path: str
    lora: bool
    max_rank: int
    max_adapters_per_worker: int
    architecture: Architecture | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, BaseModel]

    def get(self, name: str) -> BaseModel | None:
        return self.models.get(name)

    @classmethod
    def load(cls, path: Path | str) -> Catalog:
        raw = json.loads(Path(path).read_text())
        models: dict[str, BaseModel] = {}
        for entry in raw["models"]:
            name = str(entry["name"])
            if not NAME.match(name):
                raise ValueError(f"catalog: bad model name {name!r}")
            kind = str(entry.get("kind", "chat"))
            if kind not in ("chat", "embedding"):
                raise ValueError(f"catalog: {name}: kind must be chat or embedding")
            lora = bool(entry.get("lora", kind == "chat")) and kind == "chat"
            arch_raw = entry.get("architecture")
            model_path = str(entry["path"])
            if arch_raw is None and lora:
                arch_raw = json.loads((Path(model_path) / "config.json").read_text())
            models[name] = BaseModel(
                name=name,
                kind=kind,
                path=model_path,
                lora=lora,
                max_rank=int(entry.get("max_rank", 64)),
                max_adapters_per_worker=int(entry.get("max_adapters_per_worker", 8)),
                architecture=Architecture.from_model_config(arch_raw) if arch_raw else None,
            )
        return cls(models=models)

    @staticmethod
    def write(path: Path, models: list[dict[str, object]]) -> None:
        path.write_text(json.dumps({"models": models}, indent=2) + "\n")
