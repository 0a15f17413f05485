"""What loraplane accepts, defined once: names, adapter sizes, tensor dtypes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# An adapter, base model or worker name: a letter or digit, then up to 63 of these.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The largest adapter file accepted, unless LORAPLANE_MAX_ADAPTER_BYTES says otherwise.
MAX_ADAPTER_BYTES = 500 * 1000 * 1000

# The safetensors dtypes an adapter's tensors may have, and their size in bytes.
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}


@dataclass(frozen=True)
class RateLimits:
    """A tenant's rate limits; 0 is unlimited."""

    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens (prompt + completion) per minute
    concurrency: int = 0  # requests in flight at once, over all data planes


# Per tier unless LORAPLANE_TIER_<TIER>_{RPM,TPM,CONCURRENCY} say otherwise; a tenant's own
# limits (`loraplane tenant set-limits`) replace its tier's.
TIER_RATE_LIMITS = {
    "shared": RateLimits(rpm=600, tpm=400_000, concurrency=32),
    "reserved": RateLimits(rpm=3_000, tpm=2_000_000, concurrency=128),
    "dedicated": RateLimits(rpm=0, tpm=0, concurrency=0),  # its own workers: bounded by them
}


def tier_var(tier: str, what: str) -> str:
    return f"LORAPLANE_TIER_{tier.upper()}_{what}"


RATE_VARS = tuple(tier_var(t, w) for t in TIER_RATE_LIMITS for w in ("RPM", "TPM", "CONCURRENCY"))


def tier_rate_limits(environ: Mapping[str, str], _: Mapping[str, Any] | None = None) -> dict[str, RateLimits]:
    """Each tier's rate limits, from LORAPLANE_TIER_<TIER>_{RPM,TPM,CONCURRENCY} over the defaults
    (a `config.derived` reader: the data plane enforces them, the control plane shows them)."""
    from loraplane import config

    def get(tier: str, what: str, default: int) -> int:
        n = config.get(environ, tier_var(tier, what), int, default)
        if n < 0:
            raise config.ConfigError(f"{tier_var(tier, what)}={n}: must be 0 (unlimited) or more")
        return n

    return {
        t: RateLimits(
            rpm=get(t, "RPM", d.rpm), tpm=get(t, "TPM", d.tpm), concurrency=get(t, "CONCURRENCY", d.concurrency)
        )
        for t, d in TIER_RATE_LIMITS.items()
    }


# Adapters a tenant may pin (always resident) per tier, unless LORAPLANE_TIER_<TIER>_PINNED_SLOTS
# says otherwise; a tenant's own allowance (`loraplane tenant set-capacity`) replaces its tier's.
TIER_PINNED_SLOTS = {"shared": 0, "reserved": 2, "dedicated": 2}
PINNED_SLOT_VARS = tuple(tier_var(t, "PINNED_SLOTS") for t in TIER_PINNED_SLOTS)

# A tier's weight in the data plane's fair queuing when a base model's workers are full (a tenant
# gets this share of the capacity against a shared-tier tenant's 1), unless
# LORAPLANE_TIER_<TIER>_WEIGHT says otherwise.
TIER_WEIGHTS = {"shared": 1, "reserved": 4, "dedicated": 4}
WEIGHT_VARS = tuple(tier_var(t, "WEIGHT") for t in TIER_WEIGHTS)


def _per_tier(environ: Mapping[str, str], what: str, defaults: Mapping[str, int], least: int) -> dict[str, int]:
    from loraplane import config

    out = {}
    for tier, default in defaults.items():
        n = config.get(environ, tier_var(tier, what), int, default)
        if n < least:
            raise config.ConfigError(f"{tier_var(tier, what)}={n}: must be {least} or more")
        out[tier] = n
    return out


def tier_pinned_slots(environ: Mapping[str, str], _: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Each tier's pinned-adapter allowance (a `config.derived` reader)."""
    return _per_tier(environ, "PINNED_SLOTS", TIER_PINNED_SLOTS, 0)


def tier_weights(environ: Mapping[str, str], _: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Each tier's fair-queuing weight (a `config.derived` reader)."""
    return _per_tier(environ, "WEIGHT", TIER_WEIGHTS, 1)
