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
import contextlib
import logging
import random
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
RSS_GROWTH_LIMIT = 20 << 20  # over REPLAY_PASSES * REPLAY replayed requests: ~5 KB per request would fail it
REPLAY = 1500
REPLAY_PASSES = 2
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
            self.run(self._cancel_leftovers())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @staticmethod
    async def _cancel_leftovers() -> None:
        """Connection handlers still lingering after the runner stopped (clients that never finished a request)."""
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

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

_component = st.one_of(
    st.sampled_from(["library", "x", "team", "big", "multi", "a0", "foo-bar", "foo.bar", "foo__bar", "a-b-c", "a--b", "0",
                     "ubuntu", "my_app", "z9.z9"]),
    st.text("abcxyz0189", min_size=1, max_size=8),
)
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
_tag = st.one_of(st.text("aZ09_.-", min_size=1, max_size=20),
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
_header_name = st.one_of(st.sampled_from(["X-A", "Accept", "Range", "Authorization", "Host", "Content-Length", "TE",
                                          "Connection", "Upgrade", "X-Forwarded-Host", "Forwarded", "Via"]),
                         st.text("AZaz09!#$%&'*+.^_`|~-", min_size=1, max_size=30))
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
                    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12))


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

# Drawing every request of a batch through hypothesis costs ~1.5 ms each; instead each example draws
# DRAWN requests plus a hypothesis-controlled Random that breeds the rest of the batch from them
# (crossover of methods, paths, queries, headers and bodies, then a few mutations).
DRAWN = 4
_UNICODE = ["ü", "é", "😀", "\u202e", "\u0000", "\ufeff", "İ", "ß", "\u2024", "\uff0e", "\u2215"]


def _mutate_path(path: str, rnd: random.Random) -> str:
    op = rnd.randrange(9)
    i = rnd.randint(0, len(path))
    if op == 0 and path:  # percent-encode one character
        j = rnd.randrange(len(path))
        return path[:j] + "".join(f"%{b:02X}" for b in path[j].encode()) + path[j + 1:]
    if op == 1:
        return path[:i] + rnd.choice(["/..", "/.", "/../..", "/%2e%2e", "/.%2e", "//"]) + path[i:]
    if op == 2:
        return path[:i] + rnd.choice(_UNICODE) + path[i:]
    if op == 3:
        return path.upper()
    if op == 4:  # lengthen a segment
        seg = rnd.choice(path.split("/") or ["a"]) or "a"
        return path[:i] + "/" + seg * rnd.randint(2, 300) + path[i:]
    if op == 5:
        return path[:i]
    if op == 6:
        return path[:i] + rnd.choice(["%", "%%", "%zz", "%2", "%00", "%0a", ";x=1", "#f", "?", "?&", "?ns=" + PT_NS]) + path[i:]
    if op == 7:
        return path.replace("/", "\\", 1)
    return path + "/"


def breed(parts: list[Req], rnd: random.Random, n: int) -> list[Req]:
    out = list(parts)
    while len(out) < n:
        a, b, c = rnd.choice(parts), rnd.choice(parts), rnd.choice(parts)
        pool = a.headers + c.headers
        headers = tuple(rnd.sample(pool, k=rnd.randint(0, len(pool)))) if pool else ()
        method = rnd.choice([a.method, "GET", "GET", "HEAD"])
        path = b.path
        for _ in range(rnd.randint(0, 3)):
            path = _mutate_path(path, rnd)
        if rnd.random() < 0.6:  # mostly bytes the HTTP layer lets through, so that edgecache itself must judge them
            path = quote(path, safe="/%:@!$&'()*+,;=-._~")
        query = rnd.choice([c.query, b.query, ()])
        if rnd.random() < 0.2:
            headers += (rnd.choice([("Range", f"bytes={rnd.randint(0, 99)}-{rnd.randint(0, 99)}"),
                                    ("Accept", "application/vnd.oci.image.index.v1+json"),
                                    ("Authorization", "Basic " + base64.b64encode(rnd.randbytes(12)).decode()),
                                    ("Host", rnd.choice(["", "a" * 300, "[::1]", "x:y:z", "ü"]))]),)
        out.append(Req(method, path, query, headers, rnd.choice([a.body, b"", b""])))
    return out


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


class CountAndDrop(logging.Filter):
    """Counts a noisy logger's records below ``keep`` and drops them before any handler.

    Without this, pytest's capture handlers keep every record of the run (and the traceback
    frames of each), which would swamp the RSS measurement of edgecache itself.
    """

    def __init__(self, keep: int = logging.CRITICAL + 1) -> None:
        super().__init__()
        self.keep = keep
        self.counts: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.keep:
            return True
        exc = f" [{type(record.exc_info[1]).__name__}]" if record.exc_info else ""
        key = f"{record.levelname} {record.name}: {record.msg if isinstance(record.msg, str) else ''}"[:90] + exc
        self.counts[key] = self.counts.get(key, 0) + 1
        return False


