"""The records stored in Redis (see `keys.SCHEMA` for where), each with its codec: JSON strings
for adapters, workers and activity, hashes for tenants and API keys."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from loraplane.limits import RateLimits


def _json(record: object) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))  # type: ignore[call-overload]


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    tenant_id: str
    name: str
    base_model: str
    status: str  # pending | ready | failed | deleting
    status_reason: str
    source: dict[str, str]
    rank: int
    target_modules: list[str]
    lora_alpha: float
    size_bytes: int
    sha256: str
    created_at: float
    adapter_config: str  # the clean adapter_config.json workers get
    placement_error: str = ""  # why the last placement failed on every worker tried
    placement_failed_at: float = 0.0

    @property
    def vllm_name(self) -> str:
        return self.id

    def to_json(self) -> str:
        return _json(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> AdapterRecord:
        return cls(**json.loads(raw))


# A worker's engine as its agent reports it (`EngineStatus.state` in worker.proto): only SERVING
# takes requests; DOWN is a vLLM the agent attached to (not started) that does not answer;
# RECYCLING an engine whose LoRA slots leaked, finishing its requests before its agent restarts
# it; SLOTS_LEAKED such an engine the agent attached to, and so cannot restart.
ENGINE_STATES = SERVING, STARTING, HUNG, RESTARTING, CRASH_LOOP, DOWN, RECYCLING, SLOTS_LEAKED = (
    "serving", "starting", "hung", "restarting", "crash_loop", "down", "recycling", "slots_leaked",
)  # fmt: skip


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    base_model: str
    endpoint: str
    max_adapters: int  # loaded at once: in its engine's LoRA slots and in host memory (--max-cpu-loras)
    resident: list[str] = field(default_factory=list)
    healthy: bool = True
    updated_at: float = 0.0
    draining: bool = False  # read from the `draining` set, never from the record
    pool: str = ""  # the tenant whose dedicated pool it is in, read from the `pools` hash; "": shared
    owner: str = ""  # address of the control plane replica holding the agent's stream
    engine_state: str = ""  # as the agent reports it (`EngineStatus.state` in worker.proto)
    engine_error: str = ""  # the engine's last error line
    engine_restarts: int = 0  # since the agent started
    max_concurrency: int = 0  # most requests its engine runs at once (--max-num-seqs); 0: not known
    # Of `max_adapters`, its engine's LoRA slots (--max-loras); the others wait in host memory.
    # 0: an agent too old to say (all of `max_adapters` are slots).
    gpu_slots: int = 0
    cached: list[str] = field(default_factory=list)  # sorted: on its node's disk cache, not loaded

    def to_json(self) -> str:
        return _json(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        """Fields a newer writer added are left out: during a rolling upgrade an older reader
        still reads the record (as a newer one reads an older record: its fields have defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})


@dataclass(frozen=True)
class Activity:
    """What a worker is busy with, from its agent's last heartbeats."""

    busy: frozenset[str] = frozenset()  # adapters with requests in flight
    in_flight: int = 0  # requests running or waiting in its vLLM
    owner: str = ""  # address of the control plane replica that wrote it; "": a replica too old to say

    def to_json(self) -> str:
        return json.dumps({"busy": sorted(self.busy), "in_flight": self.in_flight, "owner": self.owner})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Activity:
        a = json.loads(raw)
        return cls(frozenset(a["busy"]), int(a["in_flight"]), str(a.get("owner", "")))


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    tier: str
    created_at: float
    suspended: bool = False
    limits: RateLimits | None = None  # its own rate limits; None: its tier's
    pinned_slots: int | None = None  # its own pinned-adapter allowance; None: its tier's
    spill: bool = False  # its requests may go to shared workers when its pool cannot take them

    def rate_limits(self, tiers: Mapping[str, RateLimits]) -> RateLimits:
        return self.limits if self.limits is not None else tiers.get(self.tier, RateLimits())

    def pin_allowance(self, tiers: Mapping[str, int]) -> int:
        return self.pinned_slots if self.pinned_slots is not None else tiers.get(self.tier, 0)

    @classmethod
    def from_hash(cls, h: Mapping[Any, Any]) -> Tenant:
        return cls(
            id=str(h["id"]),
            name=str(h["name"]),
            tier=str(h["tier"]),
            created_at=float(h["created_at"]),
            suspended=h.get("suspended") == "1",
            limits=limits_from_json(h["limits"]) if h.get("limits") else None,
            pinned_slots=int(h["pinned_slots"]) if h.get("pinned_slots") else None,
            spill=h.get("spill") == "1",
        )


def limits_to_json(limits: RateLimits) -> str:
    """A tenant's own rate limits, as its hash's `limits` field holds them."""
    return _json(limits)


def limits_from_json(raw: str | bytes) -> RateLimits:
    d = json.loads(raw)
    return RateLimits(rpm=int(d.get("rpm", 0)), tpm=int(d.get("tpm", 0)), concurrency=int(d.get("concurrency", 0)))


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: under the sha256 of the key, never the key itself."""

    prefix: str  # the key's public beginning, shown to operators
    tenant_id: str
    created_at: float

    def to_hash(self) -> dict[str, str]:
        return {"tenant_id": self.tenant_id, "prefix": self.prefix, "created_at": str(self.created_at)}

    @classmethod
    def from_hash(cls, h: Mapping[Any, Any]) -> ApiKey:
        return cls(prefix=str(h["prefix"]), tenant_id=str(h["tenant_id"]), created_at=float(h["created_at"]))
