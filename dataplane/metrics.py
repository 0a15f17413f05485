"""The data plane's Prometheus metrics, on a registry of its own. Every request is counted once,
when it ends (`access.Exchange.finish`), whichever path answered it (not a connection cut off
before its headers were whole: that 408 has an access line only); the label sets are bounded:
unknown paths count as "other", base models are the catalog's."""

from __future__ import annotations

from loraplane import metrics

PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/adapters",
     "/v1/adapters/upload", "/healthz", "/readyz", "/metrics", "/v1/responses", "/v1/usage/completions",
     "/v1/usage/embeddings"}
)  # fmt: skip


def path_label(path: str) -> str:
    if path in PATHS:
        return path
    return "/v1/adapters/{id}" if path.startswith("/v1/adapters/") else "other"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = metrics.CollectorRegistry()
        # Every request, by path.
        self.requests = metrics.Counter(
            r, "loraplane_dataplane_requests_total", "Requests answered, by path and status.", ("path", "status")
        )
        self.seconds = metrics.Counter(
            r, "loraplane_dataplane_request_seconds_total", "Time spent answering, by path.", ("path",)
        )
        self.in_flight = metrics.Gauge(r, "loraplane_dataplane_requests_in_flight", "Requests being answered now.")
        # The fleet-wide families (the Grafana dashboard's): by base model, bounded label sets.
        self.answered = metrics.Counter(
            r,
            "loraplane_requests_total",
            "Inference requests answered, by base model and status.",
            ("component", "base_model", "status"),
        )
        self.latency = metrics.Histogram(
            r, "loraplane_request_seconds", "Inference request duration, by base model.", ("base_model",)
        )
        self.first_byte = metrics.Histogram(
            r,
            "loraplane_time_to_first_token_seconds",
            "Time to the answer's first byte (a stream's first token), by base model.",
            ("base_model",),
        )
        self.routing = metrics.Counter(
            r,
            "loraplane_routing_total",
            "Adapter requests: hit (a worker already held the adapter) or miss (placed first).",
            ("result",),
        )
        self.cold_waiting = metrics.Gauge(
            r, "loraplane_cold_placements_waiting", "Requests waiting for their adapter to be placed."
        )
        self.upload_bytes = metrics.Counter(r, "loraplane_upload_bytes_total", "Adapter bytes received by uploads.")
        self.upload_rejections = metrics.Counter(
            r, "loraplane_upload_rejections_total", "Uploads refused, by reason.", ("reason",)
        )
        # Usage and rate limits, by base model and tier (per tenant: the usage API, not labels).
        self.tokens = metrics.Counter(
            r,
            "loraplane_tokens_total",
            "Tokens of answered requests as their workers reported them, by base model, tier and direction.",
            ("base_model", "tier", "direction"),
        )
        self.metered = metrics.Counter(
            r,
            "loraplane_metered_requests_total",
            "Answered requests counted in usage, by base model and tier.",
            ("base_model", "tier"),
        )
        self.rate_limited = metrics.Counter(
            r,
            "loraplane_rate_limited_total",
            "Requests refused with a 429 by a tenant's rate limits, by reason (requests, tokens, concurrency, "
            "too_large).",
            ("reason",),
        )
        # Fair queuing when a base model's workers are full (`fairshare`), by tier.
        self.queue_depth = metrics.Gauge(
            r,
            "loraplane_queue_depth",
            "Requests waiting for a slot on a full base model's workers, by base model and tier.",
            ("base_model", "tier"),
        )
        self.queue_wait = metrics.Histogram(
            r,
            "loraplane_queue_wait_seconds",
            "Time requests waited for a slot on their base model's workers, by tier (those that found others "
            "waiting: some wait no time, their turn came at once).",
            ("tier",),
        )
        self.queue_rejected = metrics.Counter(
            r,
            "loraplane_queue_rejected_total",
            "Requests refused while waiting for a slot, by tier and reason (timeout: 503, full: 429).",
            ("tier", "reason"),
        )
        # Read from the process's state at each scrape (see `app.metrics_endpoint`).
        self.redis_up = metrics.Gauge(
            r, "loraplane_redis_up", "1 if Redis answers (as far as this process knows).", ("component",)
        )
        self.controlplane_up = metrics.Gauge(
            r, "loraplane_controlplane_up", "1 if the control plane is reachable.", ("component",)
        )
        self.routing_version = metrics.Gauge(
            r, "loraplane_dataplane_routing_version", "Version of the routing table in use (-1: none read yet)."
        )
        self.healthy_workers = metrics.Gauge(
            r, "loraplane_dataplane_healthy_workers", "Healthy workers in the routing table."
        )
        self.placements_waiting = metrics.Gauge(
            r, "loraplane_dataplane_placements_waiting", "Placements asked of the control plane, not answered yet."
        )

    def ended(self, path: str, status: int, seconds: float, base_model: str | None, first_byte_s: float | None) -> None:
        """One request's end. `base_model` is None for a request that is not an inference one, ""
        for one whose `model` never resolved."""
        self.requests.inc(path, str(status))
        self.seconds.inc(path, by=seconds)
        if base_model is None:
            return
        self.answered.inc("dataplane", base_model, str(status))
        if base_model:
            self.latency.observe(base_model, value=seconds)
            if first_byte_s is not None and status == 200:
                self.first_byte.observe(base_model, value=first_byte_s)

    def render(self) -> bytes:
        return metrics.render(self.registry)
