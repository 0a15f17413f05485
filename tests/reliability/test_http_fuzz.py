"""Generated hostile HTTP against the running data plane (and through it the control plane):
multipart upload bodies, `Authorization` and `Host` headers, paths, request parameters. Every
case gets a 4xx (a generated request that happens to be valid may get its 200), none a 5xx;
no process dies or grows past a bound, and no upload lands on disk.

A seeded few hundred cases per test by default; LORAPLANE_FUZZ_EXAMPLES=10000 for the long run
(`make reliability`). Requests are written on raw sockets, so nothing a client library would
refuse to send (CRLF in a header, a bare `%`, a NUL) is spared.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SimStack, new_tenant
from tests.support import figure, lora_tensors, safetensors_bytes, wait_for

EXAMPLES = int(os.environ.get("LORAPLANE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fmt: skip
RSS_GROWTH_MB = 100  # what a process may grow by over one fuzz test
TRIED = {"cases": 0, "5xx": 0}
OK = {200, 201}
SIDE_DOORS = ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/pause", "/resume", "/sleep", "/wake_up",
              "/reset_prefix_cache", "/collective_rpc", "/sim/state", "/start_profile"]  # fmt: skip


def send(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on its own connection: (status, body). A reset connection counts as the
    HTTP parser's 400 only for a request that is not HTTP (a control byte in a header: the
    parser answers 400 and closes on the unread body, which may reset the connection)."""
    head_end = raw.index(b"\r\n\r\n")
    malformed = any(b < 32 and b not in (9, 10, 13) or b == 127 for b in raw[:head_end])
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(raw)
            while chunk := s.recv(65536):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        assert malformed, (raw[:200], data[:200])
        return 400, data
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body


def request(method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [method.encode() + b" " + path + b" HTTP/1.1", *(k + b": " + v for k, v in headers)]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def judge(status: int, body: bytes, allowed: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    TRIED["cases"] += 1
    if status >= 500:
        TRIED["5xx"] += 1
    assert 400 <= status < 500 or status in allowed, (status, body[:300])


@pytest.fixture(scope="module")
def port(sim_stack: SimStack) -> Iterator[int]:
    """The data plane's port; around the module: processes alive, memory bounded, disk clean."""
    stack = sim_stack.stack
    procs = {n: psutil.Process(stack.procs[n].pid) for n in ("dataplane", "controlplane")}
    before = {n: p.memory_info().rss for n, p in procs.items()}
    artifacts = Path(stack.config.data_dir) / "artifacts"
    blobs_before = {p.name for p in (artifacts / "blobs").rglob("*") if p.is_file()}
    yield stack.config.http_port
    grown = {n: (p.memory_info().rss - before[n]) >> 20 for n, p in procs.items()}
    figure("HTTP fuzz: requests tried", TRIED["cases"])
    figure(
        "HTTP fuzz: 5xx answers or crashed processes",
        TRIED["5xx"] + sum(p.poll() is not None for p in stack.procs.values()),
    )
    figure("HTTP fuzz: RSS growth MB (data plane, control plane)", f"{grown['dataplane']}, {grown['controlplane']}")
    assert all(p.poll() is None for p in stack.procs.values())
    assert max(grown.values()) < RSS_GROWTH_MB, grown
    # No new bytes (earlier tests' deletions may still be collecting theirs).
    assert {p.name for p in (artifacts / "blobs").rglob("*") if p.is_file()} <= blobs_before
    # A refused upload's staging file goes when the control plane's end of its stream does, which
    # may be just after the data plane answered.
    wait_for(lambda: not any(p.is_file() for p in (artifacts / "tmp").rglob("*")), 10, "staged upload files left")


@pytest.fixture(scope="module")
def key(sim_stack: SimStack) -> bytes:
    return new_tenant(sim_stack.stack, "fuzzer").encode()


def host(port: int) -> tuple[bytes, bytes]:
    return b"Host", b"127.0.0.1:%d" % port


header_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\r\n\r\n", b"\r\n"))
header_text = st.one_of(
    header_bytes,
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b"Bearer", b"Bearer ", b"bearer lp_", b"Basic Zm9vOmJhcg==", b"Bearer lp_\r\nX-Evil: 1",
                     b"Bearer ' OR 1=1 --", b"Bearer ${jndi:ldap://x}", b"Bearer \x00", b"Bearer " + b"A" * 20000]),
)  # fmt: skip


@FUZZ
@given(header_text)
def test_authorization_header(port: int, value: bytes) -> None:
    """Never in: a 401 with one constant body (or the HTTP parser's 400 / the header limit's 413)."""
    status, body = send(port, request("POST", b"/v1/chat/completions", [host(port), (b"Authorization", value)], b"{}"))
    judge(status, body)
    if status == 401:
        UNAUTHORIZED.add(body)
        assert len(UNAUTHORIZED) == 1, UNAUTHORIZED


