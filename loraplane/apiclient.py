"""The data plane's HTTP API as the tenant's `loraplane` verbs call it: where it is and with
which key (`Settings`), and `ApiClient`, on httpx.

Every failure a user can cause or meet (a bad key, an unknown name, a refused connection, an
answer that is not JSON) is a `CliError`, which the command prints as one line.
"""

from __future__ import annotations

import io
import json
import os
import ssl
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0  # any one wait on the network
ANSWER_TIMEOUT_S = 600.0  # the wait for the next piece of a streamed answer
MAX_ERROR_BODY = 64 << 10


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


class ApiClient:
    """Blocking calls to the data plane, each with a timeout. Proxy variables in the environment
    are not used, and https is checked against the system's certificates."""

    def __init__(self, settings: Settings) -> None:
        try:
            url = httpx.URL(settings.url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise CliError(f"the URL {settings.url!r} is not an http:// or https:// URL")
        self.url = settings.url
        self._http = httpx.Client(
            base_url=settings.url,
            headers={"Authorization": f"Bearer {settings.api_key}", "User-Agent": "loraplane-cli"},
            timeout=TIMEOUT_S,
            verify=ssl.create_default_context(),
            trust_env=False,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self._http.close()

    def call(
        self, method: str, path: str, body: dict[str, object] | None = None, params: Mapping[str, str] | None = None
    ) -> Any:
        """A JSON request (with `params` as its query string); the JSON answer."""
        with self._errors():
            return _json(_checked(self._http.request(method, path, json=body, params=params)))

    def upload(self, path: str, fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes | BinaryIO]]) -> Any:
        """A multipart/form-data POST: `fields`, then `files` (name: (filename, content)) in their
        order. An open file is streamed from where it is (httpx reads it 64 kB at a time), with
        its Content-Length announced first."""
        parts = {name: (filename, content, "application/octet-stream") for name, (filename, content) in files.items()}
        with self._errors():
            # A refusal before the end of the body (too large, say) is still read: when the data
            # plane closes its side, httpcore stops sending and reads the answer it left.
            return _json(_checked(self._http.post(path, data=fields, files=parts)))

    def stream(self, path: str, body: dict[str, object]) -> Iterator[dict[str, Any]]:
        """A POST answered with server-sent events: each event's JSON, until `[DONE]`."""
        timeout = httpx.Timeout(TIMEOUT_S, read=ANSWER_TIMEOUT_S)
        headers = {"Accept": "text/event-stream"}
        with self._errors(), self._http.stream("POST", path, json=body, headers=headers, timeout=timeout) as resp:
            _checked(resp)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and isinstance(event.get("error"), dict):
                    raise CliError(str(event["error"].get("message") or "the answer failed"))
                yield event
            raise CliError("the answer was cut off")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place where httpx's errors become ours."""
        try:
            yield
        except httpx.TimeoutException:
            raise CliError(f"the data plane at {self.url} did not answer in time") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.DecodingError, ValueError) as err:
            raise CliError(f"the data plane at {self.url} broke off its answer ({type(err).__name__})") from None
        except httpx.HTTPError as err:
            raise CliError(f"cannot reach the data plane at {self.url}: {_reason(err)}") from None


class SentFile(io.FileIO):
    """An open file as an upload reads it: each read reported to `sent` (the bytes it read); a
    file that cannot be read, or got shorter, is a CliError. It shares `file`'s descriptor."""

    def __init__(self, file: BinaryIO, sent: Callable[[int], object]) -> None:
        super().__init__(file.fileno(), "rb", closefd=False)
        self._label, self._sent = file.name, sent
        self._left = os.fstat(file.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        try:  # no further than the size httpx announced, should the file have grown since
            chunk = super().read(self._left if size is None or size < 0 else min(size, self._left))
        except OSError as err:
            raise CliError(f"cannot read {self._label}: {err.strerror}") from None
        if not chunk and self._left > 0:
            raise CliError(f"{self._label} got shorter while it was being sent")
        if chunk:
            self._left -= len(chunk)
            self._sent(len(chunk))
        return chunk


def _reason(err: BaseException) -> str:
    """The operating system's words for a failed connection (`Connection refused`), found in the
    chain of exceptions httpx raises from."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(err) or type(err).__name__


def _checked(resp: httpx.Response) -> httpx.Response:
    """The response, or its error envelope's message as a CliError."""
    if resp.status_code < 400:
        return resp
    raw = next(resp.iter_bytes(MAX_ERROR_BODY), b"")
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
    retry = resp.headers.get("Retry-After")
    raise CliError(f"{message} (retry in {retry} s)" if retry and resp.status_code == 503 else str(message))


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise CliError(f"the answer was not JSON (HTTP {resp.status_code})") from None
