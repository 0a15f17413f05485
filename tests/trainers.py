"""Adapter directories for tiny-llama as real training pipelines write them.

Each style builds the PEFT model its pipeline builds (the same `LoraConfig`, the same
`get_peft_model` call, the same dtype handling), stands in for training by giving `lora_B`
seeded random values (PEFT starts it at zero, which would leave the base model's output as it
is; each build checks that the adapter now changes the logits), saves with PEFT's own
`save_pretrained` (so `adapter_config.json` is exactly what PEFT writes, every field), and adds
the files the pipeline writes next to the adapter. A config is edited by hand only where the
pipeline edits it (Unsloth's `auto_mapping`).

Where each pipeline's choices come from (read in their sources):

- Unsloth: `FastLanguageModel.get_peft_model`'s defaults (unsloth/models/llama.py): r=16,
  lora_alpha=16, lora_dropout=0, bias="none", the 7 projections, use_rslora=False,
  loftq_config={}, task CAUSAL_LM; `fix_lora_auto_mapping` (unsloth_zoo/hf_utils.py) fills
  `auto_mapping` with `"unsloth_fixed": true`; `prepare_model_for_training`
  (unsloth_zoo/training_utils.py) upcasts lora_A/lora_B to float32, so the tensors are F32;
  `unsloth_save_model(save_method="lora")` saves the tokenizer with padding_side "left" and
  pushes its MODEL_CARD as README.md (unsloth/save.py).
- Axolotl: `lora_target_linear` is resolved by Axolotl itself (`find_all_linear_names`,
  src/axolotl/loaders/adapter.py: every Linear's last name but lm_head), not passed to PEFT as
  "all-linear"; `LoraConfig(..., fan_in_fan_out=cfg.lora_fan_in_fan_out (None),
  target_parameters=[], bias="none", task_type=CAUSAL_LM)`; PEFT's default
  autocast_adapter_dtype keeps the adapter in float32; r=32/alpha=16/dropout 0.05 as in
  examples/llama-2/lora.yml. `save_initial_configs` (src/axolotl/train.py) writes the
  tokenizer and the base model's config.json into the output dir; the model card carries the
  Axolotl badge and the run's YAML.
- TRL: `SFTTrainer(peft_config=LoraConfig(...))`, the config `get_peft_config`
  (trl/trainer/utils.py) builds from ModelConfig's defaults (r=16, alpha=32, dropout 0.05,
  bias "none", CAUSAL_LM) with `--lora_target_modules all-linear`, which PEFT resolves (PEFT
  0.21 saves the full module paths). `Trainer._save` writes the adapter, the tokenizer
  (tokenizer.json, tokenizer_config.json, chat_template.jinja) and `torch.save(args,
  "training_args.bin")` (a pickle); TRL's card is trl/templates/lm_model_card.md. With a
  quantized (QLoRA) base, SFTTrainer casts the trainable parameters to bfloat16
  (sft_trainer.py), so a QLoRA run's adapter is BF16.
- LLaMA-Factory: `lora_target: all` -> `find_all_linear_modules` (a list of last names, lm_head
  excluded), `LoraConfig(task_type=CAUSAL_LM, inference_mode=False, r=lora_rank (8),
  lora_alpha=lora_rank*2, lora_dropout=0.0, use_rslora, use_dora, modules_to_save=None)`
  (src/llamafactory/model/adapter.py, hparams/finetuning_args.py); trainable parameters cast
  to float32; `run_sft` then writes train_results.json, all_results.json, trainer_state.json,
  the Trainer's files and model card (tags llama-factory, lora), trainer_log.jsonl.
- full module paths: LLaMA-Factory's LLaMA Pro (`find_expanded_modules`) and PEFT's own
  "all-linear" write them; layers_to_transform: Unsloth's `finetune_last_n_layers`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(base: Path, config: Any, **kwargs: Any) -> Any:
    """The base model, loaded as the pipelines load it on this machine (float32), wrapped by
    PEFT's `get_peft_model`."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # PEFT's lora_A init draws from the process RNG
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(model, config, **kwargs)


