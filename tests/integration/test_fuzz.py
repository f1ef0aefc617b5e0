"""Hostile input, generated: over ten thousand raw HTTP requests against a running edgecache.

edgecache runs in-process (on its own event loop in a helper thread) with two
upstreams that are both a dead port, so nothing can reach anything: a request
that passes validation can only end in 502/503. Requests are written as raw
bytes on a socket (so anything goes: percent-encodings, dot segments, raw
unicode, very long names, bad digests, ranges, query strings, odd headers,
bodies on GET, odd methods). Properties:

* never a 500, and no 5xx other than 502/503; a 502/503 only for a request an
  independent oracle calls valid (it could have been sent upstream);
* every error edgecache itself answers on /v2 is OCI error JSON; a 400 without
  edgecache's X-Request-Id is aiohttp's HTTP layer refusing the bytes;
* no traceback in the logs, bounded RSS;
* oversized headers get a 4xx, and slowloris clients do not starve a normal one.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import orjson
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.edge import Edge, make_config, start_edge

T = TypeVar("T")

BATCH = 20
EXAMPLES = 520
MIN_REQUESTS = 10_000
RSS_GROWTH_LIMIT = 50 << 20
HEX64 = "0123456789abcdef" * 4
PT_NS = "pt.example:5000"


# -- edgecache on its own loop ---------------------------------------------------------------------------------------


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EdgeThread:
    """An in-process edgecache on a private event loop in a helper thread (so a sync test can drive it)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="edge-loop", daemon=True)
        self.edge: Edge | None = None

    def __enter__(self) -> EdgeThread:
        self.thread.start()
        dead = f"http://127.0.0.1:{dead_port()}"
        pt = {"url": f"http://127.0.0.1:{dead_port()}", "namespaces": [PT_NS], "prefix": "pt", "auth": "passthrough",
              "retries": 0, "connect_timeout": "1s", "read_timeout": "2s"}
        cfg = make_config(self.cache_dir, dead, name="dead", retries=0, connect_timeout="1s", read_timeout="2s",
                          extra_upstreams={"pt": pt})
        self.edge = self.run(start_edge(cfg))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.edge is not None:
                self.run(self.edge.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.edge is not None
        return int(self.edge.url.rsplit(":", 1)[1])


# -- a raw HTTP/1.1 client --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: the connection closed without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""


async def send_raw(port: int, data: bytes, head: bool, timeout: float = 15.0) -> Answer:
    """Write ``data``, read one response framed by its own headers (never wait for EOF after it)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(data)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                while True:
                    try:
                        raw = await reader.readuntil(b"\r\n\r\n")
                    except (asyncio.IncompleteReadError, ConnectionError) as e:
                        return Answer(0, error=f"no answer: {type(e).__name__}")
                    lines = raw.decode("latin-1").split("\r\n")
                    status = int(lines[0].split(" ", 2)[1])
                    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                    if status >= 200:
                        break  # a 100 Continue comes before the real answer
                if head or status in (204, 304):
                    body = b""
                elif "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        chunks.append(chunk[:-2])
                    body = b"".join(chunks)
                else:
                    body = await reader.read()
                return Answer(status, headers, body)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        return Answer(0, error=f"no answer within {timeout}s")


# -- what to send ----------------------------------------------------------------------------------------------------

_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,6}){0,2}", fullmatch=True)
_weird_component = st.one_of(
    st.sampled_from(["..", ".", "", "%2e%2e", "%2E.", "%2F", "%00", "%ff", "%C3%BC", "UPPER", "a b", "ü", "\u00e9t\u00e9",
                     "😀", "a%", "%%", "~x", "a\\b", "a;b", "*", "a__b", "a--b", "_x", "x.", "%41", "a:b", "a@b",
                     "\x7f", "a\tb", "%0d%0a", "%u002e", "..%2f", "con", "."*300]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n /?#"), max_size=12),
    st.integers(100, 300).map(lambda n: "a" * n),
)
_name = st.lists(st.one_of(_component, _component, _component, _weird_component), min_size=1, max_size=4).map("/".join)
_long_name = st.integers(200, 20_000).map(lambda n: "/".join(["ab"] * (n // 3)))
_digest = st.one_of(
    st.just("sha256:" + HEX64),
    st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: "sha512:" + h),
    st.sampled_from(["sha256:", "sha256:" + HEX64[:-1], "sha256:" + HEX64.upper(), "SHA256:" + HEX64, "md5:" + HEX64[:32],
                     "sha256%3A" + HEX64, "sha256:" + HEX64 + "/..", "sha256:../../" + HEX64[:58], "sha384:" + "a" * 96,
                     "sha256::" + HEX64, "sha256:" + "g" * 64, "sha256:" + HEX64 + "%00"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n /?#"), max_size=80),
)
_tag = st.one_of(st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True),
                 st.sampled_from(["latest", "v1", "-x", ".x", "x" * 128, "x" * 129, "%2e%2e", "t~g", "ta@g", ""]),
                 _digest)
_endpoint = st.one_of(
    _tag.map(lambda t: "manifests/" + t),
    _digest.map(lambda d: "blobs/" + d),
    _digest.map(lambda d: "referrers/" + d),
    st.sampled_from(["tags/list", "tags/list/", "tags/", "blobs/uploads/", "blobs/uploads/x", "manifests/", "blobs/",
                     "manifests/a/b", "_catalog", "", "unknown/x"]),
)
_v2_path = st.one_of(
    st.builds(lambda n, e: f"/v2/{n}/{e}", st.one_of(_name, _name, _long_name), _endpoint),
    st.builds(lambda n, e: f"/v2/pt/{n}/{e}", _name, _endpoint),
)
_other_path = st.one_of(
    st.sampled_from(["/", "/v2", "/v2/", "//v2/", "/v2//", "/healthz", "/readyz", "/metrics", "/_edgecache/token/pt",
                     "/_edgecache/token/dead", "/_edgecache/token/", "/_edgecache/token/%2e%2e", "*",
                     "http://127.0.0.1/v2/", "/v2/library/x/manifests/v1#frag", "/%2e%2e/%2e%2e/etc/passwd",
                     "/v2/../healthz", "/healthz/../v2/", "/v2/library/x/blobs/sha256:" + HEX64 + "/"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n "), max_size=60).map(lambda t: "/" + t),
)
_path = st.one_of(_v2_path, _v2_path, _v2_path, _other_path)

_qvalue = st.one_of(
    st.sampled_from(["", "1", "0", "-1", "100", "9999999", "abc", PT_NS, "unknown.example", "UPPER.io", "a..b",
                     "127.0.0.1:1", "application/vnd.example+json", "a/b/c", "%00", "x" * 300]),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n #"), max_size=30).map(lambda t: quote(t, safe="")),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n #&"), max_size=30),
)
_query = st.lists(st.tuples(st.sampled_from(["ns", "n", "last", "artifactType", "digest", "scope", "service", "x",
                                             "ns[]", "", "%6es"]), _qvalue), max_size=4)

_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)
_auth = st.one_of(
    st.binary(max_size=40).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    st.sampled_from(["Basic", "Basic ", "Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
                     "Bearer", "Bearer ", "Bearer x.y.z", "Negotiate abc", "basic Zm9vOmJhcg==", ""]),
    _header_value.map(lambda v: "Bearer " + v),
)
_accept = st.one_of(
    st.lists(st.sampled_from(["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                              "application/vnd.docker.distribution.manifest.v2+json", "*/*", "text/html", "a/b;q=0.5",
                              ",", ";;", "application/json"]), max_size=6).map(", ".join),
    _header_value,
)
_range = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 10**6), st.integers(0, 10**6)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, 10**20)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(0, 10**20)),
    st.sampled_from(["bytes=", "bytes=0-1,2-3", "bytes=-", "items=0-1", "bytes=a-b", "bytes=5-1", "bytes=" + "9" * 30 + "-",
                     "bytes=0x10-", "bytes = 0-1", "bytes=0-1;x", "BYTES=0-0"]),
    _header_value,
)
_header_name = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}", fullmatch=True)
_header = st.one_of(
    st.tuples(st.just("Accept"), _accept),
    st.tuples(st.just("Range"), _range),
    st.tuples(st.just("Authorization"), _auth),
    st.tuples(st.sampled_from(["X-Request-Id", "Host", "Content-Type", "If-None-Match", "If-Range", "User-Agent",
                               "Accept-Encoding", "Cookie", "X-Forwarded-For", "Docker-Distribution-API-Version"]),
              _header_value),
    st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "nonsense"])),
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "gzip", "identity", "chunked, gzip", "x"])),
    st.tuples(_header_name, _header_value),
    st.tuples(_header_name, st.sampled_from(["a\x00b", "x" * 9000])),
)
_method = st.one_of(st.sampled_from(["GET"] * 8 + ["HEAD"] * 3 + ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                                                                 "CONNECT", "get", "FOO", "G E T", "PRI"]),
                    st.from_regex(r"[A-Z]{1,12}", fullmatch=True))


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def target(self) -> str:
        q = "&".join(f"{k}={v}" for k, v in self.query)
        return self.path + ("?" + q if self.query else "")

    def raw(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.body and not any(k.lower() == "transfer-encoding" for k, _ in self.headers):
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + self.body


_request = st.builds(Req, _method, _path, _query.map(tuple), st.lists(_header, max_size=6).map(tuple),
                     st.one_of(st.just(b""), st.just(b""), st.binary(max_size=2048)))


# -- the oracle ----------------------------------------------------------------------------------------------------------

_SPEC_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_SPEC_NAME = re.compile(rf"{_SPEC_COMPONENT}(?:/{_SPEC_COMPONENT})*")
_SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SPEC_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_SPEC_PATH = re.compile(r"/v2/(?P<name>.+)/(?:manifests/(?P<ref>[^/]+)|blobs/(?P<blob>[^/]+)|tags/list|"
                        r"referrers/(?P<referrer>[^/]+))")


def may_reach_upstream(req: Req) -> bool:
    """Independent of edgecache's parser: could this request legitimately be sent to an upstream?"""
    if req.method not in ("GET", "HEAD", "POST"):
        return False
    if req.path == "/_edgecache/token/pt":  # the passthrough token relay asks the upstream's /v2/
        return True
    if req.method == "POST":
        return False
    if req.path in ("/v2", "/v2/"):  # the base answers locally, unless ns= picks the passthrough upstream
        return any(k == "ns" for k, _ in req.query)
    m = _SPEC_PATH.fullmatch(req.path)
    if m is None or len(m["name"]) > 255 or _SPEC_NAME.fullmatch(m["name"]) is None:
        return False
    if m["ref"] is not None:
        return bool(_SPEC_TAG.fullmatch(m["ref"]) or _SPEC_DIGEST.fullmatch(m["ref"]))
    digest = m["blob"] or m["referrer"]
    return digest is None or _SPEC_DIGEST.fullmatch(digest) is not None


def problems(req: Req, ans: Answer) -> list[str]:
    """What is wrong with this answer to this request (empty: fine)."""
    out = []
    from_app = "x-request-id" in ans.headers  # edgecache's middleware stamps every answer it makes
    if ans.status == 0:
        out.append(ans.error or "no answer")
    elif ans.status == 500:
        out.append("500")
    elif ans.status >= 500 and ans.status not in (502, 503):
        out.append(f"unexpected {ans.status}")
    elif ans.status in (502, 503):
        if not may_reach_upstream(req) and req.path != "/readyz":
            out.append(f"{ans.status} for a request that should never reach an upstream")
        if req.path == "/readyz":
            out.append("readyz said unready")
    elif not from_app and not 400 <= ans.status < 500:
        out.append(f"{ans.status} without edgecache's request id")
    if from_app and ans.status >= 400 and req.method != "HEAD" and req.path.startswith("/v2") and ans.status != 0:
        try:
            doc = orjson.loads(ans.body)
            ok = isinstance(doc, dict) and isinstance(doc.get("errors"), list) and bool(doc["errors"][0].get("code"))
        except (orjson.JSONDecodeError, IndexError, AttributeError, TypeError):
            ok = False
        if not ok:
            out.append(f"{ans.status} body is not OCI error JSON: {ans.body[:120]!r}")
        elif ans.status in (502, 503) and doc["errors"][0]["code"] not in ("UNAVAILABLE", "UPSTREAM_ERROR"):
            out.append(f"{ans.status} with code {doc['errors'][0]['code']}")
    return out


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()[:200]} ({type(r.exc_info[1]).__name__}: {str(r.exc_info[1])[:200]})"  # type: ignore[index]
            for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.fixture
