"""Usage metering in a real Redis: a batch counted once however often it is sent; buckets of every
width across their boundaries, grouped by model or in total, paged, kept apart per tenant; the
billing export paged across tenants; keys expiring as retained; the usage API's query read as
OpenAI documents it and its answer valid against OpenAI's published schema."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from loraplane.state import keys, usage
from loraplane.state.usage import Cell, Counts, Query, Result, Retention
from tests.openai_spec import undeclared, validate
from tests.support import RedisServer

DAY = int(time.time()) // 86400 * 86400 - 86400  # yesterday 00:00 UTC: recent enough to be kept
HOUR, MINUTE = 3600, 60
NOW = DAY + 2 * 86400  # what the queries take for now (end_time's default)
KEEP = Retention(minute_s=7 * 86400)  # minutes of yesterday kept however long the run


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await c.flushdb()
    yield c
    await c.aclose()


def cell(
    minute: int, tenant: str = "ten_a", kind: str = "completions", model: str = "tiny-llama", aid: str = ""
) -> Cell:
    return Cell(tenant, minute, kind, model, aid)


BATCHES = [0]


async def record(client: redis.Redis, cells: dict[Cell, Counts], retention: Retention = KEEP) -> bool:
    """`cells` recorded as a new batch."""
    BATCHES[0] += 1
    return await usage.record(client, f"test:{BATCHES[0]}", cells, retention)


def query(kind: str = "completions", **params: object) -> Query:
    return usage.parse_query(kind, {name: str(v) for name, v in params.items()}, NOW)


async def totals(client: redis.Redis, tenant: str, q: Query) -> list[tuple[int, Counts | None]]:
    """Each bucket's start and total (None: no usage)."""
    page = await usage.buckets(client, tenant, q)
    return [(b.start_time, b.results[0].counts if b.results else None) for b in page.buckets]


async def test_a_batch_sent_again_is_counted_once(client: redis.Redis) -> None:
    batch = {cell(DAY): Counts(10, 5, 2, 1), cell(DAY, model="tiny-llama:v3", aid="adp_3"): Counts(1, 1, 0, 1)}
    assert await usage.record(client, "dp1:1", batch, KEEP) is True
    assert await usage.record(client, "dp1:1", batch, KEEP) is False  # its write's answer was lost
    assert await totals(client, "ten_a", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, Counts(11, 6, 2, 2))]
    assert await usage.record(client, "dp1:2", batch, KEEP) is True  # the next batch, the same counts
    assert await totals(client, "ten_a", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, Counts(22, 12, 4, 4))]


# A request a minute at 05:02, 23:59 and 00:00, 00:01 of the next day; its input tokens its minute.
MINUTES = [DAY + 5 * HOUR + 2 * MINUTE, DAY + 86400 - MINUTE, DAY + 86400, DAY + 86400 + MINUTE]
MIDNIGHT = DAY + 86400


@pytest.mark.parametrize(
    ("width", "start", "end", "expected"),
    [
        ("1m", MIDNIGHT - 2 * MINUTE, MIDNIGHT + 2 * MINUTE,
         [(MIDNIGHT - 2 * MINUTE, []), (MIDNIGHT - MINUTE, [MIDNIGHT - MINUTE]), (MIDNIGHT, [MIDNIGHT]),
          (MIDNIGHT + MINUTE, [MIDNIGHT + MINUTE])]),
        ("1m", MIDNIGHT - 30, MIDNIGHT + 1, [(MIDNIGHT - MINUTE, [MIDNIGHT - MINUTE]), (MIDNIGHT, [MIDNIGHT])]),
        ("1h", MIDNIGHT - HOUR, MIDNIGHT + HOUR,
         [(MIDNIGHT - HOUR, [MIDNIGHT - MINUTE]), (MIDNIGHT, [MIDNIGHT, MIDNIGHT + MINUTE])]),
        ("1h", DAY + 5 * HOUR + 1800, DAY + 6 * HOUR, [(DAY + 5 * HOUR, [MINUTES[0]])]),
        ("1d", DAY, DAY + 2 * 86400, [(DAY, MINUTES[:2]), (MIDNIGHT, MINUTES[2:])]),
        ("1d", DAY + 100, MIDNIGHT, [(DAY, MINUTES[:2])]),
    ],
    ids=["1m across midnight", "1m from a start within a minute", "1h across midnight", "1h from within an hour",
         "1d two days", "1d from within a day"],
)  # fmt: skip
async def test_usage_counts_in_the_bucket_of_each_width_its_minute_falls_in(
    client: redis.Redis, width: str, start: int, end: int, expected: list[tuple[int, list[int]]]
) -> None:
    assert await record(client, {cell(m): Counts(input_tokens=m, requests=1) for m in MINUTES})
    want = [(s, Counts(input_tokens=sum(ms), requests=len(ms)) if ms else None) for s, ms in expected]
    seconds = usage.WIDTHS[width]
    got = await totals(client, "ten_a", query(start_time=start, end_time=end, bucket_width=width, limit=10))
    assert got == want
    page = await usage.buckets(client, "ten_a", query(start_time=start, end_time=end, bucket_width=width))
    assert [(b.start_time, b.end_time) for b in page.buckets] == [(s, s + seconds) for s, _ in expected]


