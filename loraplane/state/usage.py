"""Token usage per tenant: counted by the data planes, read back as OpenAI's usage API shows it
(`/v1/organization/usage/completions` and `/embeddings`) and exported for billing.

A data plane counts requests in `Cell`s (tenant, minute, kind, model, adapter) and `record`s a
batch of cells now and then; one Lua script adds the batch to the minute, hour and day buckets,
once per batch id. A bucket is a hash per tenant, kind, width and start, one field per model and
adapter (`<model>\\t<adapter_id>` -> `"<input> <output> <cached> <requests>"`); beside them, per
hour and per day, the set of tenants with usage in it, which `export` walks (a minute's tenants
are its hour's). Every key expires `Retention` after its bucket ends (keys: `keys.usage_bucket`,
`usage_tenants`, `usage_batch`).

Over clients made with decode_responses=True.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from loraplane.state import keys

KINDS = ("completions", "embeddings")
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # width -> default and most buckets a page, as OpenAI's
BATCH_MEMORY_S = 86400  # how long a batch id is remembered
UNSUPPORTED = ("project_ids", "user_ids", "api_key_ids", "models", "batch")  # OpenAI's filters, not ours
LISTED = {"1m": "1h", "1h": "1h", "1d": "1d"}  # width -> the width of the tenant sets that list its tenants
TENANTS_PER_READ = 100  # export reads this many tenants' buckets in one round trip
UNIX_TIME = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Cell:
    """Where usage is counted."""

    tenant_id: str
    minute: int  # epoch seconds, a multiple of 60
    kind: str  # "completions" | "embeddings"
    model: str  # "base" or "base:adapter-name" as the client sent it
    adapter_id: str  # "" for a base model; kept so billing survives renames and deletes


@dataclass
class Counts:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0

    def add(self, other: Counts) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_tokens += other.cached_tokens
        self.requests += other.requests

    def values(self) -> tuple[int, int, int, int]:
        return self.input_tokens, self.output_tokens, self.cached_tokens, self.requests


@dataclass(frozen=True)
class Retention:
    """How long buckets are kept after they end, per width, in seconds (0: forever)."""

    minute_s: int = 2 * 86400
    hour_s: int = 90 * 86400
    day_s: int = 90 * 86400

    def of(self, width: str) -> int:
        return {"1m": self.minute_s, "1h": self.hour_s, "1d": self.day_s}[width]


# Adds a batch of usage to its buckets, once per batch id.
# KEYS[1] the batch id's key, set (expiring in ARGV[1] s) as the batch is applied
# KEYS[2 .. h+1] bucket hashes (h = ARGV[2]); KEYS[h+2 ..] bucket tenant sets
# ARGV[3 ..] for each key from KEYS[2] in turn: its expiry (Unix s; 0: none), n, then n items:
#   a hash's are (field, input, output, cached, requests), added to the field's "<input> <output>
#   <cached> <requests>"; a set's are members
# Returns 1 if the batch was applied now, 0 if its id was applied before.
RECORD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local hashes = tonumber(ARGV[2])
local a = 3
for i = 2, #KEYS do
  local key, expire_at, n = KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    if i <= hashes + 1 then
      local c, j = {0, 0, 0, 0}, 1
      for v in string.gmatch(redis.call('HGET', key, ARGV[a]) or '', '%d+') do
        c[j] = tonumber(v)
        j = j + 1
      end
      for k = 1, 4 do c[k] = c[k] + tonumber(ARGV[a + k]) end
      redis.call('HSET', key, ARGV[a], string.format('%d %d %d %d', c[1], c[2], c[3], c[4]))
      a = a + 5
    else
      redis.call('SADD', key, ARGV[a])
      a = a + 1
    end
  end
  if expire_at > 0 then redis.call('EXPIREAT', key, expire_at) else redis.call('PERSIST', key) end
end
return 1
"""


