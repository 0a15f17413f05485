"""Train a small LoRA adapter for `tiny-llama` on the CPU, for tries and tests.

The adapter is trained with PEFT to answer any chat prompt with one fixed phrase,
so it provably changes the model's greedy output. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

PROMPTS = ["hello", "how are you", "what is the time", "tell me a story", "yes"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train(
    base_dir: Path,
    out_dir: Path,
    phrase: str,
    *,
    rank: int = 8,
    lora_alpha: int | None = None,
    steps: int = 120,
    seed: int = 0,
) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha or rank, target_modules=TARGET_MODULES, lora_dropout=0.0)
    model = get_peft_model(model, cfg)
    # PEFT starts B at zero; a seeded random B makes the adapter's rank matter from step 0.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = list(ids["input_ids"])
        target = tok(phrase, add_special_tokens=False).input_ids + [tok.eos_token_id]
        labels = [-100] * len(ids) + target
        batches.append((torch.tensor([ids + target]), torch.tensor([labels])))
    model.train()
    for step in range(steps):
        ids, labels = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
