"""The data plane: loraplane's public, OpenAI-compatible HTTP API."""