async def record(client: redis.Redis, batch_id: str, cells: Mapping[Cell, Counts], retention: Retention) -> bool:
    """Adds the batch to the minute, hour and day buckets exactly once, atomically: True if
    applied now, False if a batch of that id was applied before (ids are remembered 24 h), so a
    data plane that does not know whether its write landed sends it again with the same id."""
    fields: dict[str, dict[str, Counts]] = {}  # bucket hash -> field -> counts
    tenants: dict[str, set[str]] = {}  # bucket tenant set -> tenant ids
    expiry: dict[str, int] = {}  # key -> when it expires (0: never)
    for cell, counts in cells.items():
        _check(cell, counts)
        for width, seconds in WIDTHS.items() if counts != Counts() else ():
            start = cell.minute - cell.minute % seconds
            bucket = keys.usage_bucket(cell.tenant_id, cell.kind, width, start)
            fields.setdefault(bucket, {}).setdefault(_field(cell), Counts()).add(counts)
            expiry[bucket] = _expiry(start, width, retention.of(width))
            if LISTED[width] == width:
                members = keys.usage_tenants(width, start)
                tenants.setdefault(members, set()).add(cell.tenant_id)
                expiry[members] = _expiry(start, width, _listed_for(retention, width))
    args: list[str | int] = [BATCH_MEMORY_S, len(fields)]
    for bucket, counts_of in fields.items():
        args += [expiry[bucket], len(counts_of)]
        for field, c in counts_of.items():
            args += [field, *c.values()]
    for members, ids in tenants.items():
        args += [expiry[members], len(ids), *sorted(ids)]
    script = client.register_script(RECORD)
    applied = await script(keys=[keys.usage_batch(batch_id), *fields, *tenants], args=args)
    return bool(applied == 1)


def _check(cell: Cell, counts: Counts) -> None:
    if cell.kind not in KINDS:
        raise ValueError(f"usage kind must be one of {', '.join(KINDS)}, not {cell.kind!r}")
    if cell.minute % 60:
        raise ValueError(f"a usage cell's minute must be a multiple of 60, not {cell.minute}")
    if "\t" in cell.model or "\t" in cell.adapter_id:
        raise ValueError(f"a usage cell's model and adapter id hold no tab: {cell.model!r}, {cell.adapter_id!r}")
    if min(counts.values()) < 0:
        raise ValueError(f"usage counts are never negative: {counts}")


def _expiry(start: int, width: str, kept: int) -> int:
    """When a bucket kept `kept` seconds after it ends expires (0: never)."""
    return start + WIDTHS[width] + kept if kept else 0


def _listed_for(retention: Retention, width: str) -> int:
    """How long the tenant sets of `width` are kept: as long as any bucket they list."""
    kept = [retention.of(w) for w, listed in LISTED.items() if listed == width]
    return 0 if 0 in kept else max(kept)


def _field(cell: Cell) -> str:
    return f"{cell.model}\t{cell.adapter_id}"


def _counts(raw: str) -> Counts:
    return Counts(*(int(v) for v in raw.split()))


@dataclass(frozen=True)
class Query:
    kind: str
    start: int
    end: int  # exclusive
    width: str
    group_by_model: bool
    limit: int  # buckets a page
    page: str | None  # the cursor `next_page` gave


class QueryError(ValueError):
    """A usage query's parameter is not one this API takes; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_query(kind: str, params: Mapping[str, str], now: float) -> Query:
    """OpenAI's usage API query: start_time (required, Unix seconds), end_time (default: now),
    bucket_width 1m, 1h or 1d (default 1d), group_by=model (or group_by[]=model), limit (buckets
    a page; per width: 1d default 7, max 31; 1h 24, 168; 1m 60, 1440) and page (a `next_page`).
    OpenAI's filters (project_ids, user_ids, api_key_ids, models, batch) are refused, not ignored."""
    if kind not in KINDS:
        raise QueryError(f"usage is counted for {' and '.join(KINDS)}, not {kind!r}", "kind")
    for name in UNSUPPORTED:
        if name in params or name + "[]" in params:
            raise QueryError(f"{name} is not supported: usage is per tenant, by model at most", name)
    if "start_time" not in params:
        raise QueryError("start_time is required (Unix seconds)", "start_time")
    start = _unix_time(params, "start_time")
    end = _unix_time(params, "end_time") if "end_time" in params else math.ceil(now)
    if end <= start:
        raise QueryError(f"end_time ({end}) must be after start_time ({start})", "end_time")
    width = params.get("bucket_width", "1d")
    if width not in WIDTHS:
        raise QueryError(f"bucket_width must be one of {', '.join(WIDTHS)}, not {width!r}", "bucket_width")
    default, most = LIMITS[width]
    raw_limit = params.get("limit", str(default))
    if not raw_limit.isdecimal() or not 1 <= int(raw_limit) <= most:
        raise QueryError(f"limit must be 1 to {most} with bucket_width={width}, not {raw_limit!r}", "limit")
    page = params.get("page") or None
    if page is not None and _bucket_of(page, width, start, end) is None:
        raise QueryError("page is not a next_page of this query", "page")
    return Query(kind, start, end, width, _group_by_model(params), int(raw_limit), page)


