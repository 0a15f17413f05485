"""`model` strings to targets: the catalog's base models and the tenant's adapters."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as redis

from dataplane.breaker import Breaker
from dataplane.errors import BadRequest, NotFound, Unavailable
from loraplane.catalog import BaseModel, Catalog
from loraplane.state import queries
from loraplane.state.messages import AdapterChanged, Invalidation


@dataclass(frozen=True)
class Target:
    base: BaseModel
    adapter_id: str | None  # also the name vLLM knows the adapter by

    @property
    def upstream_model(self) -> str:
        return self.adapter_id or self.base.name


class Resolver:
    def __init__(self, client: redis.Redis, catalog: Catalog, ttl_s: float, redis_down: Breaker) -> None:
        self._r = client
        self.redis_down = redis_down
        self.catalog = catalog
        self._ttl = ttl_s
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}

    def invalidate(self, message: Invalidation) -> None:
        if isinstance(message, AdapterChanged):
            self._cache.pop((message.tenant_id, message.name), None)

    def forget_id(self, adapter_id: str) -> None:
        for key in [k for k, (aid, _) in self._cache.items() if aid == adapter_id]:
            del self._cache[key]

    def clear(self) -> None:
        self._cache.clear()

    async def resolve(self, tenant_id: str, model: object) -> Target:
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' must be a non-empty string", param="model")
        base_name, sep, adapter_name = model.partition(":")
        base = self.catalog.get(base_name)
        if base is None or (sep and not adapter_name):
            raise _missing(model)
        if not sep:
            return Target(base, None)
        if not base.lora:
            raise BadRequest(
                f"{base.name} is an embedding model; embedding models do not support LoRA adapters", param="model"
            )
        adapter_id = await self._adapter_id(tenant_id, base.name, adapter_name)
        if adapter_id is None:
            raise _missing(model)
        return Target(base, adapter_id)

    async def _adapter_id(self, tenant_id: str, base: str, name: str) -> str | None:
        key = (tenant_id, name)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit and (hit[1] > now or self.redis_down.open):
            return hit[0]
        try:
            rec = await queries.adapter_named(self._r, tenant_id, name)
        except (redis.ConnectionError, redis.TimeoutError):
            self.redis_down.trip()
            if hit:
                return hit[0]
            raise Unavailable("the adapter registry is unavailable right now") from None
        if rec is None or rec.status != "ready" or rec.base_model != base or rec.tenant_id != tenant_id:
            return None
        self._cache[key] = (rec.id, now + self._ttl)
        return rec.id


def _missing(model: str) -> NotFound:
    # The same words whether the adapter is another tenant's or does not exist at all.
    return NotFound(f"The model '{model[:200]}' does not exist.", param="model")
