"""The data plane's Prometheus metrics: requests by path and status, their total time, requests
in flight. A pure ASGI middleware that counts (no per-request allocation beyond a tuple key);
the label sets are bounded: unknown paths count as "other"."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplane import metrics

PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/adapters",
     "/v1/adapters/upload", "/healthz", "/readyz", "/metrics"}
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.in_flight = 0
        # The fleet-wide families (the Grafana dashboard's): by base model, bounded label sets.
        r = self.registry = metrics.Registry()
        self.answered = r.add(
            metrics.Counter(
                "loraplane_requests_total",
                "Inference requests answered, by base model and status.",
                ("component", "base_model", "status"),
            )
        )
        self.latency = r.add(
            metrics.Histogram(
                "loraplane_request_seconds", "Inference request duration, by base model.", ("base_model",)
            )
        )
        self.first_byte = r.add(
            metrics.Histogram(
                "loraplane_time_to_first_token_seconds",
                "Time to the answer's first byte (a stream's first token), by base model.",
                ("base_model",),
            )
        )
        self.routing = r.add(
            metrics.Counter(
                "loraplane_routing_total",
                "Adapter requests: hit (a worker already held the adapter) or miss (placed first).",
                ("result",),
            )
        )
        self.cold_waiting = r.add(
            metrics.Gauge("loraplane_cold_placements_waiting", "Requests waiting for their adapter to be placed.")
        )
        self.cold_waiting.set(value=0)
        self.upload_bytes = r.add(metrics.Counter("loraplane_upload_bytes_total", "Adapter bytes received by uploads."))
        self.upload_rejections = r.add(
            metrics.Counter("loraplane_upload_rejections_total", "Uploads refused, by reason.", ("reason",))
        )
        self.redis_up = r.add(
            metrics.Gauge("loraplane_redis_up", "1 if Redis answers (as far as this process knows).", ("component",))
        )
        self.controlplane_up = r.add(
            metrics.Gauge("loraplane_controlplane_up", "1 if the control plane is reachable.", ("component",))
        )

    def render(self, gauges: dict[str, float]) -> str:
        lines = [
            "# HELP loraplane_dataplane_requests_total Requests answered, by path and status.",
            "# TYPE loraplane_dataplane_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'loraplane_dataplane_requests_total{{path="{path}",status="{status}"}} {n}')
        lines += [
            "# HELP loraplane_dataplane_request_seconds_total Time spent answering, by path.",
            "# TYPE loraplane_dataplane_request_seconds_total counter",
        ]
        for path, s in sorted(self.seconds.items()):
            lines.append(f'loraplane_dataplane_request_seconds_total{{path="{path}"}} {s:.6f}')
        lines += [
            "# HELP loraplane_dataplane_requests_in_flight Requests being answered now.",
            "# TYPE loraplane_dataplane_requests_in_flight gauge",
            f"loraplane_dataplane_requests_in_flight {self.in_flight}",
        ]
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n" + self.registry.render()


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path not in PATHS:
            path = "/v1/adapters/{id}" if path.startswith("/v1/adapters/") else "other"
        m = self.metrics
        status = 500
        started = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            m.in_flight -= 1
            m.requests[path, status] += 1
            m.seconds[path] += time.perf_counter() - started
