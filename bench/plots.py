"""PNG plots from bench/results/*.json (whichever exist)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("loraplane", "round_robin", "consistent_hashing")


def affinity(data: dict) -> None:  # type: ignore[type-arg]
    rows = data["results"]
    names = [r["workload"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(axes, [("loads_vs_offline_best", "adapter loads / offline best"),
                                          ("worst_to_average_in_flight_p99", "worst-to-average in flight, p99"),
                                          ("ttft_p99_ms", "time to first token p99 (ms)")], strict=True):  # fmt: skip
        width = 0.27
        for i, p in enumerate(POLICIES):
            ax.bar([x + i * width for x in range(len(names))], [r[p][metric] for r in rows], width, label=p)
        ax.set_xticks([x + width for x in range(len(names))], names, rotation=20, fontsize=8)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"adapter affinity (simulated fleet, {data['date']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "affinity.png", dpi=100)


def hotpath(data: dict) -> None:  # type: ignore[type-arg]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("throughput_through", "through the data plane"), ("throughput_direct", "simulator direct")):
        runs = data[key]
        ax.plot([r["rps"] for r in runs], [r["p99_ms"] for r in runs], marker="o", label=label)
    ax.axhline(10, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"hot path, concurrency 1..64 ({data['date']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "hotpath.png", dpi=100)


def hotload(data: dict) -> None:  # type: ignore[type-arg]
    cases = ["cold_node_cache", "warm_node_cache", "resident_baseline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar([c.replace("_", " ") for c in cases], [data[c]["p50_ms"] for c in cases], label="p50")
    ax.scatter([c.replace("_", " ") for c in cases], [data[c]["p99_ms"] for c in cases], color="black", label="p99")
    ax.set_ylabel("request -> first token (ms)")
    ax.legend()
    ax.set_title(f"hot-load on vLLM (CPU build) ({data['date']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "hotload.png", dpi=100)


def coldsize(data: dict) -> None:  # type: ignore[type-arg]
    tiers = ("store", "node_disk", "resident")
    sizes = data["sizes"]
    labels = [f"{s['file_MB']:.0f} MB\nrank {s['rank']}, " + ("all-linear" if len(s["target_modules"]) == 7
              else "+".join(s["target_modules"])) for s in sizes.values()]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    for i, t in enumerate(tiers):
        xs = [x + (i - 1) * width for x in range(len(sizes))]
        ax.bar(xs, [s[t]["p50_ms"] for s in sizes.values()], width, label=f"{t.replace('_', ' ')} p50")
        ax.scatter(xs, [s[t]["p99_ms"] for s in sizes.values()], color="black", s=12, zorder=3,
                   label="p99" if i == 0 else None)  # fmt: skip
    ax.axhline(data["target_s"] * 1000, color="grey", linestyle="--", linewidth=1, label="target (2 s)")
    ax.set_xticks(range(len(sizes)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("request -> first token (ms)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"cold first token by size and tier, {data['base_model']['name']} (simulated engine, {data['date']})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(RESULTS / "coldsize.png", dpi=100)


def main() -> None:
    plots = (("affinity", affinity), ("hotpath", hotpath), ("hotload", hotload), ("coldsize", coldsize))
    for name, plot in plots:
        path = RESULTS / f"{name}.json"
        if path.exists():
            plot(json.loads(path.read_text()))
            print(f"wrote bench/results/{name}.png")


if __name__ == "__main__":
    main()
