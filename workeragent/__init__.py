"""The worker agent: runs vLLM for one base model and does what the control plane asks."""
