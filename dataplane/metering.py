"""Usage metering: the tokens of every answered request, per tenant, `model` and minute, counted
in memory on the hot path (one dict update) and written to Redis in batches, exactly once.

What a worker reports is what counts: `usage` of a whole answer; for a stream, the usage vLLM
sends in every event when asked (`stream_options.continuous_usage_stats`, which the data plane
always asks for and strips when the client did not), so a stream its client cut off is counted
with the tokens generated until then. Only an answer that reached the client counts: a request
retried on another worker was not answered by the first (nothing reached its client), so it is
counted once.

A batch carries an id (this process's random id and a sequence number); `usage.record` applies
an id once, so a batch whose write may or may not have landed (Redis slow or away) is sent again,
as it was, until Redis says it has it. A data plane killed with -9 loses what it counted since
its last batch landed: at most `every_s` plus a write.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import redis.asyncio as redis

from loraplane.state import usage
from loraplane.state.usage import Cell, Counts

log = logging.getLogger(__name__)


class Meter:
    def __init__(self, client: redis.Redis, retention: usage.Retention, every_s: float = 0.5) -> None:
        self._r = client
        self._retention = retention
        self.every_s = every_s
        self._id = secrets.token_hex(8)
        self._seq = 0
        self._counting: dict[Cell, Counts] = {}
        self._unsent: tuple[str, dict[Cell, Counts]] | None = None  # a batch not known to have landed

    def add(self, tenant_id: str, kind: str, model: str, adapter_id: str, counts: Counts) -> None:
        cell = Cell(tenant_id, int(time.time()) // 60 * 60, kind, model, adapter_id)
        have = self._counting.get(cell)
        if have is None:
            self._counting[cell] = Counts(*counts.values())
        else:
            have.add(counts)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.flush()

    async def flush(self) -> bool:
        """Send the unsent batch, else what was counted since; True when nothing is left unsent."""
        if self._unsent is None:
            if not self._counting:
                return True
            self._seq += 1
            self._unsent = (f"{self._id}:{self._seq}", self._counting)
            self._counting = {}
        batch_id, cells = self._unsent
        try:
            await usage.record(self._r, batch_id, cells, self._retention)
        except redis.RedisError as err:  # sent again as it is: Redis applies an id once
            log.warning("recording usage failed (kept, sent again): %s", err)
            return False
        self._unsent = None
        return not self._counting


RESPONSES_ENDS = ("response.completed", "response.failed", "response.incomplete")


class Seen:
    """The usage a worker reported for one request so far: a whole answer's, or a stream's
    (its events' continuous usage, per choice; the final usage event's when it comes)."""

    __slots__ = ("prompt", "cached", "completion", "final", "sequence", "ended")

    def __init__(self) -> None:
        self.prompt = 0
        self.cached = 0
        self.completion: dict[int, int] = {}  # choice index -> its tokens so far
        self.final: Counts | None = None
        self.sequence = -1  # a Responses stream's last `sequence_number`
        self.ended = False  # a Responses stream's last event came (completed, failed or incomplete)

    def answer(self, obj: dict[str, Any]) -> None:
        """A whole answer's `usage` (chat, completions, embeddings, Responses)."""
        u = obj.get("usage")
        if isinstance(u, dict):
            self.final = counts(u)

    def event(self, obj: dict[str, Any]) -> None:
        """A stream event's usage: a chunk's continuous usage or the last event's total."""
        sequence = obj.get("sequence_number")
        if type(sequence) is int:
            self.sequence = sequence
            self.ended = obj.get("type") in RESPONSES_ENDS
        if obj.get("type") == "response.completed":  # a Responses API stream's end
            response = obj.get("response")
            if isinstance(response, dict):
                self.answer(response)
            return
        u = obj.get("usage")
        if not isinstance(u, dict):
            return
        choices = obj.get("choices")
        if choices:  # continuous: this choice's tokens so far
            self.prompt = _int(u.get("prompt_tokens"))
            index = choices[0].get("index", 0) if isinstance(choices[0], dict) else 0
            self.completion[_int(index)] = _int(u.get("completion_tokens"))
        else:  # the usage event: the whole request's
            self.final = counts(u)

    def total(self) -> Counts | None:
        if self.final is not None:
            return self.final
        if not self.prompt and not self.completion:
            return None
        return Counts(input_tokens=self.prompt, output_tokens=sum(self.completion.values()), requests=1)


def counts(u: dict[str, Any]) -> Counts:
    """OpenAI's `usage` of chat and completions (prompt/completion tokens) or of the Responses
    API (input/output tokens), cached tokens from its details."""
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Counts(
        input_tokens=_int(u.get("prompt_tokens", u.get("input_tokens"))),
        output_tokens=_int(u.get("completion_tokens", u.get("output_tokens"))),
        cached_tokens=_int(cached),
        requests=1,
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
