"""Per-tenant rate limits over every data plane: requests per minute, tokens per minute and
requests in flight, without a Redis round trip per request.

Each per-minute limit is a token bucket in Redis (`ratelimit:<tid>:<dimension>`: refilled at the
limit's rate, holding at most `burst_s` seconds of it). A data plane takes small slices of it, a
quarter second of the rate at a time (a lease), and admits requests from its slice in memory; it
takes the next slice in the background when the slice runs low, so a request waits for Redis only
when its replica's slice is empty. Tokens are charged at admission by an estimate (the prompt's
characters / 4 + `max_tokens`, or LORAPLANE_ESTIMATE_COMPLETION_TOKENS without one) and settled to
the real usage when the answer is done: the difference is charged to or given back through the
replica's slice,
and what it holds beyond a slice goes back to the bucket. Concurrency is a count of slots per
replica in a Redis hash, the slots of a replica that stopped beating taken back.

Redis away: each replica enforces the same limits alone (`Local`), so limits degrade to per-replica
limits, never to refusing everybody.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis

from dataplane.breaker import Breaker
from loraplane.limits import RateLimits
from loraplane.state import keys

log = logging.getLogger(__name__)

LEASE_S = 0.25  # a slice: this long of the limit's rate
BEAT_S = 2.0  # a replica's liveness, for its concurrency slots
BEAT_TTL_S = 10.0

# KEYS[1] the bucket; ARGV: rate per second, capacity, want, need. When the bucket holds `need`
# (at most its capacity) it grants what it holds up to `want`, and at least `need`: a request
# costing more than the bucket holds leaves it in debt, repaid by the refill before the next one.
# Returns {granted, level after, seconds until it holds `need` again}.
TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, cap, want, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
level = math.min(cap, level + math.max(0, now - at) * rate)
local granted = 0
if need > 0 and level >= math.min(need, cap) then
  granted = math.max(math.min(want, level), need)
elseif need == 0 and level > 0 then
  granted = math.min(want, level)
end
level = level - granted
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap / rate + 60) * 1000))
local wait = 0
if level < math.min(math.max(need, 1), cap) then wait = (math.min(math.max(need, 1), cap) - level) / rate end
return {tostring(granted), tostring(level), tostring(wait)}
"""

# KEYS[1] the bucket; ARGV: capacity, amount. Gives back what a replica holds beyond its slice.
GIVE = """
local level = tonumber(redis.call('HGET', KEYS[1], 'level'))
if level then
  redis.call('HSET', KEYS[1], 'level', tostring(math.min(tonumber(ARGV[1]), level + tonumber(ARGV[2]))))
end
return 1
"""

# KEYS[1] the tenant's slots hash (replica -> slots held); ARGV: this replica, limit, want,
# need, the key prefix of replica beats. Slots of replicas whose beat expired are dropped.
ACQUIRE = """
local held = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #held, 2 do
  if held[i] ~= ARGV[1] and redis.call('EXISTS', ARGV[5] .. held[i]) == 0 then
    redis.call('HDEL', KEYS[1], held[i])
  else
    total = total + tonumber(held[i + 1])
  end
end
local free = tonumber(ARGV[2]) - total
if free < tonumber(ARGV[4]) then return 0 end
local granted = math.min(free, tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[1], ARGV[1], granted)
redis.call('EXPIRE', KEYS[1], 3600)
return granted
"""


REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