def edge_thread(tmp_path: Path) -> Iterator[EdgeThread]:
    with EdgeThread(tmp_path / "cache") as et:
        yield et


# -- the fuzz ------------------------------------------------------------------------------------------------------------


def test_ten_thousand_hostile_requests(edge_thread: EdgeThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    port = edge_thread.port
    sent = 0
    statuses: dict[int, int] = {}
    bad: list[tuple[Req, int, list[str]]] = []

    async def batch(reqs: list[Req]) -> list[Answer]:
        return list(await asyncio.gather(*(send_raw(port, r.raw(), r.method == "HEAD") for r in reqs)))

    warm = [Req("GET", f"/v2/library/x/blobs/sha256:{HEX64}", (), (), b"")] * 50  # settle the allocator first
    assert all(a.status == 503 for a in edge_thread.run(batch(warm)))
    rss_before = rss()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_request, min_size=BATCH, max_size=BATCH))
    def run_batch(reqs: list[Req]) -> None:
        nonlocal sent
        answers = edge_thread.run(batch(reqs))
        sent += len(reqs)
        for req, ans in zip(reqs, answers):
            statuses[ans.status] = statuses.get(ans.status, 0) + 1
            found = problems(req, ans)
            if found and len(bad) < 50:
                bad.append((req, ans.status, found))

    run_batch()
    rss_after = rss()
    assert sent >= MIN_REQUESTS, f"only {sent} requests were generated"
    assert bad == [], "\n".join(f"{p}: {r.method} {r.target[:300]!r} headers={r.headers!r:.300} -> {s}"
                                for r, s, p in bad)
    assert tracebacks(caplog) == []
    growth = rss_after - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth >> 20} MiB over {sent} requests"
    # the edge is still healthy and still refuses to dial for bad input
    ans = edge_thread.run(send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False))
    assert ans.status == 200
    assert statuses.get(503, 0) > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > sent // 2, statuses


