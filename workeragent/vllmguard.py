"""An ASGI middleware the agent installs into the vLLM it starts (`--middleware`).

vLLM's own API key guards only paths under /v1 (so /sleep, /pause, /collective_rpc … are open)
and one key opens everything, load and unload included. Data planes hold the worker API key, so
with this guard they reach only what serving needs; every other path, LoRA loading above all,
answers 403 unless the request carries the agent's secret, which only the agent knows.

vLLM imports this module inside its own process: it must need nothing beyond the standard
library and what vLLM already depends on (Starlette, under FastAPI).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

SECRET_ENV = "LORAPLANE_VLLM_AGENT_SECRET"
SECRET_HEADER = "x-loraplane-agent-secret"
# What data planes and Prometheus may call; everything else is the agent's (a stored response,
# `/v1/responses/{id}`, included: none is stored, and none could be read by another tenant).
SERVING_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/health",
     "/metrics", "/version"}
)  # fmt: skip


class AgentOnly:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        secret = os.environ.get(SECRET_ENV, "")
        if len(secret) < 16:
            raise RuntimeError(f"{SECRET_ENV} must hold the agent's secret (at least 16 characters)")
        self._digest = hashlib.sha256(secret.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "this path is reserved to the worker agent"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        if scope["type"] == "http" and scope["path"] in SERVING_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == SECRET_HEADER.encode():
                return hmac.compare_digest(hashlib.sha256(value).digest(), self._digest)
        return False