def _train(model: Any, seed: int, dtype: Any = None) -> None:
    """Stands in for training: seeded lora_B values, checked to change the model's logits; then
    the trainable parameters in `dtype` when the pipeline trains them in another one."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "lora_embedding_B" in name):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    if torch.allclose(tuned, plain):
        raise AssertionError("the adapter does not change the model's output")
    if dtype is not None:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)


def _save(model: Any, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # PEFT: adapter_model.safetensors, adapter_config.json, README.md
    return out


def _tokenizer(base: Path, out: Path, padding_side: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as `save_pretrained` writes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if padding_side:
        tok.padding_side = padding_side
    tok.save_pretrained(out)


def _training_args(out: Path, **kwargs: Any) -> None:
    """`Trainer._save`'s torch.save(self.args, "training_args.bin"): a pickle (in a zip), never to
    be loaded by a server."""
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, **kwargs)
    torch.save(args, out / "training_args.bin")


def _json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# The pipelines


def peft_defaults(base: Path, out: Path) -> Path:
    """`get_peft_model(model, LoraConfig())`: r=8, lora_alpha=8, target_modules None (PEFT's
    default for llama: q_proj, v_proj), no task type (so PEFT fills auto_mapping)."""
    from peft import LoraConfig

    model = _peft_model(base, LoraConfig())
    _train(model, seed=1)
    return _save(model, out)


def unsloth(base: Path, out: Path) -> Path:
    """`FastLanguageModel.get_peft_model(model)` with its defaults, saved and pushed as Unsloth
    does (`save_method="lora"`)."""
    from peft import LoraConfig, TaskType

    config = LoraConfig(
        r=16, lora_alpha=16, target_modules=SEVEN, lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM,
        layers_to_transform=None, init_lora_weights=True, loftq_config={}, use_rslora=False, modules_to_save=None,
        target_parameters=None, ensure_weight_tying=False,
    )  # fmt: skip
    model = _peft_model(base, config)
    # unsloth_zoo's fix_lora_auto_mapping: set only when PEFT left it None (a CAUSAL_LM task).
    for cfg in model.peft_config.values():
        if cfg.auto_mapping is None:
            base_class = model._get_base_model_class()
            cfg.auto_mapping = {
                "base_model_class": base_class.__name__,
                "parent_library": base_class.__module__,
                "unsloth_fixed": True,
            }
    _train(model, seed=2)  # lora_A/lora_B upcast to float32 by prepare_model_for_training
    _save(model, out)
    _tokenizer(base, out, padding_side="left")
    (out / "README.md").write_text(
        f"---\nbase_model: {base}\ntags:\n- text-generation-inference\n- transformers\n- unsloth\n- llama\n- trl\n"
        "license: apache-2.0\nlanguage:\n- en\n---\n\n# Uploaded  model\n\n- **Developed by:** acme\n"
        f"- **License:** apache-2.0\n- **Finetuned from model :** {base}\n\n"
        "This llama model was trained 2x faster with [Unsloth](https://github.com/unslothai/unsloth)\n\n"
        '[<img src="https://raw.githubusercontent.com/unslothai/unsloth/main/images/unsloth%20made%20with%20love.png"'
        ' width="200"/>](https://github.com/unslothai/unsloth)\n'
    )
    return out


AXOLOTL_YAML = """\
base_model: {base}
load_in_8bit: false
load_in_4bit: false
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
output_dir: ./outputs/lora-out
sequence_len: 4096
sample_packing: true
adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
"""


def axolotl(base: Path, out: Path) -> Path:
    """`axolotl train` with examples/llama-2/lora.yml's adapter settings (`lora_target_linear`)."""
    import torch
    from peft import LoraConfig, TaskType
    from transformers import AutoConfig, AutoModelForCausalLM

    def find_all_linear_names(model: Any) -> list[str]:  # Axolotl's, for a 16-bit Llama
        names = {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__
        }
        names.discard("lm_head")
        return sorted(names)  # Axolotl's order is a set's

    targets = find_all_linear_names(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    config = LoraConfig(
        r=32, lora_alpha=16, target_modules=targets, target_parameters=[], layers_to_transform=None,
        layers_pattern=None, lora_dropout=0.05, fan_in_fan_out=None, modules_to_save=None, exclude_modules=None,
        bias="none", task_type=TaskType.CAUSAL_LM,
    )  # fmt: skip
    model = _peft_model(base, config)
    _train(model, seed=3)
    out.mkdir(parents=True, exist_ok=True)
    # save_initial_configs: the tokenizer and the base model's config.json, before training.
    _tokenizer(base, out)
    AutoConfig.from_pretrained(base).save_pretrained(out)
    _save(model, out)
    yaml = AXOLOTL_YAML.format(base=base)
    (out / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {base}\ntags:\n- axolotl\n- base_model:adapter:{base}\n- lora\n"
        "- transformers\ndatasets:\n- mhenrichsen/alpaca_2k_test\npipeline_tag: text-generation\nmodel-index:\n"
        "- name: outputs/lora-out\n  results: []\n---\n\n"
        "<!-- This model card has been generated automatically according to the information the Trainer had "
        "access to. You\nshould probably proofread and complete it, then remove this comment. -->\n\n"
        '[<img src="https://raw.githubusercontent.com/axolotl-ai-cloud/axolotl/main/image/axolotl-badge-web.png" '
        'alt="Built with Axolotl" width="200" height="32"/>](https://github.com/axolotl-ai-cloud/axolotl)\n'
        "<details><summary>See axolotl config</summary>\n\naxolotl version: `0.12.2`\n"
        f"```yaml\n{yaml}```\n\n</details><br>\n\n# outputs/lora-out\n\n"
        f"This model is a fine-tuned version of [{base}](https://huggingface.co/{base}) on the "
        "mhenrichsen/alpaca_2k_test dataset.\n"
    )
    return out


def _trl_card(base: Path) -> str:
    """trl/templates/lm_model_card.md as SFTTrainer.create_model_card fills it."""
    return (
        f"---\nbase_model: {base}\nlibrary_name: transformers\nmodel_name: sft-out\ntags:\n- generated_from_trainer\n"
        "- sft\n- trl\nlicence: license\n---\n\n# Model Card for sft-out\n\n"
        f"This model is a fine-tuned version of [{base}](https://huggingface.co/{base}).\n"
        "It has been trained using [TRL](https://github.com/huggingface/trl).\n\n## Training procedure\n\n"
        "This model was trained with SFT.\n\n### Framework versions\n\n- TRL: 0.24.0\n- Transformers: 5.19.0\n"
        "- Pytorch: 2.13.0\n- Datasets: 4.0.0\n- Tokenizers: 0.23.3\n"
    )


def _trl(base: Path, out: Path, seed: int, dtype: Any = None) -> Path:
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM", r=16, target_modules="all-linear", target_parameters=None, lora_alpha=32,
        lora_dropout=0.05, bias="none", use_rslora=False, use_dora=False, modules_to_save=None,
    )  # fmt: skip
    model = _peft_model(base, config)
    _train(model, seed=seed, dtype=dtype)
    _save(model, out)  # Trainer._save: the model, then the processing class, then the args
    _tokenizer(base, out)
    _training_args(out, learning_rate=2e-4, num_train_epochs=1, bf16=False)
    (out / "README.md").write_text(_trl_card(base))
    return out