# -- oversized headers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["one 100 KB header", "a 100 KB request line", "200 headers", "100 KB of headers"])
def test_oversized_request_heads_get_4xx(what: str, edge_thread: EdgeThread, caplog: pytest.LogCaptureFixture) -> None:
    path = f"/v2/library/x/blobs/sha256:{HEX64}"
    if what == "one 100 KB header":
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 100_000}\r\n"
    elif what == "a 100 KB request line":
        head = f"GET /v2/{'a/' * 50_000}manifests/latest HTTP/1.1\r\nHost: x\r\n"
    elif what == "200 headers":
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(200))
    else:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: {'b' * 1000}\r\n" for i in range(100))
    ans = edge_thread.run(send_raw(edge_thread.port, (head + "Connection: close\r\n\r\n").encode(), False))
    assert 400 <= ans.status < 500, (ans.status, ans.error, ans.body[:200])
    ok = edge_thread.run(send_raw(edge_thread.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False))
    assert ok.status == 200
    assert tracebacks(caplog) == []


# -- slow clients --------------------------------------------------------------------------------------------------------------

SLOW_CLIENTS = 50
TRICKLE_EVERY = 0.5
TRICKLE_FOR = 4.0


def test_slowloris_does_not_starve_a_normal_client(edge_thread: EdgeThread) -> None:
    """50 connections each sending one header byte every 0.5 s: /healthz still answers within 1 s.

    Whether edgecache cuts such clients off is measured (``cut``) but not asserted: it relies on
    aiohttp's defaults, which have no timeout for receiving a request head.
    """
    port = edge_thread.port

    async def slow(cut: list[float], stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        head = b"GET /v2/library/x/manifests/latest HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        try:
            for byte in head:
                if stop.is_set():
                    return
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1), TRICKLE_EVERY) == b"":
                        cut.append(time.monotonic() - started)  # the server hung up on us
                        return
        except ConnectionError:
            cut.append(time.monotonic() - started)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def scenario() -> tuple[list[float], list[float]]:
        cut: list[float] = []
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(slow(cut, stop)) for _ in range(SLOW_CLIENTS)]
        latencies = []
        deadline = time.monotonic() + TRICKLE_FOR
        while time.monotonic() < deadline:
            started = time.monotonic()
            ans = await send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False,
                                 timeout=5)
            assert ans.status == 200, ans
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.25)
        stop.set()
        await asyncio.gather(*tasks)
        return latencies, cut

    latencies, cut = edge_thread.run(scenario())
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f}s while {SLOW_CLIENTS} clients trickled"
    # Finding for the lead (not asserted): with aiohttp defaults no slow client is cut off in TRICKLE_FOR seconds.
    slow_clients_cut = len(cut)
    assert slow_clients_cut >= 0
