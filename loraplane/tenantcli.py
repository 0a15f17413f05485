"""The tenant's verbs of the `loraplane` command (`adapters …`, `chat`, `usage`): the data
plane's HTTP API (`apiclient`) with the tenant's key, drawn on the terminal by `terminal`.

Every failure a user can cause or meet is a `CliError`, which the command prints as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias
from urllib.parse import quote

from loraplane.apiclient import DEFAULT_URL, ApiClient, SentFile, Settings
from loraplane.apiclient import CliError as CliError  # what `loraplane.cli` catches
from loraplane.terminal import Progress, Spinner, human_size, table
from loraplane.usagereport import Line, add_arguments, render, time_range

Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _summary(a: dict[str, Any]) -> str:
    """`tiny-llama:name (adp_…): ready, rank 8, 282.1 kB, owner/repo@commit`"""
    parts = [a["status"]]
    if a.get("rank"):
        parts.append(f"rank {a['rank']}")
    if a.get("size_bytes"):
        parts.append(human_size(a["size_bytes"]))
    source = a.get("source") or {}
    if source.get("repo"):
        parts.append(f"{source['repo']}@{str(source.get('commit_sha') or source.get('revision', ''))[:12]}")
    return f"{a['model']} ({a['id']}): {', '.join(parts)}"


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# The commands


def _api(args: argparse.Namespace) -> ApiClient:
    return ApiClient(Settings.from_env(os.environ, args.url))


WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _adapter_files(path: Path, config: str | None) -> tuple[Path, Path | None]:
    """The weights and the config to send: PATH is a trainer's output directory (its
    adapter_model.safetensors, and its adapter_config.json unless --config names another) or
    the weights file itself. Nothing else in a directory is read (training_args.bin is a pickle)."""
    if not path.is_dir():
        return path, Path(config) if config else None
    weights = path / WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CliError(
                f"{path} has adapter_model.bin (a pickle), which loraplane never loads: save the adapter with "
                f"save_pretrained(..., safe_serialization=True) to get {WEIGHTS}"
            )
        # A Trainer's output_dir before the final save holds only checkpoint-<step>/ directories.
        steps = {d: d.name.removeprefix("checkpoint-") for d in path.glob("checkpoint-*") if (d / WEIGHTS).is_file()}
        checkpoints = sorted((int(step), d) for d, step in steps.items() if step.isdigit())
        hint = f"; its last checkpoint is {checkpoints[-1][1]}" if checkpoints else ""
        raise CliError(f"{path} has no {WEIGHTS}{hint}")
    if config:
        return weights, Path(config)
    return weights, path / CONFIG if (path / CONFIG).is_file() else None


def cmd_upload(args: argparse.Namespace) -> None:
    fields = {"name": args.name, "base_model": args.base_model}
    if args.lora_alpha is not None:
        fields["lora_alpha"] = repr(args.lora_alpha)
    weights, config_path = _adapter_files(Path(args.path), args.config)
    config = _read(config_path, limit=64 << 10) if config_path else None
    with _api(args) as api:
        try:
            file = weights.open("rb")  # noqa: SIM115 (closed below, after the upload)
        except OSError as err:
            raise CliError(f"cannot read {weights}: {err.strerror}") from None
        started = time.monotonic()
        with file, Progress(f"uploading {weights.name}", os.fstat(file.fileno()).st_size) as progress:
            files: dict[str, tuple[str, bytes | BinaryIO]] = {}
            if config is not None:
                files["config"] = (CONFIG, config)
            files["file"] = (weights.name, SentFile(file, progress.update))
            adapter = api.upload("/v1/adapters/upload", fields, files)
    if args.json:
        _print_json(adapter)
    else:
        print(f"uploaded {_summary(adapter)} in {time.monotonic() - started:.1f} s")


def _read(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > limit:
        raise CliError(f"{path} is larger than {limit} bytes")
    return data


def cmd_create(args: argparse.Namespace) -> None:
    body: dict[str, object] = {"name": args.name, "base_model": args.base_model, "repo": args.repo,
                               "revision": args.revision}  # fmt: skip
    if args.hf_token:
        body["hf_token"] = args.hf_token
    with _api(args) as api:
        adapter = api.call("POST", "/v1/adapters", body)
        if not args.no_wait:
            adapter = _wait(api, adapter, args.timeout)
    if args.json:
        _print_json(adapter)
    elif adapter["status"] != "failed":
        print(f"registered {_summary(adapter)}")
    if adapter["status"] == "failed":
        raise CliError(f"{adapter['name']} failed: {adapter.get('status_reason') or 'no reason given'}")


def _wait(api: ApiClient, adapter: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Polls the adapter until it is no longer pending."""
    deadline = time.monotonic() + timeout
    text = f"fetching {adapter['source'].get('repo', '')}@{adapter['source'].get('revision', '')} for {adapter['name']}"
    spinner = Spinner(text)
    try:
        while adapter["status"] == "pending":
            if time.monotonic() > deadline:
                raise CliError(
                    f"{adapter['name']} is still pending after {timeout:.0f} s; see `loraplane adapters list`"
                )
            next_poll = time.monotonic() + 0.5
            while time.monotonic() < next_poll:
                spinner.tick()
                time.sleep(0.1)
            adapter = api.call("GET", f"/v1/adapters/{quote(adapter['id'], safe='')}")
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting; {adapter['name']} is still being registered") from None
    finally:
        spinner.close()
    return adapter