def trl_sft(base: Path, out: Path) -> Path:
    """`trl sft --use_peft --lora_target_modules all-linear` on a 16-bit base: the adapter in float32."""
    return _trl(base, out, seed=4)


def trl_qlora(base: Path, out: Path) -> Path:
    """The same on a 4-bit base (QLoRA): SFTTrainer casts the adapter to bfloat16, saved as BF16."""
    import torch

    return _trl(base, out, seed=5, dtype=torch.bfloat16)


def llama_factory(base: Path, out: Path) -> Path:
    """`llamafactory-cli train examples/train_lora/llama3_lora_sft.yaml` (lora_rank 8, lora_target all)."""
    import torch
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM

    def find_all_linear_modules(model: Any) -> list[str]:  # LLaMA-Factory's
        names = {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if "lm_head" not in name and "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__
        }
        return sorted(names)  # LLaMA-Factory's order is a set's

    targets = find_all_linear_modules(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, target_modules=targets, lora_alpha=16,
        lora_dropout=0.0, use_rslora=False, use_dora=False, modules_to_save=None,
    )  # fmt: skip
    model = _peft_model(base, config)
    _train(model, seed=6, dtype=torch.float32)  # cast_trainable_params_to_fp32
    _save(model, out)
    _tokenizer(base, out)
    _training_args(out, learning_rate=1e-4, num_train_epochs=3.0, lr_scheduler_type="cosine", warmup_steps=38)
    metrics = {"epoch": 3.0, "total_flos": 1.2e12, "train_loss": 1.0321, "train_runtime": 412.5,
               "train_samples_per_second": 7.27, "train_steps_per_second": 0.909}  # fmt: skip
    _json(out / "train_results.json", metrics)
    _json(out / "all_results.json", metrics)
    log = [{"loss": 1.4, "grad_norm": 0.9, "learning_rate": 9.9e-05, "epoch": 0.08, "step": 10}]
    _json(out / "trainer_state.json", {"best_metric": None, "epoch": 3.0, "global_step": 375, "log_history": log,
                                       "max_steps": 375, "num_train_epochs": 3, "trial_name": None})  # fmt: skip
    (out / "trainer_log.jsonl").write_text(
        json.dumps({"current_steps": 10, "total_steps": 375, "loss": 1.4, "lr": 9.9e-05, "epoch": 0.08,
                    "percentage": 2.67, "elapsed_time": "0:00:11", "remaining_time": "0:06:52"}) + "\n"
    )  # fmt: skip
    (out / "README.md").write_text(
        f"---\nlibrary_name: peft\nlicense: other\nbase_model: {base}\ntags:\n- base_model:adapter:{base}\n"
        "- llama-factory\n- lora\n- transformers\npipeline_tag: text-generation\nmodel-index:\n- name: sft\n"
        "  results: []\n---\n\n# sft\n\n"
        f"This model is a fine-tuned version of [{base}](https://huggingface.co/{base}) on the identity and the "
        "alpaca_en_demo datasets.\n"
    )
    return out