class RateLimited(Exception):
    def __init__(self, reason: str, message: str, retry_after_s: float, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.reason = reason  # requests | tokens | concurrency | too_large
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers


@dataclass
class Bucket:
    """This replica's view of one per-minute limit of one tenant."""

    limit: int  # per minute
    burst_s: float
    held: float = 0.0  # leased from Redis, not spent yet (negative: owed)
    level: float = -1.0  # the shared bucket's level at the last lease (-1: not known yet)
    wait_s: float = 0.0  # until the shared bucket had what the last lease needed
    taking: asyncio.Task[None] | None = None
    give_back: float = 0.0  # held beyond need, to go back to the shared bucket
    giving: asyncio.Task[None] | None = None

    @property
    def rate(self) -> float:
        return self.limit / 60.0

    @property
    def capacity(self) -> float:
        return max(self.slice, self.rate * self.burst_s)

    @property
    def slice(self) -> float:
        return max(1.0, self.rate * LEASE_S)

    @property
    def limit_header(self) -> bytes:
        return b"%d" % self.limit

    def remaining(self) -> int:
        """What the tenant may still send now, as far as this replica knows: what it holds and
        what the shared bucket held at its last lease. (The reset header: until it is full.)"""
        return max(0, int(self.held + max(self.level, 0.0)))


class Local:
    """A bucket of this replica alone, while Redis is away: what TAKE does, in memory."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level, self.at, self.wait_s = capacity, time.monotonic(), 0.0

    def take(self, want: float, need: float) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        granted = 0.0
        if need > 0 and self.level >= min(need, self.capacity):
            granted = max(min(want, self.level), need)
        elif need == 0 and self.level > 0:
            granted = min(want, self.level)
        self.level -= granted
        self.wait_s = max(0.0, (min(max(need, 1.0), self.capacity) - self.level) / self.rate)
        return granted


@dataclass
class Tenant:
    limits: RateLimits
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0
    slots: int = 0  # concurrency slots held from Redis
    used_at: float = field(default_factory=time.monotonic)


class Limiter:
    def __init__(self, client: redis.Redis, redis_down: Breaker | None = None, burst_s: float = 5.0) -> None:
        self._r = client
        self.redis_down = redis_down or Breaker()  # open: Redis failed a moment ago, limit alone
        self.burst_s = burst_s
        self.replica = secrets.token_hex(8)
        self._tenants: dict[str, Tenant] = {}
        self._take = client.register_script(TAKE)
        self._give = client.register_script(GIVE)
        self._acquire = client.register_script(ACQUIRE)
        self._local: dict[tuple[str, str], Local] = {}

    def _tenant(self, tenant_id: str, limits: RateLimits) -> Tenant:
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = Tenant(limits, None, None)
        if t.limits != limits or (t.requests is None and t.tokens is None):  # new, or its limits changed:
            t.limits = limits  # the same record (its admissions in flight release into it), new buckets
            t.requests = Bucket(limits.rpm, self.burst_s) if limits.rpm else None
            t.tokens = Bucket(limits.tpm, self.burst_s) if limits.tpm else None
        t.used_at = time.monotonic()
        return t

    async def admit(self, tenant_id: str, limits: RateLimits, tokens: int) -> Admission:
        """Admits a request estimated at `tokens` or raises RateLimited; the admission's
        `settle` (when the answer is done) settles its tokens and frees its slot."""
        t = self._tenant(tenant_id, limits)
        if t.tokens is not None and tokens > t.tokens.limit:
            raise RateLimited(
                "too_large",
                f"Request too large for tokens per minute: limit {limits.tpm}, requested {tokens}. "
                "Send a smaller prompt or max_tokens.",
                60.0,
                self.headers(t),
            )
        for name, bucket, cost in (("requests", t.requests, 1.0), ("tokens", t.tokens, float(tokens))):
            if bucket is not None and bucket.held < cost:
                await self._lease(tenant_id, name, bucket, cost - bucket.held)
                if bucket.held < cost:
                    raise RateLimited(
                        name,
                        f"Rate limit reached for {name} per minute: limit {bucket.limit}. "
                        f"Please try again in {_duration(bucket.wait_s)}.",
                        bucket.wait_s,
                        self.headers(t),
                    )
        if limits.concurrency and t.in_flight >= t.slots:
            await self._slots(tenant_id, t)
            if t.in_flight >= t.slots:
                raise RateLimited(
                    "concurrency",
                    f"Too many requests in flight: limit {limits.concurrency}. Please try again when one finishes.",
                    1.0,
                    self.headers(t),
                )
        t.in_flight += 1
        for name, bucket, cost in (("requests", t.requests, 1.0), ("tokens", t.tokens, float(tokens))):
            if bucket is not None:
                bucket.held -= cost
                if bucket.held < bucket.slice / 2:
                    self._top_up(tenant_id, name, bucket)
        return Admission(self, tenant_id, t, tokens)

    def headers(self, t: Tenant) -> list[tuple[bytes, bytes]]:
        """OpenAI's `x-ratelimit-*` headers for the per-minute limits the tenant has."""
        out = []
        for names, bucket in ((REQUEST_HEADERS, t.requests), (TOKEN_HEADERS, t.tokens)):
            if bucket is not None:
                remaining = bucket.remaining()
                reset = max(0.0, (bucket.capacity - remaining) / bucket.rate)
                out += [(names[0], bucket.limit_header), (names[1], b"%d" % remaining),
                        (names[2], _duration(reset).encode())]  # fmt: skip
        return out

    def _top_up(self, tenant_id: str, name: str, bucket: Bucket) -> None:
        if bucket.taking is None or bucket.taking.done():
            bucket.taking = asyncio.create_task(self._lease(tenant_id, name, bucket, 0.0))

    async def _lease(self, tenant_id: str, name: str, bucket: Bucket, need: float) -> None:
        """A slice for this replica (at least `need`, when the bucket has it)."""
        want = max(need, bucket.slice)
        if not self.redis_down.open:
            try:
                granted, level, wait = await self._take(
                    keys=[keys.rate_bucket(tenant_id, name)],
                    args=[bucket.rate, bucket.capacity, want, max(need, 0.0)],
                )
            except redis.RedisError as err:
                log.warning("rate limits: Redis is unreachable, each replica limits alone: %s", err)
                self.redis_down.trip()
            else:
                bucket.held += float(granted)
                bucket.level, bucket.wait_s = float(level), float(wait)
                return
        local = self._local.get((tenant_id, name))
        if local is None or local.rate != bucket.rate:
            local = self._local[(tenant_id, name)] = Local(bucket.rate, bucket.capacity)
        bucket.held += local.take(want, need)
        bucket.level, bucket.wait_s = local.level, local.wait_s

    async def _slots(self, tenant_id: str, t: Tenant) -> None:
        """Another concurrency slot (and a few spare) for this replica, if the tenant has one free."""
        want = self._slots_wanted(t)
        if not self.redis_down.open:
            try:
                granted = await self._acquire(
                    keys=[keys.rate_slots(tenant_id)],
                    args=[self.replica, t.limits.concurrency, want, 1, keys.data_plane_beat("")],
                )
            except redis.RedisError as err:
                log.warning("rate limits: Redis is unreachable, each replica limits alone: %s", err)
                self.redis_down.trip()
            else:
                t.slots += int(granted)
                return
        t.slots = max(t.slots, t.limits.concurrency)  # alone: the whole limit here

    @staticmethod
    def _slots_wanted(t: Tenant) -> int:
        """Slots asked for at a time: one, and spares where the limit is large enough to share."""
        return 1 + min(2, t.limits.concurrency // 8)

    def release(self, tenant_id: str, t: Tenant, tokens_back: float) -> None:
        t.in_flight -= 1
        bucket = t.tokens
        if bucket is None:
            return
        bucket.held += tokens_back
        if bucket.held > 2 * bucket.slice:  # more than it needs: back to the bucket, soon
            bucket.give_back += bucket.held - bucket.slice
            bucket.held = bucket.slice
            if bucket.giving is None or bucket.giving.done():
                bucket.giving = asyncio.create_task(self._give_back(tenant_id, bucket))

    async def _give_back(self, tenant_id: str, bucket: Bucket) -> None:
        """What a replica holds beyond its slice, back to the shared bucket (one write at a time:
        what piles up meanwhile goes with the next)."""
        while bucket.give_back > 0:
            amount, bucket.give_back = bucket.give_back, 0.0
            try:
                await self._give(keys=[keys.rate_bucket(tenant_id, "tokens")], args=[bucket.capacity, amount])
            except redis.RedisError as err:
                log.debug("rate limits: giving tokens back failed: %s", err)
                return

    async def run(self, every_s: float = 0.5) -> None:
        """In the background: this replica's beat, spare slots freed."""
        beat = 0.0
        while True:
            await asyncio.sleep(every_s)
            try:
                if time.monotonic() - beat > BEAT_S:
                    await self._r.set(keys.data_plane_beat(self.replica), "1", ex=int(BEAT_TTL_S))
                    beat = time.monotonic()
                await self._return()
            except redis.RedisError as err:
                log.debug("rate limits: Redis is unreachable: %s", err)

    async def _return(self) -> None:
        now = time.monotonic()
        for tenant_id, t in list(self._tenants.items()):
            # Slots beyond one lease's worth of headroom go back; all of them once it is idle.
            spare = t.slots - t.in_flight - (self._slots_wanted(t) if now - t.used_at < 1.0 else 0)
            if spare > 0 and t.limits.concurrency:
                t.slots -= spare
                await self._r.hincrby(keys.rate_slots(tenant_id), self.replica, -spare)
            if not t.in_flight and not t.slots and now - t.used_at > 60:
                del self._tenants[tenant_id]
                for name in ("requests", "tokens"):
                    self._local.pop((tenant_id, name), None)


class Admission:
    __slots__ = ("_limiter", "_tenant_id", "_tenant", "_charged", "_done")

    def __init__(self, limiter: Limiter, tenant_id: str, tenant: Tenant, charged: int) -> None:
        self._limiter, self._tenant_id, self._tenant, self._charged = limiter, tenant_id, tenant, charged
        self._done = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._limiter.headers(self._tenant)

    def settle(self, used_tokens: int) -> None:
        """The answer is done: its slot is free; the tokens it used replace the estimate."""
        if self._done:
            return
        self._done = True
        self._limiter.release(self._tenant_id, self._tenant, float(self._charged - used_tokens))


def estimate(body: dict[str, Any], prompt_param: str, completion_default: int) -> int:
    """The tokens a request will take, before it runs: its prompt's characters / 4 (as OpenAI
    estimates) and its most completion tokens, times `n`."""
    chars = _chars(body.get(prompt_param))
    if prompt_param == "messages":
        chars += 16 * len(body.get("messages") or ())  # each message's role and template
    most = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    completion = most if isinstance(most, int) else completion_default
    n = body.get("n")
    return math.ceil(chars / 4) + completion * (n if isinstance(n, int) and n > 0 else 1)


def _chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_chars(v) for k, v in value.items() if k in ("content", "text", "input", "arguments"))
    if isinstance(value, int):  # a token id
        return 4
    return 0


def _duration(seconds: float) -> str:
    """As OpenAI writes its reset times: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
