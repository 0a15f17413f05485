"""Token usage as both `loraplane` commands show it (`usage` for a tenant, `tenant usage` for an
operator): the time range their flags name, and the table they print."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from loraplane.apiclient import CliError
from loraplane.terminal import table

BUCKET_WIDTHS = ("1m", "1h", "1d")
DEFAULT_SPAN_S = {"1m": 24 * 3600, "1h": 24 * 3600, "1d": 7 * 24 * 3600}  # back from --end when --start is not given


@dataclass(frozen=True)
class Line:
    """One table row: a model's usage in one bucket."""

    start: int  # the bucket's start, Unix seconds
    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    requests: int
    adapter_id: str = ""  # the operator's view only


def timestamp(text: str) -> int:
    """A --start or --end: Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither Unix seconds nor an ISO 8601 time such as 2026-11-30 or 2026-11-30T12:00:00Z"
        ) from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--start", type=timestamp, metavar="TIME",
        help="Unix seconds or ISO 8601, UTC unless it says otherwise (default: 24 h before --end, 7 days with 1d)",
    )  # fmt: skip
    parser.add_argument("--end", type=timestamp, metavar="TIME", help="Unix seconds or ISO 8601 (default: now)")
    parser.add_argument("--bucket-width", choices=BUCKET_WIDTHS, default="1d", help="bucket width (default 1d)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def time_range(args: argparse.Namespace, now: float) -> tuple[int, int]:
    """[start, end) in Unix seconds, from --start, --end and --bucket-width."""
    end = int(now) if args.end is None else int(args.end)
    start = end - DEFAULT_SPAN_S[args.bucket_width] if args.start is None else int(args.start)
    if start >= end:
        raise CliError("--start must be before --end")
    return start, end


def render(lines: Iterable[Line], bucket_width: str, adapters: bool = False) -> str:
    """The lines under a heading, oldest bucket first, with their total below."""
    heading = ["START (UTC)", "MODEL", *(["ADAPTER"] if adapters else []), "INPUT", "CACHED", "OUTPUT", "REQUESTS"]
    rows, total = [heading], [0, 0, 0, 0]
    for line in sorted(lines, key=lambda x: (x.start, x.model, x.adapter_id)):
        counts = [line.input_tokens, line.cached_tokens, line.output_tokens, line.requests]
        total = [a + b for a, b in zip(total, counts, strict=True)]
        model = [line.model, *([line.adapter_id or "-"] if adapters else [])]
        rows.append([_when(line.start, bucket_width), *model, *map(str, counts)])
    if len(rows) == 1:
        return "no usage"
    rows.append(["total", "", *([""] if adapters else []), *map(str, total)])
    return table(rows)


def _when(start: int, bucket_width: str) -> str:
    when = datetime.fromtimestamp(start, UTC)
    return when.strftime("%Y-%m-%d" if bucket_width == "1d" else "%Y-%m-%d %H:%M")