def rslora(base: Path, out: Path) -> Path:
    """use_rslora: scaled by lora_alpha / sqrt(r) (LLaMA-Factory's and TRL's `use_rslora`)."""
    from peft import LoraConfig

    config = LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN[:4], use_rslora=True, task_type="CAUSAL_LM")
    model = _peft_model(base, config)
    _train(model, seed=7)
    return _save(model, out)


def rank_alpha_pattern(base: Path, out: Path) -> Path:
    """rank_pattern and alpha_pattern (Axolotl's lora_rank_pattern / lora_alpha_pattern): o_proj
    at rank 4, alpha 8; the rest at r=8, alpha 16."""
    from peft import LoraConfig

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 4},
        alpha_pattern={"o_proj": 8}, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = _peft_model(base, config)
    _train(model, seed=8)
    return _save(model, out)


def regex_targets(base: Path, out: Path) -> Path:
    """target_modules as a regular expression (a str: PEFT matches it against full module names)."""
    from peft import LoraConfig

    model = _peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj)$"))
    _train(model, seed=9)
    return _save(model, out)


def full_paths(base: Path, out: Path) -> Path:
    """target_modules as full module paths: q and v of layer 0, q of layer 1."""
    from peft import LoraConfig

    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    model = _peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=paths, task_type="CAUSAL_LM"))
    _train(model, seed=10)
    return _save(model, out)


