"""Hot-load latency: request for a registered, non-resident adapter -> first token.

Runs the embedded stack (real vLLM, CPU build here) on free ports, registers
adapters of rank 8..64, and measures, side by side in one run:
  - cold node cache: the adapter's first load on the worker (fetch + verify + load),
  - warm node cache: a reload after eviction (bytes already on the node),
  - resident: the same request to an adapter already loaded (the baseline).

    .venv/bin/python bench/hotload.py [--adapters 28] [--warm 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraplane.catalog import Architecture  # noqa: E402
from loraplane.controlplane.v1 import tenant_pb2  # noqa: E402
from loraplane.stack import Stack, StackConfig  # noqa: E402
from tests.support import free_port  # noqa: E402

MODULES = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def random_adapter(arch: Architecture, rank: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    for layer in range(arch.num_hidden_layers):
        for parent, modules in MODULES.items():
            for m in modules:
                fan_in, fan_out = arch.module_shape(m)  # type: ignore[misc]
                for ab, shape in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                    data = (rng.standard_normal(shape) * 0.01).astype(np.float32).tobytes()
                    name = f"base_model.model.model.layers.{layer}.{parent}.{m}.lora_{ab}.weight"
                    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
                    blobs.append(data)
                    offset += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def first_token_s(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        events = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events += 1
                if events == 2:  # vLLM's first event carries only the role; the second, a token
                    return time.perf_counter() - started
    raise RuntimeError("no token")


def summary(xs: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in xs)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(ms[-1], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=28, help="more than the worker's 8 slots")
    ap.add_argument("--warm", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # The per-worker load budget (10/s by default) would throttle this back-to-back series:
        # what is measured here is one hot-load's latency.
        stack = Stack(StackConfig(data_dir=Path(tmp), http_port=free_port(), grpc_port=free_port(),
                                  vllm_port=free_port(), log_dir=Path(tmp) / "logs",
                                  extra_env=(("LORAPLANE_MAX_LOADS_PER_S", "1000"),)))  # fmt: skip
        stack.start()
        try:
            key = stack.operator().create_tenant("bench", tenant_pb2.TIER_RESERVED).api_key
            arch = Architecture.from_model_config(json.loads((Path(tmp) / "models/tiny-llama/config.json").read_text()))
            client = httpx.Client(base_url=stack.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            ranks = [8, 16, 32, 64]
            for i in range(args.adapters):
                data = random_adapter(arch, ranks[i % len(ranks)], seed=i)
                r = client.post("/v1/adapters/upload", data={"name": f"a{i}", "base_model": "tiny-llama"},
                                files={"file": ("adapter_model.safetensors", data)})  # fmt: skip
                r.raise_for_status()
            first_token_s(client, "tiny-llama")  # warm the engine up
            cold = [first_token_s(client, f"tiny-llama:a{i}") for i in range(args.adapters)]
            resident = [first_token_s(client, f"tiny-llama:a{args.adapters - 1}") for _ in range(args.warm)]
            warm = [first_token_s(client, f"tiny-llama:a{i}") for i in range(args.warm)]
            by_rank = {r: summary([c for i, c in enumerate(cold) if ranks[i % len(ranks)] == r]) for r in ranks}
        finally:
            stack.stop()
    result = {
        "benchmark": "hotload",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, vLLM CPU build, tiny-llama (2 layers, hidden 256)",
        "side_by_side": True,
        "cold_node_cache": summary(cold),
        "warm_node_cache": summary(warm),
        "resident_baseline": summary(resident),
        "cold_by_rank": by_rank,
    }
    out = ROOT / "bench" / "results" / "hotload.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"request -> first token, one run ({result['date']}):")
    for k in ("cold_node_cache", "warm_node_cache", "resident_baseline"):
        s = result[k]
        print(f"  {k:18} n={s['n']:3}  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms")  # type: ignore[index]
    for rank, s in by_rank.items():
        print(f"  cold, rank {rank:2}      n={s['n']:3}  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