UNAUTHORIZED: set[bytes] = set()  # every 401's body: one, whatever the header was

paths = st.one_of(
    st.sampled_from([p.encode() for p in SIDE_DOORS]).flatmap(
        lambda p: st.sampled_from([p, b"/" + p, b"/v1/../" + p.lstrip(b"/"), p.replace(b"/", b"%2f"),
                                   b"/v1/%2e%2e" + p, p.upper(), p + b"?x=1", p + b"/", b"/./" + p.lstrip(b"/")])
    ),
    st.binary(min_size=1, max_size=200).map(lambda b: b"/" + b.translate(None, b" \r\n")),
    st.text(alphabet="/.%2eE?#&=v1abcdmodelsadapters", max_size=60).map(lambda t: ("/" + t).encode()),
)  # fmt: skip
hosts = st.one_of(
    st.sampled_from([b"x/v1?", b"127.0.0.1:1/v1/load_lora_adapter?", b"", b"evil.example", b"[::1]", b"a" * 5000]),
    header_bytes,
)


@FUZZ
@given(paths, hosts, st.sampled_from(["GET", "POST", "DELETE", "PUT", "OPTIONS"]), st.booleans())
def test_paths_and_hosts(port: int, key: bytes, path: bytes, host_value: bytes, method: str, authorized: bool) -> None:
    """The engine's side doors are never reached, with or without a key, whatever the Host says."""
    headers = [(b"Host", host_value)] + ([(b"Authorization", b"Bearer " + key)] if authorized else [])
    status, body = send(port, request(method, path, headers, b"{}"))
    reachable = {200} if authorized and method == "GET" and path.split(b"?")[0] in _OPEN_PATHS else set()
    judge(status, body, reachable | ({200} if path.split(b"?")[0] in _PUBLIC else set()))
    assert b"Success: LoRA adapter" not in body and b'"running"' not in body


_PUBLIC = {b"/healthz", b"/readyz", b"/metrics"}
_OPEN_PATHS = {b"/v1/models", b"/v1/adapters"}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
params = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny-llama", "tiny-llama:nope", "tiny-embed", "", "x" * 300]) | json_values},
    optional={
        name: json_values | st.integers(-5, 10**9)
        for name in (
            "n",
            "max_tokens",
            "max_completion_tokens",
            "best_of",
            "temperature",
            "top_p",
            "stream",
            "logprobs",
            "top_logprobs",
            "stop",
            "seed",
            "cache_salt",
            "prompt",
            "messages",
            "input",
            "tools",
            "lora_request",
            "extra_body",
            "priority",
            "stream_options",
            "response_format",
        )
    },  # fmt: skip
)


@FUZZ
@given(params, st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"]))
def test_request_parameters(port: int, key: bytes, body: dict[str, object], path: bytes) -> None:
    """A clear 4xx for what is wrong, or the answer; never a 5xx, never past the limits."""
    raw = json.dumps(body).encode()
    status, answer = send(port, request("POST", path, [host(port), (b"Authorization", b"Bearer " + key),
                                                       (b"Content-Type", b"application/json")], raw))  # fmt: skip
    judge(status, answer, OK)
    limits = {"n": 8, "best_of": 8, "max_tokens": 4096, "max_completion_tokens": 4096}
    over = any(type(v := body.get(p)) is int and v > most for p, most in limits.items())
    if over:
        assert status == 400, (status, answer[:300])


boundaries = st.one_of(
    st.just(b"XyZ"), st.binary(min_size=0, max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)
)
part_names = st.sampled_from(
    [b"name", b"base_model", b"file", b"config", b"lora_alpha", b"x", b"", b"file\x00", b'na"me']
)
part = st.tuples(
    part_names,
    st.binary(max_size=300),
    st.sampled_from([b"", b'; filename="a.safetensors"', b'; filename="../../etc/x"']),
)


@FUZZ
@given(boundaries, st.lists(part, max_size=6), st.sampled_from([b"", b"--", b"--\r\n", b"garbage"]), st.booleans())
def test_multipart_uploads(
    port: int, key: bytes, boundary: bytes, parts: list[tuple[bytes, bytes, bytes]], ending: bytes, valid_file: bool
) -> None:
    """Malformed or hostile forms, or a well-formed one around bytes that are no adapter: 4xx."""
    chunks = []
    for name, value, extra in parts:
        if name == b"file" and valid_file:
            value = safetensors_bytes(lora_tensors(rank=4))[:-1]  # one byte short of an adapter
        chunks.append(
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="'
            + name
            + b'"'
            + extra
            + b"\r\n\r\n"
            + value
            + b"\r\n"
        )
    body = b"".join(chunks) + b"--" + boundary + ending
    headers = [
        host(port),
        (b"Authorization", b"Bearer " + key),
        (b"Content-Type", b"multipart/form-data; boundary=" + boundary),
    ]
    status, answer = send(port, request("POST", b"/v1/adapters/upload", headers, body))
    judge(status, answer)