def _unix_time(params: Mapping[str, str], name: str) -> int:
    raw = params[name]
    if not UNIX_TIME.fullmatch(raw):
        raise QueryError(f"{name} must be a Unix time in seconds (an integer), not {raw!r}", name)
    return int(raw)


def _group_by_model(params: Mapping[str, str]) -> bool:
    given = [params[name] for name in ("group_by", "group_by[]") if name in params]
    for field in ",".join(given).split(",") if given else ():
        if field != "model":
            raise QueryError(f"group_by={field!r} is not supported: only group_by=model", "group_by")
    return bool(given)


def _cursor(width: str, bucket: int) -> str:
    return "page_" + _token([width, bucket])


def _bucket_of(page: str, width: str, start: int, end: int) -> int | None:
    """The bucket a cursor resumes at, if it is one of the query's."""
    match _untoken(page.removeprefix("page_")):
        case [w, int(bucket)] if w == width and _within(bucket, width, start, end):
            return bucket
    return None


def _token(parts: list[str | int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, separators=(",", ":")).encode()).decode()


def _untoken(token: str) -> list[Any]:
    """A token's parts; [] if it is not a token."""
    try:
        parts = json.loads(base64.urlsafe_b64decode(token))
    except (ValueError, binascii.Error):
        return []
    return parts if isinstance(parts, list) else []


def _within(bucket: int, width: str, start: int, end: int) -> bool:
    """Whether `bucket` is one of a query's: its width's, from `start` (down to the width) until `end`."""
    seconds = WIDTHS[width]
    return bucket % seconds == 0 and start - start % seconds <= bucket < end


@dataclass(frozen=True)
class Result:
    model: str | None  # None: not grouped by model
    adapter_id: str | None  # None: not grouped, or a base model
    counts: Counts


@dataclass(frozen=True)
class Bucket:
    start_time: int
    end_time: int
    results: list[Result]


@dataclass(frozen=True)
class Page:
    buckets: list[Bucket]
    next_page: str | None


async def buckets(client: redis.Redis, tenant_id: str, query: Query) -> Page:
    """The tenant's usage in buckets of `query.width` from `query.start` (down to the width, UTC)
    until `query.end`, `query.limit` a page, every bucket present (an empty one with no results);
    a result per model and adapter when grouped by model, else one total (none when zero)."""
    seconds = WIDTHS[query.width]
    resume = _bucket_of(query.page, query.width, query.start, query.end) if query.page is not None else None
    first = query.start - query.start % seconds if resume is None else resume
    starts = range(first, query.end, seconds)[: query.limit]
    async with client.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(keys.usage_bucket(tenant_id, query.kind, query.width, start))
        hashes = await pipe.execute()
    page = [Bucket(s, s + seconds, _results(h, query.group_by_model)) for s, h in zip(starts, hashes, strict=True)]
    after = first + len(starts) * seconds
    return Page(page, _cursor(query.width, after) if after < query.end else None)


def _results(bucket: Mapping[str, str], by_model: bool) -> list[Result]:
    if by_model:
        cells = (field.split("\t") + [raw] for field, raw in sorted(bucket.items()))
        return [Result(model, adapter_id or None, _counts(raw)) for model, adapter_id, raw in cells]
    total = Counts()
    for raw in bucket.values():
        total.add(_counts(raw))
    return [Result(None, None, total)] if total != Counts() else []


def page_json(kind: str, page: Page) -> dict[str, Any]:
    """The page as OpenAI's usage API answers (`UsageResponse`), each result with our `adapter_id`."""
    return {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": b.start_time,
                "end_time": b.end_time,
                "results": [_result_json(kind, r) for r in b.results],
            }
            for b in page.buckets
        ],
        "has_more": page.next_page is not None,
        "next_page": page.next_page,
    }