def _adapters(api: ApiClient) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = api.call("GET", "/v1/adapters")["data"]
    return sorted(data, key=lambda a: (a["name"], a["created_at"]))


def cmd_list(args: argparse.Namespace) -> None:
    with _api(args) as api:
        adapters = _adapters(api)
    if args.json:
        _print_json(adapters)
        return
    if not adapters:
        print("no adapters")
        return
    rows = [["NAME", "BASE MODEL", "STATUS", "SIZE", "CREATED"]]
    notes = []
    for a in adapters:
        created = datetime.fromtimestamp(a["created_at"]).strftime("%Y-%m-%d %H:%M")
        size = human_size(a["size_bytes"]) if a["size_bytes"] else "-"
        status = a["status"] + (" (pinned)" if a.get("pinned") else "")
        rows.append([a["name"], a["base_model"], status, size, created])
        if a.get("status_reason"):
            notes.append(f"{a['name']}: {a['status_reason']}")
        if a.get("placement_error"):
            notes.append(f"{a['name']}: no worker could load it: {a['placement_error']}")
    print(table(rows))
    for note in notes:
        print(note)


def cmd_delete(args: argparse.Namespace) -> None:
    with _api(args) as api:
        matches = [a for a in _adapters(api) if args.name in (a["name"], a["id"])]
        if not matches:
            raise CliError(f"no adapter named {args.name!r}")
        for a in matches:
            api.call("DELETE", f"/v1/adapters/{quote(a['id'], safe='')}")
            print(f"deleted {a['name']} ({a['id']})")


def _named(api: ApiClient, name: str) -> dict[str, Any]:
    """The adapter NAME (or id) names: the live one, not a failed registration of the name."""
    matches = [a for a in _adapters(api) if name in (a["name"], a["id"])]
    if not matches:
        raise CliError(f"no adapter named {name!r}")
    live = [a for a in matches if a["status"] != "failed"] or matches
    return live[-1]  # the newest


def cmd_pin(args: argparse.Namespace) -> None:
    with _api(args) as api:
        a = _named(api, args.name)
        pinned = api.call("POST", f"/v1/adapters/{quote(a['id'], safe='')}/pin")
    slots = pinned.get("pinned_slots") or {}
    print(f"pinned {a['name']} ({a['id']}): {slots.get('used')} of {slots.get('allowed')} pinned slots used")


def cmd_unpin(args: argparse.Namespace) -> None:
    with _api(args) as api:
        a = _named(api, args.name)
        api.call("DELETE", f"/v1/adapters/{quote(a['id'], safe='')}/pin")
    print(f"unpinned {a['name']} ({a['id']})")


def cmd_chat(args: argparse.Namespace) -> None:
    with _api(args) as api:
        _chat(api, args)


