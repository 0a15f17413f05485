"""Redis is down: say so once, and stop asking for a while.

After a failed Redis call, the caches serve what they hold (however old) without trying Redis
again until `retry_after_s` has passed: one request probes, the others are not held up by
Redis's timeout."""

from __future__ import annotations

import time


class Breaker:
    def __init__(self, retry_after_s: float = 5.0) -> None:
        self._retry_after = retry_after_s
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def trip(self) -> None:
        self._open_until = time.monotonic() + self._retry_after