async def test_grouped_by_model_a_result_per_model_and_adapter_else_one_total(client: redis.Redis) -> None:
    await record(
        client,
        {
            cell(DAY + HOUR): Counts(100, 10, 0, 2),
            cell(DAY + HOUR, model="tiny-llama:my_ft.v3-x", aid="adp_2"): Counts(30, 3, 1, 1),
            cell(DAY + HOUR, model="tiny-llama:my_ft.v3-x", aid="adp_1"): Counts(20, 2, 0, 1),  # the name's first
            cell(DAY + HOUR + MINUTE, model="tiny-llama:my_ft.v3-x", aid="adp_1"): Counts(5, 1, 0, 1),
            cell(DAY + HOUR, kind="embeddings", model="tiny-embed"): Counts(7, 0, 0, 1),  # another kind
            cell(DAY + 3 * HOUR): Counts(),  # nothing counted, nothing stored
        },
    )
    by_model = await usage.buckets(client, "ten_a", query(start_time=DAY + HOUR, bucket_width="1h", group_by="model"))
    assert by_model.buckets[0].results == [
        Result("tiny-llama", None, Counts(100, 10, 0, 2)),
        Result("tiny-llama:my_ft.v3-x", "adp_1", Counts(25, 3, 0, 2)),
        Result("tiny-llama:my_ft.v3-x", "adp_2", Counts(30, 3, 1, 1)),
    ]
    total = await usage.buckets(client, "ten_a", query(start_time=DAY + HOUR, bucket_width="1h"))
    assert total.buckets[0].results == [Result(None, None, Counts(155, 16, 1, 5))]
    by_model_too = usage.parse_query("embeddings", {"start_time": str(DAY), "group_by[]": "model"}, NOW)
    embeddings = await usage.buckets(client, "ten_a", by_model_too)
    assert embeddings.buckets[0].results == [Result("tiny-embed", None, Counts(7, 0, 0, 1))]
    for grouped in ({}, {"group_by": "model"}):
        empty = await usage.buckets(client, "ten_a", query(start_time=DAY + 2 * HOUR, bucket_width="1h", **grouped))
        assert [b.results for b in empty.buckets[:2]] == [[], []]  # 02:00 and 03:00 are there, with no results


async def test_pages_of_limit_buckets_chain_over_the_range_exactly(client: redis.Redis) -> None:
    await record(client, {cell(DAY + h * HOUR): Counts(h, 0, 0, 1) for h in range(0, 11, 2)})
    start, end = DAY + HOUR // 2, DAY + 10 * HOUR + 1  # buckets 00:00 to 10:00
    seen, pages, page = [], [], ""
    while True:
        q = query(start_time=start, end_time=end, bucket_width="1h", limit=4, page=page)  # as a client follows them
        body = usage.page_json("completions", await usage.buckets(client, "ten_a", q))
        pages.append(len(body["data"]))
        seen += [(b["start_time"], sum(r["input_tokens"] for r in b["results"])) for b in body["data"]]
        assert body["has_more"] is (body["next_page"] is not None)
        if not body["has_more"]:
            break
        page = body["next_page"]
    assert pages == [4, 4, 3]
    assert seen == [(DAY + h * HOUR, 0 if h % 2 else h) for h in range(11)]


