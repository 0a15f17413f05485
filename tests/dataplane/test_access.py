"""One path for what every request goes through: the hot path (plain ASGI), a Starlette route, an
unknown path and a request refused for its headers each get their id echoed, one count in the
metrics and one access line. The data plane runs in this process on a real socket, with a real
Redis; no control plane or worker is needed for these answers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from dataplane.app import MAX_HEADER_BYTES, create_app
from dataplane.settings import Settings
from loraplane.catalog import Catalog
from tests.support import RedisServer

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def dataplane(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[str]:
    catalog = tmp_path / "catalog.json"
    Catalog.write(catalog, [{"name": "tiny-llama", "kind": "chat", "path": str(tmp_path), "lora": False}])
    settings = Settings(redis_url=redis_server.url, catalog_path=catalog, controlplane_addr="127.0.0.1:9")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections wait in the backlog until the app has started
    config = uvicorn.Config(create_app(settings), log_config=None, log_level="warning", lifespan="on", ws="none")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def scrape(client: httpx.AsyncClient) -> Series:
    page = (await client.get("/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def moved(before: Series, after: Series) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The request counts that changed (the scrapes' own left out)."""
    counts = ("loraplane_dataplane_requests_total", "loraplane_requests_total")
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0] in counts and ("path", "/metrics") not in key[1] and after[key] != before.get(key, 0.0)
    }


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "path_label", "inference"),
    [
        ("POST", "/v1/chat/completions", {}, 401, "/v1/chat/completions", True),  # the hot path
        ("GET", "/v1/adapters/adp_x", {}, 401, "/v1/adapters/{id}", False),  # a Starlette route
        ("GET", "/healthz", {}, 200, "/healthz", False),
        ("GET", "/nowhere", {}, 404, "other", False),  # Starlette's own 404
        ("POST", "/v1/completions", {"x-big": "x" * MAX_HEADER_BYTES}, 413, "/v1/completions", False),
    ],
)
async def test_every_request_is_counted_once_and_logged_once(
    dataplane: str,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    path_label: str,
    inference: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="loraplane.access")
    async with httpx.AsyncClient(base_url=dataplane) as client:
        before = await scrape(client)
        caplog.clear()
        r = await client.request(method, path, headers={"x-request-id": "req-one-path", **headers}, json={})
        lines = [rec for rec in caplog.records if rec.name == "loraplane.access"]
        after = await scrape(client)
    assert r.status_code == status
    assert r.headers.get_list("x-request-id") == ["req-one-path"]
    if status >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [(rec.method, rec.path, rec.status) for rec in lines] == [(method, path, status)]  # type: ignore[attr-defined]
    expected = {("loraplane_dataplane_requests_total", labels(path=path_label, status=str(status))): 1.0}
    if inference:
        expected[("loraplane_requests_total", labels(component="dataplane", base_model="", status=str(status)))] = 1.0
    assert moved(before, after) == expected
    assert after[("loraplane_dataplane_requests_in_flight", frozenset())] == 1  # the scrape itself
