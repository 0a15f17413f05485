"""The tenant's verbs of the `loraplane` command (`adapters …`, `chat`): the data plane's HTTP
API with the tenant's key, on the standard library alone.

Every failure a user can cause or meet (a bad key, an unknown name, a refused connection) is a
`CliError`, which the command prints as one line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeAlias
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0  # any one wait on the network
ANSWER_TIMEOUT_S = 600.0  # the wait for the next piece of a streamed answer
CHUNK = 256 << 10
MAX_ERROR_BODY = 64 << 10


Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CliError(Exception):
    """An expected failure: printed as `error: <message>`, exit status 1."""


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str], url: str | None = None) -> Settings:
        """The key from LORAPLANE_API_KEY, else the config file; the URL from --url, else
        LORAPLANE_URL, else the config file, else the embedded stack's."""
        path = config_path(environ)
        config = _read_config(path)
        key = environ.get("LORAPLANE_API_KEY") or config.get("api_key", "")
        if not key:
            raise CliError(f"no API key: set LORAPLANE_API_KEY or api_key in {path}")
        url = url or environ.get("LORAPLANE_URL") or config.get("url") or DEFAULT_URL
        return cls(url.rstrip("/"), key)


def config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "loraplane" / "config.toml"


def _read_config(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise CliError(f"cannot read {path}: {err}") from None
    for name in ("api_key", "url"):
        if not isinstance(config.get(name, ""), str):
            raise CliError(f"{path}: {name} must be a string")
    return {k: v for k, v in config.items() if k in ("api_key", "url")}


# The HTTP API


class Api:
    """Blocking calls to the data plane; each opens its own connection."""

    def __init__(self, settings: Settings) -> None:
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"the URL {settings.url!r} is not an http:// or https:// URL")
        self.url = settings.url
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self._auth = f"Bearer {settings.api_key}"

    def call(self, method: str, path: str, body: dict[str, object] | None = None) -> Any:
        """A JSON request; the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn = self._connection(TIMEOUT_S)
        try:
            conn.request(method, self._prefix + path, body=data, headers={**headers, **self._headers()})
            return _json(_checked(conn.getresponse()))
        except (OSError, http.client.HTTPException) as err:
            raise self._unreachable(err) from None
        finally:
            conn.close()

    def upload(
        self, path: str, fields: list[tuple[str, str, bytes]], file: BinaryIO, size: int, sent: Callable[[int], None]
    ) -> Any:
        """A multipart/form-data POST: `fields` (name, filename or "", value) first, then `file`
        as the form's `file` part, read and sent a chunk at a time."""
        boundary = "loraplane-" + secrets.token_hex(16)
        head = b"".join(_part(boundary, name, filename) + value + b"\r\n" for name, filename, value in fields)
        head += _part(boundary, "file", Path(getattr(file, "name", "file")).name)
        tail = f"\r\n--{boundary}--\r\n".encode()
        conn = self._connection(TIMEOUT_S)
        try:
            conn.putrequest("POST", self._prefix + path)
            for k, v in self._headers().items():
                conn.putheader(k, v)
            conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            conn.putheader("Content-Length", str(len(head) + size + len(tail)))
            conn.endheaders()
            try:
                conn.send(head)
                done = 0
                while done < size:
                    chunk = _read_chunk(file, min(CHUNK, size - done))
                    conn.send(chunk)
                    done += len(chunk)
                    sent(done)
                conn.send(tail)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the data plane answered before the end (a refusal) and stopped reading: read it
            return _json(_checked(conn.getresponse()))
        except (OSError, http.client.HTTPException) as err:
            raise self._unreachable(err) from None
        finally:
            conn.close()

    def stream(self, path: str, body: dict[str, object]) -> Iterator[dict[str, Any]]:
        """A POST answered with server-sent events: each event's JSON, until `[DONE]`."""
        conn = self._connection(ANSWER_TIMEOUT_S)
        try:
            headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self._headers()}
            conn.request("POST", self._prefix + path, body=json.dumps(body).encode(), headers=headers)
            resp = _checked(conn.getresponse())
            for line in resp:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and isinstance(event.get("error"), dict):
                    raise CliError(str(event["error"].get("message") or "the answer failed"))
                yield event
            raise CliError("the answer was cut off")
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise self._unreachable(err) from None
        finally:
            conn.close()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._auth, "User-Agent": "loraplane-cli"}

    def _unreachable(self, err: Exception) -> CliError:
        if isinstance(err, TimeoutError):
            return CliError(f"the data plane at {self.url} did not answer in time")
        if isinstance(err, http.client.HTTPException | ValueError):
            return CliError(f"the data plane at {self.url} broke off its answer ({type(err).__name__})")
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        return CliError(f"cannot reach the data plane at {self.url}: {reason}")


