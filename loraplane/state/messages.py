"""What the control plane publishes on the channels in `keys`, and how it reads back.

`keys.ROUTING_CHANNEL` carries routing table versions (a decimal integer). `keys.INVALIDATE_CHANNEL`
carries `Invalidation`s: "adapter:<tenant id>:<name>" (the tenant's adapter of that name changed)
"key:<sha256 of the key>" (the key was revoked or its tenant suspended) and "tenant:<tenant id>"
(its tier or its rate limits changed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterChanged:
    tenant_id: str
    name: str

    def encode(self) -> str:
        return f"adapter:{self.tenant_id}:{self.name}"


@dataclass(frozen=True)
class KeyChanged:
    key_hash: str

    def encode(self) -> str:
        return "key:" + self.key_hash


@dataclass(frozen=True)
class TenantChanged:
    tenant_id: str

    def encode(self) -> str:
        return "tenant:" + self.tenant_id


Invalidation = AdapterChanged | KeyChanged | TenantChanged


def decode_invalidation(raw: str) -> Invalidation | None:
    """The message, or None for one this version does not know."""
    kind, _, rest = raw.partition(":")
    if kind == "key" and rest:
        return KeyChanged(rest)
    if kind == "tenant" and rest:
        return TenantChanged(rest)
    tenant_id, sep, name = rest.partition(":")
    if kind == "adapter" and sep:
        return AdapterChanged(tenant_id, name)
    return None


def encode_routing_version(version: int) -> str:
    return str(version)
