"""The control plane's Prometheus metrics, served on LORAPLANE_METRICS_ADDR (see server.py)."""

from __future__ import annotations

from loraplane import metrics

REGISTRY = metrics.Registry()
CALLS = REGISTRY.add(
    metrics.Counter(
        "loraplane_requests_total", "gRPC calls answered, by status.", ("component", "base_model", "status")
    )
)
LOADS = REGISTRY.add(
    metrics.Counter(
        "loraplane_adapter_loads_total", "Adapter loads, by base model and result.", ("base_model", "result")
    )
)
LOAD_SECONDS = REGISTRY.add(
    metrics.Histogram("loraplane_adapter_load_seconds", "Adapter load time on a worker.", ("base_model",))
)
EVICTIONS = REGISTRY.add(
    metrics.Counter("loraplane_adapter_evictions_total", "Adapters evicted from workers.", ("base_model",))
)
REDIS_UP = REGISTRY.add(metrics.Gauge("loraplane_redis_up", "1 if Redis answered the last check.", ("component",)))
AGENTS = REGISTRY.add(
    metrics.Gauge("loraplane_agents_connected", "Worker agents with a stream open to this replica.", ("base_model",))
)