@contextlib.contextmanager
def counted(name: str, keep: int = logging.CRITICAL + 1) -> Iterator[CountAndDrop]:
    f = CountAndDrop(keep)
    logger = logging.getLogger(name)
    logger.addFilter(f)
    try:
        yield f
    finally:
        logger.removeFilter(f)


def tracebacks(caplog: pytest.LogCaptureFixture, http_layer: bool = False) -> dict[str, int]:
    """ERROR records carrying a traceback, counted by logger and exception type.

    ``http_layer=False``: everything except aiohttp's HTTP server logger (edgecache's own code,
    asyncio); ``True``: only ``aiohttp.server``, which logs every request head it cannot parse
    ("Error handling request", ERROR, with the parser's traceback).
    """
    found: dict[str, int] = {}
    for r in caplog.records:
        if r.levelno >= logging.ERROR and r.exc_info and (r.name == "aiohttp.server") == http_layer:
            key = f"{r.name}: {r.getMessage()[:80]} [{type(r.exc_info[1]).__name__}]"
            found[key] = found.get(key, 0) + 1
    return found


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture, server_log: CountAndDrop | None = None) -> None:
    assert tracebacks(caplog) == {}, "edgecache (or asyncio) logged tracebacks"
    http_layer = tracebacks(caplog, http_layer=True)
    if server_log is not None:
        for key, n in server_log.counts.items():
            if key.startswith(("ERROR", "CRITICAL")) and key.endswith("]"):
                http_layer[key] = http_layer.get(key, 0) + n
    assert http_layer == {}, (
        f"{sum(http_layer.values())} ERROR log records with a traceback from aiohttp.server for malformed client "
        f"requests (a remote client can fill edgecache's log with tracebacks at will): {http_layer}")


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.fixture
def edge_thread(tmp_path: Path) -> Iterator[EdgeThread]:
    with EdgeThread(tmp_path / "cache") as et:
        yield et


# -- the fuzz ------------------------------------------------------------------------------------------------------------


def test_ten_thousand_hostile_requests(edge_thread: EdgeThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with contextlib.ExitStack() as stack:
        _fuzz(edge_thread, caplog, stack)


def _fuzz(edge_thread: EdgeThread, caplog: pytest.LogCaptureFixture, stack: contextlib.ExitStack) -> None:
    port = edge_thread.port
    sent = 0
    statuses: dict[int, int] = {}
    bad: list[tuple[Req, int, list[str]]] = []

    async def batch(reqs: list[Req]) -> list[Answer]:
        return list(await asyncio.gather(*(send_raw(port, r.raw(), r.method == "HEAD") for r in reqs)))

    async def replay(reqs: list[Req]) -> list[Answer]:
        answers: list[Answer] = []
        for i in range(0, len(reqs), BATCH):
            answers += await batch(reqs[i:i + BATCH])
        return answers

    server_log = stack.enter_context(counted("aiohttp.server"))  # counted here, asserted below
    stack.enter_context(counted("edgecache.pullthrough", keep=logging.ERROR))  # "download failed" warnings
    warm = [Req("GET", f"/v2/library/x/blobs/sha256:{HEX64}", (), (), b"")] * 50
    assert all(a.status == 503 for a in edge_thread.run(batch(warm)))
    rss_start = rss()
    sample: list[Req] = []  # a uniform sample of what was generated, replayed below for the RSS check
    picker = random.Random(0)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_request, min_size=DRAWN, max_size=DRAWN), st.randoms(use_true_random=False))
    def run_batch(parts: list[Req], rnd: random.Random) -> None:
        nonlocal sent
        reqs = breed(parts, rnd, BATCH)
        answers = edge_thread.run(batch(reqs))
        for req, ans in zip(reqs, answers):
            sent += 1
            statuses[ans.status] = statuses.get(ans.status, 0) + 1
            found = problems(req, ans)
            if found and len(bad) < 50:
                bad.append((req, ans.status, found))
            if len(sample) < REPLAY:
                sample.append(req)
            elif (j := picker.randrange(sent)) < REPLAY:
                sample[j] = req

    run_batch()
    rss_fuzzed = rss()
    assert sent >= MIN_REQUESTS, f"only {sent} requests were generated"
    assert bad == [], "\n".join(f"{p}: {r.method} {r.target[:300]!r} headers={r.headers!r:.300} -> {s}"
                                for r, s, p in bad)
    # RSS: hypothesis itself keeps every example's choice tree (~7 KB per request here), so the growth
    # over the generated run is mostly the test's. edgecache's own growth is measured by replaying a
    # sample of the generated requests: once to warm up, then REPLAY_PASSES more times.
    edge_thread.run(replay(sample))
    rss_warm = rss()
    for _ in range(REPLAY_PASSES):
        answers = edge_thread.run(replay(sample))
        assert not any(a.status == 500 or a.status == 0 for a in answers)
    growth = rss() - rss_warm
    assert growth < RSS_GROWTH_LIMIT, (f"RSS grew by {growth >> 20} MiB over {REPLAY_PASSES * len(sample)} replayed "
                                       f"requests (and {(rss_fuzzed - rss_start) >> 20} MiB over the {sent} generated, "
                                       "hypothesis's own memory included)")
    # the edge is still healthy, and the mix really exercised both refusals and dials
    ans = edge_thread.run(send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False))
    assert ans.status == 200
    assert statuses.get(503, 0) > 100 and sum(n for s, n in statuses.items() if 400 <= s < 500) > sent // 2, statuses
    assert_no_tracebacks(caplog, server_log)


