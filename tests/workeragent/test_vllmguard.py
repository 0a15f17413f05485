"""The guard the agent installs into vLLM, in front of a stand-in ASGI app. (The end-to-end
suite checks it inside a real vLLM.)"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from workeragent import vllmguard

SECRET = "s" * 32


async def reached(request: Request) -> PlainTextResponse:
    return PlainTextResponse("reached")


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> httpx.AsyncClient:
    monkeypatch.setenv(vllmguard.SECRET_ENV, SECRET)
    app = Starlette(routes=[Route("/{path:path}", reached, methods=["GET", "POST"])])
    app.add_middleware(vllmguard.AgentOnly)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vllm")


@pytest.mark.parametrize("path", sorted(vllmguard.SERVING_PATHS))
async def test_serving_paths_are_open(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.post(path)).text == "reached"


@pytest.mark.parametrize(
    "path",
    ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/collective_rpc", "/pause", "/v1/models/",
     "/V1/chat/completions", "/v1/chat/completions/../../v1/load_lora_adapter", "/"],
)  # fmt: skip
async def test_everything_else_needs_the_agent_secret(client: httpx.AsyncClient, path: str) -> None:
    refused = await client.post(path)
    assert refused.status_code == 403 and "agent" in refused.json()["error"]
    assert (await client.post(path, headers={vllmguard.SECRET_HEADER: "wrong" * 8})).status_code == 403
    assert (await client.post(path, headers={vllmguard.SECRET_HEADER: SECRET})).text == "reached"


def test_vllm_without_a_secret_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllmguard.SECRET_ENV, "short")
    with pytest.raises(RuntimeError, match=vllmguard.SECRET_ENV):
        vllmguard.AgentOnly(Starlette())