def layers_to_transform(base: Path, out: Path) -> Path:
    """Only the last layer (Unsloth's finetune_last_n_layers=1 sets layers_to_transform=[1])."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    model = _peft_model(base, config)
    _train(model, seed=11)
    return _save(model, out)


def embed_and_lm_head(base: Path, out: Path) -> Path:
    """LoRA on embed_tokens and lm_head as well (target_modules names them). PEFT's
    save_embedding_layers="auto" then also saves both layers' base weights
    (`…embed_tokens.base_layer.weight`, `…lm_head.base_layer.weight`)."""
    import warnings

    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "embed_tokens", "lm_head"]
    model = _peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    _train(model, seed=12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
        return _save(model, out)


# Styles vLLM does not serve: saved as PEFT saves them, for the refusals.


def dora(base: Path, out: Path) -> Path:
    """use_dora=True: lora_magnitude_vector tensors next to A and B."""
    from peft import LoraConfig

    model = _peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True))
    _train(model, seed=13)
    return _save(model, out)


def modules_to_save(base: Path, out: Path) -> Path:
    """modules_to_save=["lm_head"]: a fully trained copy of lm_head (`base_model.model.lm_head.weight`)."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = _peft_model(base, config)
    _train(model, seed=14)
    return _save(model, out)


def pissa(base: Path, out: Path) -> Path:
    """init_lora_weights="pissa", saved as is (not converted back to a plain LoRA): A and B hold the
    base weights' principal components, taken out of the base model."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = _peft_model(base, config)
    _train(model, seed=15)
    return _save(model, out)


def lora_bias(base: Path, out: Path) -> Path:
    """lora_bias=True: a `lora_B.bias` per module."""
    import warnings

    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lora_bias.*|.*invalid shape.*")
        model = _peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_bias=True))
        _train(model, seed=16)
        return _save(model, out)


def trainable_tokens(base: Path, out: Path) -> Path:
    """trainable_token_indices (what TRL sets for tokens a cloned chat template added): an
    `embed_tokens.token_adapter.trainable_tokens_delta` tensor."""
    from peft import LoraConfig

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [3, 4, 5]}
    )
    model = _peft_model(base, config)
    _train(model, seed=17)
    return _save(model, out)


STYLES: dict[str, Callable[[Path, Path], Path]] = {
    "peft-defaults": peft_defaults,
    "unsloth": unsloth,
    "axolotl": axolotl,
    "trl-sft": trl_sft,
    "trl-qlora": trl_qlora,
    "llama-factory": llama_factory,
    "rslora": rslora,
    "rank-alpha-pattern": rank_alpha_pattern,
    "regex-targets": regex_targets,
    "full-paths": full_paths,
    "layers-to-transform": layers_to_transform,
    "embed-and-lm-head": embed_and_lm_head,
    "dora": dora,
    "modules-to-save": modules_to_save,
    "pissa": pissa,
    "lora-bias": lora_bias,
    "trainable-tokens": trainable_tokens,
}


def build_all(base: Path, root: Path) -> dict[str, Path]:
    """Every style's directory, under `root`."""
    return {name: write(base, root / name) for name, write in STYLES.items()}


def peft_adapter(base: Path, out: Path, seed: int = 1, **options: Any) -> Path:
    """An adapter PEFT makes for `base` with these LoraConfig options, standing in for a
    training run (seeded lora_B values that change the output)."""
    from peft import LoraConfig

    with warnings.catch_warnings():  # PEFT's warnings on embedding LoRA (tied, saved base weights)
        warnings.simplefilter("ignore")
        model = _peft_model(base, LoraConfig(**options))
        _train(model, seed)
        return _save(model, out)
