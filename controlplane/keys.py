"""API keys and ids. Keys are random; only their sha256 is ever stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from controlplane.errors import Unauthenticated

KEY_PREFIX = "lp_"


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 8]


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer credential from gRPC metadata; Unauthenticated if absent or malformed."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, cred = value.partition(" ")
            if scheme.lower() == "bearer" and 0 < len(cred) <= 256:
                return cred.strip()
    raise Unauthenticated("missing or invalid credentials")


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())