def _part(boundary: str, name: str, filename: str) -> bytes:
    """A form part's boundary and headers; its value follows."""
    headers = f'Content-Disposition: form-data; name="{name}"'
    if filename:
        headers += f'; filename="{quote(filename, safe=" ._-+()[]")}"\r\nContent-Type: application/octet-stream'
    return f"--{boundary}\r\n{headers}\r\n\r\n".encode()


def _read_chunk(file: BinaryIO, n: int) -> bytes:
    try:
        chunk = file.read(n)
    except OSError as err:
        raise CliError(f"cannot read {file.name}: {err.strerror}") from None
    if not chunk:
        raise CliError(f"{file.name} got shorter while it was being sent")
    return chunk


def _checked(resp: http.client.HTTPResponse) -> http.client.HTTPResponse:
    """The response, or its error envelope's message as a CliError."""
    if resp.status < 400:
        return resp
    raw = resp.read(MAX_ERROR_BODY)
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {resp.status} {resp.reason}".strip()
    retry = resp.getheader("Retry-After")
    raise CliError(f"{message} (retry in {retry} s)" if retry and resp.status == 503 else str(message))


def _json(resp: http.client.HTTPResponse) -> Any:
    try:
        return json.loads(resp.read())
    except ValueError:
        raise CliError(f"the answer was not JSON (HTTP {resp.status})") from None


# What the user sees on the terminal


class Progress:
    """A bar on stderr, redrawn at most 10 times a second; nothing when stderr is not a terminal."""

    def __init__(self, label: str, total: int, out: IO[str] = sys.stderr) -> None:
        self._label, self._total, self._out = label, total, out
        self._tty = out.isatty()
        self._started = self._drawn = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self._tty or (now - self._drawn < 0.1 and done < self._total):
            return
        self._drawn = now
        width = max(10, min(40, shutil.get_terminal_size().columns - len(self._label) - 40))
        filled = width * done // max(self._total, 1)
        rate = done / max(now - self._started, 1e-6)
        line = f"{self._label} [{'#' * filled}{'.' * (width - filled)}] {100 * done // max(self._total, 1):3d}%"
        line += f" {human_size(done)}/{human_size(self._total)}  {human_size(int(rate))}/s"
        if done >= self._total:
            line += "  validating ..."
        self._out.write("\r\x1b[K" + line)
        self._out.flush()

    def close(self) -> None:
        if self._tty:
            self._out.write("\r\x1b[K")
            self._out.flush()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._started


class Spinner:
    """A turning bar and a message on stderr; nothing when stderr is not a terminal."""

    FRAMES = "-\\|/"

    def __init__(self, out: IO[str] = sys.stderr) -> None:
        self._out, self._tty, self._frame = out, out.isatty(), 0

    def tick(self, text: str) -> None:
        if self._tty:
            self._frame += 1
            self._out.write(f"\r\x1b[K{self.FRAMES[self._frame % len(self.FRAMES)]} {text}")
            self._out.flush()

    def close(self) -> None:
        if self._tty:
            self._out.write("\r\x1b[K")
            self._out.flush()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


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


def _api(args: argparse.Namespace) -> Api:
    return Api(Settings.from_env(os.environ, args.url))


