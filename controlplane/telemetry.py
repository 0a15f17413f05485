"""The control plane's Prometheus metrics, served on LORAPLANE_METRICS_ADDR (see server.py)."""

from __future__ import annotations

from loraplane import metrics

REGISTRY = metrics.CollectorRegistry()
CALLS = metrics.Counter(
    REGISTRY, "loraplane_requests_total", "gRPC calls answered, by status.", ("component", "base_model", "status")
)
LOADS = metrics.Counter(
    REGISTRY, "loraplane_adapter_loads_total", "Adapter loads, by base model and result.", ("base_model", "result")
)
LOAD_SECONDS = metrics.Histogram(
    REGISTRY, "loraplane_adapter_load_seconds", "Adapter load time on a worker.", ("base_model",)
)
EVICTIONS = metrics.Counter(
    REGISTRY, "loraplane_adapter_evictions_total", "Adapters evicted from workers.", ("base_model",)
)
REDIS_UP = metrics.Gauge(REGISTRY, "loraplane_redis_up", "1 if Redis answered the last check.", ("component",))
AGENTS = metrics.Gauge(
    REGISTRY, "loraplane_agents_connected", "Worker agents with a stream open to this replica.", ("base_model",)
)
ENGINES = metrics.Gauge(
    REGISTRY,
    "loraplane_workers_by_engine_state",
    "This replica's connected workers, by their engine's state as their agents report it.",
    ("base_model", "state"),
)
