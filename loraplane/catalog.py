"""The base model catalog: which models exist, what they allow, their shapes.

A JSON file shared by every component:

    {"models": [{"name": "tiny-llama", "kind": "chat", "path": "/models/tiny-llama",
                 "lora": true, "max_rank": 64, "max_adapters_per_worker": 8}]}

`path` is what vLLM serves; the dimensions adapter validation needs are read from
the model's own `config.json` there unless given inline as `architecture`. `max_cpu_loras`
(optional) gives workers a host-memory tier: that many adapters loaded, `max_adapters_per_worker`
of them in LoRA slots at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.limits import NAME


# How each architecture lays out its LoRA-targetable layers, as vLLM's model class for it declares
# (`packed_modules_mapping` and `embedding_modules` in vllm/model_executor/models/;
# tests/test_catalog.py reads them from the installed vLLM).
@dataclass(frozen=True)
class Family:
    fused: bool  # one qkv_proj and one gate_up_proj per layer (Phi-3), not q/k/v and gate/up
    embeddings: bool  # vLLM serves LoRA on embed_tokens and lm_head


FAMILIES = {
    "LlamaForCausalLM": Family(fused=False, embeddings=True),
    "MistralForCausalLM": Family(fused=False, embeddings=False),
    "Qwen2ForCausalLM": Family(fused=False, embeddings=False),
    "GemmaForCausalLM": Family(fused=False, embeddings=False),
    "Gemma2ForCausalLM": Family(fused=False, embeddings=False),
    "Gemma3ForCausalLM": Family(fused=False, embeddings=False),
    "Phi3ForCausalLM": Family(fused=True, embeddings=True),
}
# The PEFT module keys of the input and output embeddings (the model's module names).
EMBED_TOKENS, LM_HEAD = "model.embed_tokens", "lm_head"


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    name: str = "LlamaForCausalLM"  # config.json's `architectures[0]`
    vocab_size: int = 0  # 0: not given (then no LoRA on the embeddings)
    tie_word_embeddings: bool = False

    @property
    def family(self) -> Family:
        return FAMILIES[self.name]

    def layer_modules(self) -> dict[str, tuple[str, int, int]]:
        """Each decoder layer's LoRA-targetable linear layers: name -> (parent, in, out)."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        if self.family.fused:
            return {
                "qkv_proj": ("self_attn", h, q + 2 * kv),
                "o_proj": ("self_attn", q, h),
                "gate_up_proj": ("mlp", h, 2 * i),
                "down_proj": ("mlp", i, h),
            }
        return {
            "q_proj": ("self_attn", h, q),
            "k_proj": ("self_attn", h, kv),
            "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", q, h),
            "gate_proj": ("mlp", h, i),
            "up_proj": ("mlp", h, i),
            "down_proj": ("mlp", i, h),
        }

    def module_shape(self, module: str) -> tuple[int, int] | None:
        """(in_features, out_features) of a decoder layer's LoRA-targetable linear layer, or None."""
        found = self.layer_modules().get(module)
        return (found[1], found[2]) if found else None

    def embedding_lora(self) -> str:
        """Why vLLM serves no LoRA on this model's embeddings, or "" when it does."""
        if not self.family.embeddings:
            return f"vLLM serves no LoRA on the embeddings of {self.name} models"
        if not self.vocab_size:
            return "the catalog gives no vocab_size for it"
        if self.tie_word_embeddings:
            return "it ties its input and output embeddings, and loraplane has not verified LoRA on tied embeddings"
        return ""

    @classmethod
    def from_model_config(cls, cfg: Mapping[str, object]) -> Architecture:
        def dim(key: str, default: int | None = None) -> int:
            value = cfg.get(key) or default
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config: {key} must be a positive integer")
            return value

        names = cfg.get("architectures", ["LlamaForCausalLM"])
        if not (isinstance(names, list) and names and isinstance(names[0], str)):
            raise ValueError("model config: architectures must be a list of class names")
        if names[0] not in FAMILIES:
            raise ValueError(
                f"model config: architecture {names[0]} is not one loraplane validates adapters for "
                f'({", ".join(sorted(FAMILIES))}); give the model "lora": false'
            )
        tied = cfg.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ValueError("model config: tie_word_embeddings must be true or false")
        heads, hidden = dim("num_attention_heads"), dim("hidden_size")
        return cls(
            hidden_size=hidden,
            intermediate_size=dim("intermediate_size"),
            num_hidden_layers=dim("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=dim("num_key_value_heads", heads),
            head_dim=dim("head_dim", hidden // heads),
            name=names[0],
            vocab_size=dim("vocab_size") if "vocab_size" in cfg else 0,
            tie_word_embeddings=tied,
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
    repo: str = ""  # its Hugging Face repository: what an adapter's base_model_name_or_path says
    created: int = 0  # when it joined the catalog (unix seconds): /v1/models' `created`
    # vLLM's parser of the model's own tool-call format (`--tool-call-parser`): workers start with
    # automatic tool choice on. Empty: only `tool_choice` "required" or a named function (forced
    # through structured output) and "none".
    tool_parser: str = ""
    # A chat template for vLLM to use instead of the model's own (`--chat-template`): for a model
    # whose own template does not render tools. Empty: the model's.
    chat_template: str = ""
    # Adapters a worker holds loaded at once, in its `max_adapters_per_worker` LoRA slots and in host
    # memory (vLLM's `--max-cpu-loras`: an adapter there is swapped into a slot when a request needs
    # it). 0: no host-memory tier (as many as the slots).
    max_cpu_loras: int = 0

    @property
    def host_slots(self) -> int:
        """Adapters a worker holds loaded at once: in its LoRA slots and in host memory."""
        return max(self.max_cpu_loras, self.max_adapters_per_worker)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, BaseModel]

    def get(self, name: str) -> BaseModel | None:
        return self.models.get(name)

    @classmethod
    def load(cls, path: Path | str) -> Catalog:
        raw = json.loads(Path(path).read_text())
        written = int(Path(path).stat().st_mtime)
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
            slots = int(entry.get("max_adapters_per_worker", 8))
            max_cpu_loras = _max_cpu_loras(name, entry.get("max_cpu_loras", 0), slots)
            if arch_raw is None and lora:
                arch_raw = json.loads((Path(model_path) / "config.json").read_text())
            models[name] = BaseModel(
                name=name,
                kind=kind,
                path=model_path,
                lora=lora,
                max_rank=int(entry.get("max_rank", 64)),
                max_adapters_per_worker=slots,
                architecture=Architecture.from_model_config(arch_raw) if arch_raw else None,
                repo=str(entry.get("repo", "")),
                created=int(entry.get("created", written)),
                tool_parser=str(entry.get("tool_parser", "")),
                chat_template=str(entry.get("chat_template", "")),
                max_cpu_loras=max_cpu_loras,
            )
        return cls(models=models)

    @staticmethod
    def write(path: Path, models: list[dict[str, object]]) -> None:
        path.write_text(json.dumps({"models": models}, indent=2) + "\n")


def _max_cpu_loras(model: str, value: object, slots: int) -> int:
    """A catalog entry's `max_cpu_loras`: 0 (no host-memory tier), or at least its LoRA slots, as
    vLLM requires (`max_cpu_loras` >= `max_loras`, vllm/config/lora.py)."""
    if type(value) is not int or value < 0:
        raise ValueError(f"catalog: {model}: max_cpu_loras must be 0 or a whole number of adapters")
    if value and value < slots:
        raise ValueError(
            f"catalog: {model}: max_cpu_loras ({value}) must be at least max_adapters_per_worker ({slots}): "
            "the adapters held in host memory include those in the LoRA slots, and vLLM refuses fewer"
        )
    return value