def cmd_upload(args: argparse.Namespace) -> None:
    fields = [("name", "", args.name.encode()), ("base_model", "", args.base_model.encode())]
    if args.lora_alpha is not None:
        fields.append(("lora_alpha", "", repr(args.lora_alpha).encode()))
    if args.config:
        fields.append(("config", "adapter_config.json", _read(Path(args.config), limit=64 << 10)))
    api = _api(args)
    try:
        file = Path(args.file).open("rb")  # noqa: SIM115 (closed below, after the upload)
    except OSError as err:
        raise CliError(f"cannot read {args.file}: {err.strerror}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        progress = Progress(f"uploading {Path(args.file).name}", size)
        try:
            adapter = api.upload("/v1/adapters/upload", fields, file, size, progress.update)
        finally:
            progress.close()
    if args.json:
        _print_json(adapter)
    else:
        print(f"uploaded {_summary(adapter)} in {progress.seconds:.1f} s")


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
    api = _api(args)
    body: dict[str, object] = {"name": args.name, "base_model": args.base_model, "repo": args.repo,
                               "revision": args.revision}  # fmt: skip
    if args.hf_token:
        body["hf_token"] = args.hf_token
    adapter = api.call("POST", "/v1/adapters", body)
    if not args.no_wait:
        adapter = _wait(api, adapter, args.timeout)
    if args.json:
        _print_json(adapter)
    elif adapter["status"] != "failed":
        print(f"registered {_summary(adapter)}")
    if adapter["status"] == "failed":
        raise CliError(f"{adapter['name']} failed: {adapter.get('status_reason') or 'no reason given'}")


def _wait(api: Api, adapter: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Polls the adapter until it is no longer pending."""
    spinner = Spinner()
    deadline = time.monotonic() + timeout
    text = f"fetching {adapter['source'].get('repo', '')}@{adapter['source'].get('revision', '')} for {adapter['name']}"
    try:
        while adapter["status"] == "pending":
            if time.monotonic() > deadline:
                raise CliError(
                    f"{adapter['name']} is still pending after {timeout:.0f} s; see `loraplane adapters list`"
                )
            next_poll = time.monotonic() + 0.5
            while time.monotonic() < next_poll:
                spinner.tick(text)
                time.sleep(0.1)
            adapter = api.call("GET", f"/v1/adapters/{quote(adapter['id'], safe='')}")
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting; {adapter['name']} is still being registered") from None
    finally:
        spinner.close()
    return adapter


def _adapters(api: Api) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = api.call("GET", "/v1/adapters")["data"]
    return sorted(data, key=lambda a: (a["name"], a["created_at"]))


def cmd_list(args: argparse.Namespace) -> None:
    adapters = _adapters(_api(args))
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
        rows.append([a["name"], a["base_model"], a["status"], size, created])
        if a.get("status_reason"):
            notes.append(f"{a['name']}: {a['status_reason']}")
        if a.get("placement_error"):
            notes.append(f"{a['name']}: no worker could load it: {a['placement_error']}")
    print(_table(rows))
    for note in notes:
        print(note)


def cmd_delete(args: argparse.Namespace) -> None:
    api = _api(args)
    matches = [a for a in _adapters(api) if args.name in (a["name"], a["id"])]
    if not matches:
        raise CliError(f"no adapter named {args.name!r}")
    for a in matches:
        api.call("DELETE", f"/v1/adapters/{quote(a['id'], safe='')}")
        print(f"deleted {a['name']} ({a['id']})")


def cmd_chat(args: argparse.Namespace) -> None:
    api = _api(args)
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


def _answer(api: Api, args: argparse.Namespace, messages: list[dict[str, str]]) -> str:
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
    upload = verb(group, "upload", cmd_upload, "upload an adapter_model.safetensors")
    upload.add_argument("file", metavar="FILE", help="the adapter's weights (adapter_model.safetensors)")
    upload.add_argument("--name", required=True, help="the adapter's name: chat with it as BASE_MODEL:NAME")
    upload.add_argument("--base-model", required=True, metavar="MODEL", help="the base model it was trained for")
    upload.add_argument("--config", metavar="FILE", help="its adapter_config.json (optional)")
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
    chat = verb(sub, "chat", cmd_chat, "chat with a base model or BASE:ADAPTER, streamed")
    chat.add_argument(
        "prompt", nargs="?", metavar="PROMPT", help="one prompt (default: read stdin, or a conversation on a terminal)"
    )
    chat.add_argument("--model", required=True, metavar="MODEL", help="tiny-llama or tiny-llama:ADAPTER_NAME")
    chat.add_argument("--system", metavar="TEXT", help="a system message")
    chat.add_argument("--max-tokens", type=int, metavar="N")
    chat.add_argument("--temperature", type=float, metavar="T")
