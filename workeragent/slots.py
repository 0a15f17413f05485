"""LoRA slots as vLLM reports them, and the one way it shows that some leaked.

vLLM can answer an unload with success and drop the adapter from /v1/models while its slot stays
taken (a known vLLM bug class): later loads are refused for lack of a free slot although vLLM
lists fewer adapters than it has slots. vLLM 0.32 counts taken slots nowhere the agent can read
(its /metrics says only `max_lora`), so a leak shows when a load is refused: `judge` tells a
refusal that proves one from a refusal that a load or unload running at the same time explains.

With a host-memory tier (`--max-cpu-loras` above `--max-loras`) vLLM lists more adapters than it
has slots: those in host memory wait for a slot, which vLLM frees for them by deactivating the
least recently used adapter. A load it refuses for want of a slot while it lists fewer adapters
than it holds loaded at once (`capacity`) proves a leak as well.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp

from workeragent.vllm import VllmClient, VllmError

# vLLM's words for a load refused for want of a slot ("No free adapter slots.", "No free lora
# slots", vllm/lora/model_manager.py) and the simulator's ("no free LoRA slot").
NO_FREE_SLOT = re.compile(r"\bno free (lora |adapter )?slots?\b", re.IGNORECASE)


@dataclass(frozen=True)
class Leak:
    listed: int  # adapters vLLM lists (/v1/models)
    slots: int  # its LoRA slots (max_lora)
    capacity: int = 0  # adapters it holds loaded at once, in slots and host memory; 0: `slots`

    @property
    def leaked(self) -> int:
        """Slots taken by adapters vLLM unloaded: at least this many (with a host-memory tier,
        vLLM does not say which listed adapters hold a slot)."""
        return max(self.slots - self.listed, 1)

    def __str__(self) -> str:
        if self.capacity <= self.slots:
            return (
                f"LoRA slots leaked: vLLM refused a load for lack of a free slot while it lists adapters in "
                f"{self.listed} of its {self.slots} slots ({self.leaked} taken by adapters it unloaded)"
            )
        return (
            f"LoRA slots leaked: vLLM refused a load for lack of a free slot while it lists {self.listed} of the "
            f"{self.capacity} adapters it holds ({self.slots} in slots, the others in host memory; at least "
            f"{self.leaked} slot{'s' if self.leaked > 1 else ''} taken by adapters it unloaded)"
        )


class SlotLeak(VllmError):
    """A load vLLM refused because slots leaked."""

    def __init__(self, leak: Leak) -> None:
        super().__init__(str(leak))
        self.leak = leak


class Ledger:
    """The agent's loads and unloads on vLLM, counted so that a refused load can be judged on its
    own: vLLM's slots held what it lists and nothing else only if no other load or unload ran at
    any moment between that load's start and the judgement."""

    def __init__(self) -> None:
        self._running = 0
        self._changes = 0  # loads and unloads started or ended

    @contextlib.contextmanager
    def change(self) -> Iterator[Callable[[], bool]]:
        """Around a load or an unload: yields `alone()`, whether no other one has run since it began."""
        first = self._running == 0
        self._running += 1
        self._changes += 1
        mark = self._changes
        try:
            yield lambda: first and self._changes == mark
        finally:
            self._running -= 1
            self._changes += 1


async def judge(
    err: VllmError, client: VllmClient, default_slots: int, alone: Callable[[], bool], capacity: int = 0
) -> Leak | None:
    """The leak a refused load proves, if it does: refused for want of a free slot while vLLM lists
    fewer adapters than it holds loaded at once (its slots: its `max_lora`, else `default_slots`,
    what the agent asked for; or `capacity`, its host-memory tier's, when that is more), no other
    load or unload running meanwhile. None when it proves nothing, or vLLM does not say."""
    if not NO_FREE_SLOT.search(str(err)):
        return None
    try:
        listed = len(await client.resident())
        slots = await client.max_loras() or default_slots
    except (VllmError, aiohttp.ClientError, TimeoutError, ValueError):
        return None
    capacity = max(capacity, slots)
    return Leak(listed, slots, capacity) if listed < capacity and alone() else None
