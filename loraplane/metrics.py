"""Prometheus metrics for every component: counters, gauges and histograms keyed by label values,
rendered in the text exposition format, and a small `/metrics` HTTP server for the processes
that have no HTTP server of their own (control plane, agent).

Written for the asyncio processes here: no locks (one thread touches them), no allocation per
observation beyond the label tuple. Label values must come from bounded sets (base models in the
catalog, status codes, worker ids, fixed reasons); nothing here enforces that, the callers do.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TypeVar

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Family:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, labels

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(Family):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] += by

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labelnames, key)} {value:g}"


class Gauge(Family):
    """Set directly, or read from `source` (label values -> value) at each scrape."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labels: tuple[str, ...] = (),
        source: Callable[[], dict[tuple[str, ...], float]] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}
        self._source = source

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def add(self, *labels: str, by: float) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def samples(self) -> Iterable[str]:
        values = self._source() if self._source else self.values
        for key, value in sorted(values.items()):
            yield f"{self.name}{_labels(self.labelnames, key)} {value:g}"


class Histogram(Family):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = buckets
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, *labels: str, value: float) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def samples(self) -> Iterable[str]:
        for key, counts in sorted(self.counts.items()):
            total = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                total += n
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound:g}"'
                yield f"{self.name}_bucket{_labels(self.labelnames, key, le)} {total}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {self.sums[key]:g}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {total}"


F = TypeVar("F", bound=Family)


class Registry:
    def __init__(self) -> None:
        self.families: list[Family] = []

    def add(self, family: F) -> F:
        self.families.append(family)
        return family

    def render(self) -> str:
        return "".join(f.render() for f in self.families)


async def serve(registry: Registry, addr: str) -> asyncio.Server | None:
    """`GET /metrics` on `addr` ("host:port"; empty: no server). Anything else is a 404."""
    if not addr:
        return None
    host, _, port = addr.rpartition(":")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = registry.render().encode(), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; version=0.0.4\r\n"
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