def _result_json(kind: str, result: Result) -> dict[str, Any]:
    c = result.counts
    groups = {"project_id": None, "user_id": None, "api_key_id": None, "model": result.model}
    if kind == "embeddings":
        return {
            "object": "organization.usage.embeddings.result",
            "input_tokens": c.input_tokens,
            "num_model_requests": c.requests,
            **groups,
            "adapter_id": result.adapter_id,
        }
    return {
        "object": "organization.usage.completions.result",
        "input_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "input_cached_tokens": c.cached_tokens,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": c.requests,
        **groups,
        "batch": None,
        "service_tier": None,
        "adapter_id": result.adapter_id,
    }


@dataclass(frozen=True)
class Row:
    tenant_id: str
    kind: str
    start_time: int
    end_time: int
    model: str
    adapter_id: str  # "" for a base model
    counts: Counts

    def order(self) -> tuple[int, str, str, str, str]:
        return self.start_time, self.tenant_id, self.kind, self.model, self.adapter_id


async def export(
    client: redis.Redis,
    start: int,
    end: int,
    width: str,
    tenant_id: str = "",
    page: str = "",
    page_size: int = 1000,
) -> tuple[list[Row], str]:
    """Every tenant's usage (or one tenant's) in buckets of `width` from `start` (down to the
    width) until `end`, for billing: rows with usage only, ordered by bucket, tenant, kind, model
    and adapter; `page_size` of them and the page token of the rest ("" at the end). A token
    that is not one of this export's raises `QueryError` (param "page")."""
    if width not in WIDTHS or page_size < 1:
        raise ValueError(
            f"an export is of width {', '.join(WIDTHS)} in pages of 1 or more rows, not {width}, {page_size}"
        )
    seconds = WIDTHS[width]
    after = _export_position(page, width, tenant_id, start, end) if page else None
    bucket = after[0] if after else start - start % seconds
    rows: list[Row] = []
    while bucket < end and len(rows) <= page_size:
        tenants = [tenant_id] if tenant_id else await _tenants_in(client, width, bucket)
        if after and after[0] == bucket:
            tenants = [t for t in tenants if t >= after[1]]
        for i in range(0, len(tenants), TENANTS_PER_READ):
            read = await _rows(client, tenants[i : i + TENANTS_PER_READ], width, bucket, seconds)
            rows += [r for r in read if after is None or r.order() > after]
            if len(rows) > page_size:
                break
        bucket += seconds
    if len(rows) <= page_size:
        return rows, ""
    return rows[:page_size], _token([width, tenant_id, *rows[page_size - 1].order()])


async def _tenants_in(client: redis.Redis, width: str, bucket: int) -> list[str]:
    """The tenants that may have usage in the bucket: those listed for it (a minute: its hour)."""
    listed = LISTED[width]
    members = await client.smembers(keys.usage_tenants(listed, bucket - bucket % WIDTHS[listed]))
    return sorted(str(t) for t in members)


async def _rows(client: redis.Redis, tenants: list[str], width: str, bucket: int, seconds: int) -> list[Row]:
    """The tenants' rows in one bucket, in order."""
    async with client.pipeline(transaction=False) as pipe:
        for tenant in tenants:
            for kind in KINDS:
                pipe.hgetall(keys.usage_bucket(tenant, kind, width, bucket))
        hashes = iter(await pipe.execute())
    rows = []
    for tenant in tenants:
        for kind in KINDS:
            for field, raw in sorted(next(hashes).items()):
                model, adapter_id = field.split("\t")
                rows.append(Row(tenant, kind, bucket, bucket + seconds, model, adapter_id, _counts(raw)))
    return rows


def _export_position(page: str, width: str, tenant_id: str, start: int, end: int) -> tuple[int, str, str, str, str]:
    """The order of the last row of the page before, if the token is one of this export's."""
    match _untoken(page):
        case [w, t, int(bucket), str(tenant), str(kind), str(model), str(adapter_id)] if (w, t) == (width, tenant_id):
            if _within(bucket, width, start, end):
                return bucket, tenant, kind, model, adapter_id
    raise QueryError("page is not a page token of this export", "page")
