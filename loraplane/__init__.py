"""loraplane: serve fine-tuned LoRA adapters to many tenants on shared vLLM workers."""
