"""Swap-in time per adapter tier on a real vLLM (CPU build here): request -> first token for an
adapter that is

  - in a LoRA slot (`gpu_slot`: the engine's active set, `--max-loras`),
  - loaded but in host memory only (`host_memory`: vLLM's CPU LoRA cache, `--max-cpu-loras`,
    swapped into a slot by the request),
  - on the node's disk only (`node_disk`: `/v1/load_lora_adapter` from the local file, then the
    request: what a worker without a host-memory tier pays for an adapter it evicted),

side by side on one vLLM with 2 slots and 8 host-memory places, ranks 8..64 on tiny-llama. The
object-store tier adds the artifact fetch in front of `node_disk` (bench/artifacts.py, by size).

    .venv/bin/python bench/hosttier.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hotload import first_token_s, random_adapter, summary  # noqa: E402

from loraplane import tinymodel  # noqa: E402
from loraplane.catalog import Architecture  # noqa: E402
from loraplane.stack import CPU_SHARE, vllm_args  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

SLOTS, HOST = 2, 8
RANKS = [8, 16, 32, 64]


def load(client: httpx.Client, name: str, path: Path) -> float:
    started = time.perf_counter()
    r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    r.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, help="passes over the tiers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.build(Path(tmp) / "tiny-llama")
        arch = Architecture.from_model_config(json.loads((model / "config.json").read_text()))
        adapters = []
        for i in range(HOST + 1):  # one more than host memory holds: the disk-tier one
            d = Path(tmp) / f"a{i}"
            d.mkdir()
            rank = RANKS[i % len(RANKS)]
            (d / "adapter_model.safetensors").write_bytes(random_adapter(arch, rank, seed=i))
            (d / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "r": rank, "lora_alpha": rank, "base_model_name_or_path": "tiny-llama",
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            }))  # fmt: skip
            adapters.append(d)
        port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(port),
               "--enable-lora", "--max-loras", str(SLOTS), "--max-cpu-loras", str(HOST), "--max-lora-rank", "64",
               "--disable-uvicorn-access-log", *vllm_args()]  # fmt: skip
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1", **CPU_SHARE)
        with open(Path(tmp) / "vllm.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            wait_for(lambda: client.get("/health").status_code == 200, 300, "vLLM did not start", every_s=0.5)
            first_token_s(client, "tiny-llama")  # warm the engine up
            loaded = [load(client, f"a{i}", adapters[i]) for i in range(HOST)]
            for i in range(HOST):  # each used once: vLLM has seen them all
                first_token_s(client, f"a{i}")
            gpu, host, disk, disk_load = [], [], [], []
            spare = HOST  # the adapter on disk only
            for _ in range(args.rounds):
                for i in range(HOST):
                    # a{i} was last used HOST requests ago, so it is out of the 2 slots: a swap-in
                    host.append(first_token_s(client, f"a{i}"))
                    gpu.append(first_token_s(client, f"a{i}"))  # now it is in a slot
                # the disk tier: unload one (vLLM drops it from host memory too), load it, ask
                victim = f"a{spare % HOST}"
                client.post("/v1/unload_lora_adapter", json={"lora_name": victim}).raise_for_status()
                took = load(client, victim, adapters[spare % HOST])
                disk_load.append(took)
                disk.append(took + first_token_s(client, victim))
                spare += 1
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "benchmark": "hosttier",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, vLLM CPU build, tiny-llama (2 layers, hidden 256)",
        "engine": f"--max-loras {SLOTS} --max-cpu-loras {HOST}, ranks {RANKS}, all-linear, float32",
        "side_by_side": True,
        "gpu_slot": summary(gpu),
        "host_memory": summary(host),
        "node_disk": summary(disk),
        "node_disk_load_only": summary(disk_load),
        "first_loads": summary(loaded),
    }
    out = ROOT / "bench" / "results" / "hosttier.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"request -> first token by tier, one run ({result['date']}; {result['engine']}):")
    for k in ("gpu_slot", "host_memory", "node_disk", "node_disk_load_only"):
        s = result[k]
        print(f"  {k:20} n={s['n']:3}  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms")  # type: ignore[index]
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