async def test_another_tenants_usage_never_shows(client: redis.Redis) -> None:
    await record(client, {cell(DAY, tenant="ten_a"): Counts(1, 1, 0, 1), cell(DAY, tenant="ten_b"): Counts(9, 9, 9, 9)})
    assert await totals(client, "ten_a", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, Counts(1, 1, 0, 1))]
    assert await totals(client, "ten_b", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, Counts(9, 9, 9, 9))]
    assert await totals(client, "ten_c", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, None)]


TENANTS = ["ten_c", "ten_a", "ten_d", "ten_b", "ten_e"]


async def exported(client: redis.Redis, page_size: int, tenant: str = "") -> tuple[list[usage.Row], int]:
    """Every page of the export of hours 00:00 to 03:00 at `page_size`, and how many pages."""
    rows, page, pages = [], "", 0
    while True:
        got, page = await usage.export(client, DAY, DAY + 3 * HOUR, "1h", tenant, page, page_size)
        rows += got
        pages += 1
        assert len(got) <= page_size
        if not page:
            return rows, pages


async def test_the_export_pages_cover_every_tenants_rows_once_in_order(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage, "TENANTS_PER_READ", 2)  # a bucket's tenants read in several round trips
    cells = {}
    for n, tenant in enumerate(TENANTS):  # every other hour, a tenant's base model and its adapter; embeddings
        for h in range(n % 2, 3, 2):
            cells[cell(DAY + h * HOUR, tenant)] = Counts(n, h, 0, 1)
            adapter = cell(DAY + h * HOUR + MINUTE, tenant, model="tiny-llama:v1", aid="adp_" + tenant)
            cells[adapter] = Counts(1, 0, 0, 1)
            cells[cell(DAY + h * HOUR, tenant, "embeddings", "tiny-embed")] = Counts(n, 0, 0, 1)
    cells[cell(DAY + 5 * HOUR, "ten_a")] = Counts(1, 1, 1, 1)  # after the export's range
    await record(client, cells)

    everything, pages = await exported(client, 1000)
    assert pages == 1
    assert [r.order() for r in everything] == sorted(r.order() for r in everything)
    expected = {(DAY + (c.minute - DAY) // HOUR * HOUR, c.tenant_id, c.kind, c.model, c.adapter_id) for c in cells}
    assert {r.order() for r in everything} == {o for o in expected if o[0] < DAY + 3 * HOUR}
    assert len(everything) == 24  # 8 tenant-hours, 3 rows each
    assert everything[0] == usage.Row("ten_c", "completions", DAY, DAY + HOUR, "tiny-llama", "", Counts(0, 0, 0, 1))
    for size, page_count in [(1, 24), (7, 4), (12, 2), (23, 2), (24, 1), (25, 1)]:
        rows, pages = await exported(client, size)
        assert (rows, pages) == (everything, page_count), size
    rows, _ = await exported(client, 2, tenant="ten_d")
    assert rows == [r for r in everything if r.tenant_id == "ten_d"] and len(rows) == 6
    minutes, page = await usage.export(client, DAY + HOUR, DAY + 2 * HOUR, "1m")  # tenants listed by the hour
    assert page == ""
    in_hour = {
        (c.minute, c.tenant_id, c.kind, c.model, c.adapter_id) for c in cells if c.minute // HOUR == DAY // HOUR + 1
    }
    assert [r.order() for r in minutes] == sorted(in_hour) and len(minutes) == 6


async def test_a_page_token_of_another_export_is_refused(client: redis.Redis) -> None:
    await record(client, {cell(DAY + h * HOUR, t): Counts(1, 0, 0, 1) for h in range(3) for t in TENANTS})
    _, page = await usage.export(client, DAY, DAY + 3 * HOUR, "1h", page_size=2)
    assert page
    others = [
        ("nonsense", DAY, "1h", ""),
        (page, DAY + HOUR, "1h", ""),
        (page, DAY, "1d", ""),
        (page, DAY, "1h", "ten_a"),
    ]
    for bad_page, start, width, tenant in others:  # not a token; starting later; another width; one tenant's
        with pytest.raises(usage.QueryError) as err:
            await usage.export(client, start, DAY + 3 * HOUR, width, tenant, bad_page)
        assert err.value.param == "page"


async def test_buckets_expire_as_retained(client: redis.Redis) -> None:
    minute = DAY + 10 * MINUTE
    retention = Retention(minute_s=6 * 86400, hour_s=5 * 86400, day_s=0)
    await usage.record(client, "dp1:7", {cell(minute): Counts(1, 1, 0, 1)}, retention)
    now = time.time()
    expires_at = {
        keys.usage_bucket("ten_a", "completions", "1m", minute): minute + MINUTE + 6 * 86400,
        keys.usage_bucket("ten_a", "completions", "1h", DAY): DAY + HOUR + 5 * 86400,
        keys.usage_tenants("1h", DAY): DAY + HOUR + 6 * 86400,  # it lists the minutes' tenants too
        keys.usage_batch("dp1:7"): now + 86400,
    }
    for key, at in expires_at.items():
        assert abs(await client.ttl(key) - (at - now)) <= 2, key
    assert await client.ttl(keys.usage_bucket("ten_a", "completions", "1d", DAY)) == -1  # 0: kept forever
    assert await client.ttl(keys.usage_tenants("1d", DAY)) == -1
    assert await client.dbsize() == 6  # minute, hour and day buckets; hour and day tenant sets; the batch

    short = Retention(minute_s=MINUTE)  # yesterday's minutes are past it: never stored
    await record(client, {cell(minute + MINUTE): Counts(1, 1, 0, 1)}, short)
    assert not await client.exists(keys.usage_bucket("ten_a", "completions", "1m", minute + MINUTE))
    assert await client.exists(keys.usage_bucket("ten_a", "completions", "1h", DAY))


async def test_large_counts_add_up_exactly(client: redis.Redis) -> None:
    big = Counts(2**50 + 1, 2**49 + 3, 2**48 + 5, 2**20 + 7)
    await record(client, {cell(DAY): big})
    await record(client, {cell(DAY): big})
    twice = Counts(*(2 * v for v in big.values()))
    assert await totals(client, "ten_a", query(start_time=DAY, end_time=DAY + 1)) == [(DAY, twice)]


@pytest.mark.parametrize(
    "bad",
    [cell(DAY + 1), cell(DAY, kind="images"), cell(DAY, model="tiny\tllama"), cell(DAY, aid="adp\t1")],
    ids=repr,
)
async def test_a_cell_that_cannot_be_stored_is_refused_before_anything_is_written(
    client: redis.Redis, bad: Cell
) -> None:
    with pytest.raises(ValueError):
        await usage.record(client, "dp1:1", {cell(DAY): Counts(1, 0, 0, 1), bad: Counts(1, 0, 0, 1)}, KEEP)
    with pytest.raises(ValueError):
        await usage.record(client, "dp1:1", {cell(DAY): Counts(-1, 0, 0, 1)}, KEEP)
    assert await client.dbsize() == 0
    assert await usage.record(client, "dp1:1", {cell(DAY): Counts(1, 0, 0, 1)}, KEEP)  # the id is unused


S = str(DAY)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "start_time"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"start_time": "-60"}, "start_time"),
        ({"start_time": "1.5"}, "start_time"),
        ({"start_time": S, "end_time": S}, "end_time"),
        ({"start_time": S, "end_time": str(DAY - 1)}, "end_time"),
        ({"start_time": S, "end_time": "soon"}, "end_time"),
        ({"start_time": S, "bucket_width": "1w"}, "bucket_width"),
        ({"start_time": S, "group_by": "project_id"}, "group_by"),
        ({"start_time": S, "group_by[]": "model,user_id"}, "group_by"),
        ({"start_time": S, "group_by": ""}, "group_by"),
        ({"start_time": S, "limit": "0"}, "limit"),
        ({"start_time": S, "limit": "32"}, "limit"),
        ({"start_time": S, "limit": "169", "bucket_width": "1h"}, "limit"),
        ({"start_time": S, "limit": "1441", "bucket_width": "1m"}, "limit"),
        ({"start_time": S, "limit": "ten"}, "limit"),
        ({"start_time": S, "page": "page_bm9wZQ=="}, "page"),  # not one of ours
        ({"start_time": S, "models": "tiny-llama"}, "models"),
        ({"start_time": S, "project_ids[]": "proj_1"}, "project_ids"),
        ({"start_time": S, "batch": "true"}, "batch"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_a_query_parameter_this_api_does_not_take_is_named(params: dict[str, str], param: str) -> None:
    with pytest.raises(usage.QueryError) as err:
        usage.parse_query("completions", params, NOW)
    assert err.value.param == param
    assert param in str(err.value)


def test_a_query_reads_as_openai_documents() -> None:
    assert query(start_time=DAY) == Query("completions", DAY, NOW, "1d", False, 7, None)
    assert usage.parse_query("embeddings", {"start_time": S}, NOW + 0.25).end == NOW + 1  # end_time is exclusive
    for width, default, most in [("1d", 7, 31), ("1h", 24, 168), ("1m", 60, 1440)]:
        assert query(start_time=DAY, bucket_width=width).limit == default
        assert query(start_time=DAY, bucket_width=width, limit=most).limit == most
    assert query(start_time=DAY, group_by="model").group_by_model
    assert usage.parse_query("completions", {"start_time": S, "group_by[]": "model"}, NOW).group_by_model
    assert query(start_time=DAY, page="").page is None
    with pytest.raises(usage.QueryError) as err:
        usage.parse_query("images", {"start_time": S}, NOW)
    assert err.value.param == "kind"


@pytest.mark.parametrize("kind", usage.KINDS)
@pytest.mark.parametrize("group_by", [{}, {"group_by": "model"}], ids=["total", "by model"])
async def test_a_page_is_what_openai_usage_api_answers(
    client: redis.Redis, kind: str, group_by: dict[str, str]
) -> None:
    model = "tiny-embed" if kind == "embeddings" else "tiny-llama"
    await record(
        client,
        {cell(DAY, kind=kind, model=model): Counts(3, 2, 1, 1),
         cell(DAY, kind=kind, model=model + ":v1", aid="adp_1"): Counts(5, 4, 0, 2)},
    )  # fmt: skip
    q = query(kind, start_time=DAY - 86400, end_time=NOW, limit=2, **group_by)  # the day before: empty
    body = usage.page_json(kind, await usage.buckets(client, "ten_a", q))
    assert validate("UsageResponse", body) == []
    assert (body["has_more"], body["next_page"] is not None, len(body["data"])) == (True, True, 2)
    results = body["data"][1]["results"]
    assert body["data"][0]["results"] == [] and len(results) == (2 if group_by else 1)
    schema = "UsageEmbeddingsResult" if kind == "embeddings" else "UsageCompletionsResult"
    assert all(validate(schema, r) == [] for r in results)
    assert undeclared("UsageResponse", body) == [f"$.data[1].results[{i}].adapter_id" for i in range(len(results))]
    if group_by:
        assert [(r["model"], r["adapter_id"]) for r in results] == [(model, None), (model + ":v1", "adp_1")]
    else:
        assert (results[0]["model"], results[0]["adapter_id"], results[0]["num_model_requests"]) == (None, None, 3)
    last = usage.page_json(
        kind, await usage.buckets(client, "ten_a", query(kind, start_time=DAY, page=body["next_page"]))
    )
    assert validate("UsageResponse", last) == []
    assert (last["has_more"], last["next_page"]) == (False, None)


async def test_a_next_page_of_another_query_is_refused(client: redis.Redis) -> None:
    minutes = await usage.buckets(client, "ten_a", query(start_time=DAY, bucket_width="1m", limit=1))
    days = await usage.buckets(client, "ten_a", query(start_time=DAY, limit=1))
    assert minutes.next_page and days.next_page
    for params in [
        {"start_time": S, "bucket_width": "1h", "page": minutes.next_page},  # not a bucket of this width
        {"start_time": S, "end_time": str(DAY + 86400), "page": days.next_page},  # past this query's end
        {"start_time": str(DAY + 2 * 86400), "end_time": str(NOW + 86400), "page": days.next_page},  # before its start
    ]:
        with pytest.raises(usage.QueryError) as err:
            usage.parse_query("completions", params, NOW)
        assert err.value.param == "page"
