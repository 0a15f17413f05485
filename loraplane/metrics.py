"""Prometheus metrics for every component, on `prometheus_client`: each component builds its own
`CollectorRegistry` (several components share a test process, so never the global default one),
adds its families through the small typed wrappers here, and serves `render(registry)`; the
control plane and the agent, which have no HTTP server of their own, with `serve()`.

The wrappers keep call sites one short line (`REQUESTS.inc("dataplane", base, "200")`) and cache
each label set's child, so the hot path pays one dict lookup, not `labels()`'s validation, per
observation. Label values must come from bounded sets (base models in the catalog, status codes,
worker ids, fixed reasons); nothing here enforces that, the callers do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "CollectorRegistry", "Counter", "Gauge", "Histogram", "Sampled", "render", "serve"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what `generate_latest` writes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The series these components have always exported, and no `<name>_created` next to each.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

M = TypeVar("M", bound=MetricWrapperBase)


class _Family(Generic[M]):
    def __init__(self, family: M, labels: tuple[str, ...]) -> None:
        self.family, self.labelnames = family, labels
        self._children: dict[tuple[str, ...], M] = {} if labels else {(): family}

    def child(self, labels: tuple[str, ...]) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.family.labels(*labels)
        return child


class Counter(_Family[prometheus_client.Counter]):
    """`name` as exported, `_total` included (prometheus_client adds it to the family's name)."""

    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(prometheus_client.Counter(name, help, labels, registry=registry), labels)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.child(labels).inc(by)


class Gauge(_Family[prometheus_client.Gauge]):
    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(prometheus_client.Gauge(name, help, labels, registry=registry), labels)

    def set(self, *labels: str, value: float) -> None:
        self.child(labels).set(value)

    def add(self, *labels: str, by: float) -> None:
        self.child(labels).inc(by)

    @property
    def values(self) -> dict[tuple[str, ...], float]:
        """Each label set set so far, with its value."""
        return {
            tuple(s.labels[n] for n in self.labelnames): s.value
            for family in self.family.collect()
            for s in family.samples
        }


class Histogram(_Family[prometheus_client.Histogram]):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(prometheus_client.Histogram(name, help, labels, registry=registry, buckets=buckets), labels)

    def observe(self, *labels: str, value: float) -> None:
        self.child(labels).observe(value)


class Sampled(Collector):
    """A gauge family read at each scrape: `read()` gives label values -> value."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help: str,
        labels: tuple[str, ...],
        read: Callable[[], dict[tuple[str, ...], float]],
    ) -> None:
        self.name, self.help, self.labels, self._read = name, help, labels, read
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for values, value in sorted(self._read().items()):
            family.add_metric(values, value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.help, labels=self.labels)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the text exposition format (`CONTENT_TYPE`)."""
    return prometheus_client.generate_latest(registry)


async def serve(registry: CollectorRegistry, addr: str) -> asyncio.Server | None:
    """`GET /metrics` on `addr` ("host:port"; empty: no server). Anything else is a 404.

    On the process's own event loop (prometheus_client's server would add a thread)."""
    if not addr:
        return None
    host, _, port = addr.rpartition(":")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = render(registry), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: " + CONTENT_TYPE.encode() + b"\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host or "127.0.0.1", int(port))
    log.info("metrics on http://%s/metrics", addr)
    return server