# -- oversized headers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["one 100 KB header", "a 100 KB request line", "10000 headers",
                                  "100 headers of 1 KB", "128 headers of 16 KB"])
def test_oversized_request_heads(what: str, edge_thread: EdgeThread, caplog: pytest.LogCaptureFixture) -> None:
    """An oversized request head gets a 4xx (never a 500) and the edge stays healthy.

    aiohttp (with edgecache's ``max_field_size``/``max_line_size`` of 16 KiB and the default 128
    headers) limits each line and the number of headers, but not the total size of the head:
    many large headers that are each within the limits make a valid request (here: the dead
    upstream's 503). Whether a total limit is wanted is a policy question (see the report), so
    those cases only assert "not a 500"; aiohttp's tracebacks for the refused heads are asserted
    in :func:`test_ten_thousand_hostile_requests`.
    """
    path = f"/v2/library/x/blobs/sha256:{HEX64}"
    must_refuse = True
    if what == "one 100 KB header":
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 100_000}\r\n"
    elif what == "a 100 KB request line":
        head = f"GET /v2/{'a/' * 50_000}manifests/latest HTTP/1.1\r\nHost: x\r\n"
    elif what == "10000 headers":
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    elif what == "100 headers of 1 KB":
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: {'b' * 1000}\r\n" for i in range(100))
        must_refuse = False
    else:  # the most aiohttp lets through: ~2 MiB of head
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-{i:03}: {'b' * 16_000}\r\n" for i in range(125))
        must_refuse = False
    with counted("aiohttp.server"), counted("edgecache.pullthrough", keep=logging.ERROR):
        ans = edge_thread.run(send_raw(edge_thread.port, (head + "Connection: close\r\n\r\n").encode(), False))
    if must_refuse:
        assert 400 <= ans.status < 500, (ans.status, ans.error, ans.body[:200])
    else:
        assert ans.status != 0 and ans.status != 500 and (400 <= ans.status < 500 or ans.status == 503), \
            (ans.status, ans.error, ans.body[:200])
    ok = edge_thread.run(send_raw(edge_thread.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False))
    assert ok.status == 200
    assert tracebacks(caplog) == {}


# -- slow clients --------------------------------------------------------------------------------------------------------------

SLOW_CLIENTS = 50
TRICKLE_EVERY = 0.5
TRICKLE_FOR = 4.0


def slowloris(edge_thread: EdgeThread, clients: int = SLOW_CLIENTS, trickle_for: float = TRICKLE_FOR
              ) -> tuple[list[float], list[float]]:
    """Trickle ``clients`` request heads one byte per TRICKLE_EVERY while timing /healthz.

    Returns (the /healthz latencies, after how long each slow client that was hung up on was cut).
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
        tasks = [asyncio.ensure_future(slow(cut, stop)) for _ in range(clients)]
        latencies = []
        deadline = time.monotonic() + trickle_for
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

    return edge_thread.run(scenario())


def test_slowloris_does_not_starve_a_normal_client(edge_thread: EdgeThread) -> None:
    """50 connections each sending one header byte every 0.5 s: /healthz still answers within 1 s.

    Whether edgecache cuts such clients off is measured but deliberately not asserted: it relies
    on aiohttp's defaults, which have no timeout for receiving a request head, so none is cut
    (reported to the lead; a bound such as "cut within 60 s" is to be asserted only once wanted).
    """
    latencies, cut = slowloris(edge_thread)
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f}s while {SLOW_CLIENTS} clients trickled"
    assert len(cut) <= SLOW_CLIENTS  # measured only (see the docstring)