def _chat(api: ApiClient, args: argparse.Namespace) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None or not sys.stdin.isatty():
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        if not prompt.strip():
            raise CliError("no prompt: give one as an argument, on stdin, or run on a terminal for a conversation")
        _answer(api, args, [*history, {"role": "user", "content": prompt}])
        return
    import readline  # noqa: F401 (line editing for input())

    print(f"chatting with {args.model}; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not prompt.strip():
            return
        history.append({"role": "user", "content": prompt})
        try:
            history.append({"role": "assistant", "content": _answer(api, args, history)})
        except CliError as err:  # the conversation goes on without that turn
            history.pop()
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            history.pop()
            print(file=sys.stderr)


def _answer(api: ApiClient, args: argparse.Namespace, messages: list[dict[str, str]]) -> str:
    """Streams one answer to stdout as it arrives; returns it."""
    body: dict[str, object] = {"model": args.model, "messages": messages, "stream": True}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    parts = []
    try:
        for event in api.stream("/v1/chat/completions", body):
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or ""
                sys.stdout.write(text)
                sys.stdout.flush()
                parts.append(text)
    finally:
        if parts:
            print()
    return "".join(parts)


USAGE_PAGES = 1000  # most pages one `usage` reads: a bound on an answer that never ends


def cmd_usage(args: argparse.Namespace) -> None:
    start, end = time_range(args, time.time())
    query = {"start_time": str(start), "end_time": str(end), "bucket_width": args.bucket_width, "group_by": "model"}
    buckets: list[dict[str, Any]] = []
    with _api(args) as api:
        for _ in range(USAGE_PAGES):
            page = api.call("GET", "/v1/usage/completions", params=query)
            buckets += page.get("data") or []
            if not page.get("has_more"):
                break
            if not page.get("next_page") or page["next_page"] == query.get("page"):
                raise CliError("the usage answer says there is more but gives no next page")
            query["page"] = str(page["next_page"])
        else:
            raise CliError(f"more than {USAGE_PAGES} pages of usage: ask for a shorter time or wider buckets")
    if args.json:
        _print_json({"object": "page", "data": buckets, "has_more": False, "next_page": None})
        return
    print(render(_usage_lines(buckets), args.bucket_width))


def _usage_lines(buckets: list[dict[str, Any]]) -> list[Line]:
    return [
        Line(
            start=int(b["start_time"]),
            model=r.get("model") or "-",
            input_tokens=int(r.get("input_tokens") or 0),
            cached_tokens=int(r.get("input_cached_tokens") or 0),
            output_tokens=int(r.get("output_tokens") or 0),
            requests=int(r.get("num_model_requests") or 0),
        )
        for b in buckets
        for r in b.get("results") or ()
    ]


def add_commands(sub: Verbs) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", metavar="URL", help=f"the data plane (default: $LORAPLANE_URL, the config file's url, {DEFAULT_URL})"
    )

    def verb(group: Verbs, name: str, func: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help, description=help, parents=[common])
        parser.set_defaults(func=func)
        return parser

    adapters = sub.add_parser("adapters", help="your adapters (tenant; key from $LORAPLANE_API_KEY)")
    group = adapters.add_subparsers(required=True)
    upload = verb(group, "upload", cmd_upload, "upload an adapter: a trainer's output directory, or its weights")
    upload.add_argument(
        "path", metavar="PATH",
        help="the directory save_pretrained wrote (its adapter_model.safetensors and adapter_config.json), "
        "or an adapter_model.safetensors",
    )  # fmt: skip
    upload.add_argument("--name", required=True, help="the adapter's name: chat with it as BASE_MODEL:NAME")
    upload.add_argument("--base-model", required=True, metavar="MODEL", help="the base model it was trained for")
    upload.add_argument(
        "--config", metavar="FILE", help="its adapter_config.json (default: the one in the directory, if any)"
    )
    upload.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="overrides the config's lora_alpha")
    upload.add_argument("--json", action="store_true", help="print the adapter as JSON")
    create = verb(group, "create", cmd_create, "register an adapter from a Hugging Face repo")
    create.add_argument("--repo", required=True, metavar="OWNER/NAME", help="OWNER/NAME on the Hugging Face Hub")
    create.add_argument(
        "--revision", default="main", metavar="REV", help="branch, tag or commit; pinned to its commit (default main)"
    )
    create.add_argument("--name", required=True, help="the adapter's name: chat with it as BASE_MODEL:NAME")
    create.add_argument("--base-model", required=True, metavar="MODEL", help="the base model it was trained for")
    create.add_argument(
        "--hf-token", default=os.environ.get("LORAPLANE_HF_TOKEN"), metavar="TOKEN",
        help="for a private repo (default $LORAPLANE_HF_TOKEN); used for this download only, never stored",
    )  # fmt: skip
    create.add_argument("--no-wait", action="store_true", help="return at once, while it is still pending")
    create.add_argument(
        "--timeout", type=float, default=600, metavar="SECONDS", help="seconds to wait for ready (default 600)"
    )
    create.add_argument("--json", action="store_true", help="print the adapter as JSON")
    listing = verb(group, "list", cmd_list, "list your adapters")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    verb(group, "delete", cmd_delete, "delete an adapter by name (or id)").add_argument("name", metavar="NAME")
    for name, func, what in (
        ("pin", cmd_pin, "keep an adapter loaded at all times, in one of your pinned slots (reserved, dedicated)"),
        ("unpin", cmd_unpin, "free an adapter's pinned slot: it may be evicted for room again"),
    ):
        verb(group, name, func, what).add_argument("name", metavar="NAME", help="its name (or id)")
    chat = verb(sub, "chat", cmd_chat, "chat with a base model or BASE:ADAPTER, streamed")
    chat.add_argument(
        "prompt", nargs="?", metavar="PROMPT", help="one prompt (default: read stdin, or a conversation on a terminal)"
    )
    chat.add_argument("--model", required=True, metavar="MODEL", help="tiny-llama or tiny-llama:ADAPTER_NAME")
    chat.add_argument("--system", metavar="TEXT", help="a system message")
    chat.add_argument("--max-tokens", type=int, metavar="N")
    chat.add_argument("--temperature", type=float, metavar="T")
    add_arguments(verb(sub, "usage", cmd_usage, "your token usage per model, in time buckets"))
