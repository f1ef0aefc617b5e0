"""Hundreds of malformed requests: each gets OCI error JSON with a 4xx, never a 500, never a dial.

The upstream here is a port nobody listens on: any request that got past the
edge would come back 502/503, so a 4xx proves the edge refused it first.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from yarl import URL

from tests.support.edge import Edge, EdgeFactory

HEX = "0123456789abcdef" * 4
GOOD_DIGEST = f"sha256:{HEX}"

BAD_NAMES = [
    "UPPER", "a//b", "a/", "-lead", "trail-", "a..b", "a__.b", "a_-b", "../etc", "a/../b", "a/./b", ".",
    "x" * 256, "a%20b", "a%09b", "a%2Fb", "%2e%2e/x", "a%00b", "%C3%BCmlaut", "a;b", "a:b", "a@b", "a+b", "a*b",
    "a,b", "a!b", "a$b", "a~b", "a'b", "a(b)", "a[b]", "a{b}", "a|b", "a\\b", "a^b", "a=b", "%41bc", "_a", ".a",
    "a%0Ab", "a%0Db", "%0A",
]
BAD_TAGS = ["-x", ".x", "x" * 129, "a%20b", "a/b%2F", "ta@g", "t!g", "t~g", "%2e%2e", "t,g", "t+g"]
BAD_DIGESTS = [
    "sha256:", "sha256:" + HEX[:-1], "sha256:" + HEX + "0", "sha256:" + HEX.upper(), "SHA256:" + HEX,
    "md5:" + HEX[:32], "sha512:" + HEX, "sha256:" + "g" * 64, "sha256" + HEX, ":" + HEX, "sha256::" + HEX,
    "sha256:" + HEX[:60] + "%2e%2e", "sha256:../../" + HEX[:58], "sha384:" + "a" * 96, "latest", "sha256-" + HEX,
]
BAD_RANGES = ["bytes=", "bytes=a-b", "bytes=5-1", "items=0-1", "bytes=-", "bytes 0-1", "bytes=--1", "bytes=0-1-2",
              "bytes=1.5-2", "bytes=0x10-", "bytes=" + "9" * 30 + "-", "bytes=,", "=0-1", "bytes=0-1;x"]
BAD_NS = ["UPPER.io", "exa%20mple.com", "a..b", "-a.com", "a.com:99999999", "a.com/x", "http://a.com", "a.com:",
          "%2e%2e", "unknown.example.com", "127.0.0.1:1"]


def _cases() -> list[tuple[str, str, dict[str, str]]]:
    cases: list[tuple[str, str, dict[str, str]]] = []
    for name, kind in itertools.product(BAD_NAMES, ["manifests/latest", f"blobs/{GOOD_DIGEST}", "tags/list",
                                                     f"referrers/{GOOD_DIGEST}"]):
        cases.append(("GET", f"/v2/{name}/{kind}", {}))
        cases.append(("HEAD", f"/v2/{name}/{kind}", {}))
    for tag in BAD_TAGS:
        cases.append(("GET", f"/v2/library/x/manifests/{tag}", {}))
        cases.append(("HEAD", f"/v2/library/x/manifests/{tag}", {}))
    for d in BAD_DIGESTS:
        for kind in ("blobs", "referrers"):
            cases.append(("GET", f"/v2/library/x/{kind}/{d}", {}))
        if ":" in d or "/" in d or "%" in d:  # otherwise it is a valid tag, not a bad digest
            cases.append(("GET", f"/v2/library/x/manifests/{d}", {}))
    for r in BAD_RANGES:
        cases.append(("GET", f"/v2/library/x/blobs/{GOOD_DIGEST}", {"Range": r}))
    for ns in BAD_NS:
        cases.append(("GET", f"/v2/library/x/manifests/latest?ns={ns}", {}))
        cases.append(("GET", f"/v2/library/x/blobs/{GOOD_DIGEST}?ns={ns}", {}))
    for q in ["n=abc", "n=-1", "n=9999999999", "last=-bad", "last=" + "x" * 200]:
        cases.append(("GET", f"/v2/library/x/tags/list?{q}", {}))
    for at in ["nota%20type", "a/b/c", "/x", "x/", "%00/x"]:
        cases.append(("GET", f"/v2/library/x/referrers/{GOOD_DIGEST}?artifactType={at}", {}))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/v2/library/x/blobs/uploads/", f"/v2/library/x/manifests/latest", f"/v2/library/x/blobs/{GOOD_DIGEST}"):
            cases.append((method, path, {}))
    for path in ["/v2/x", "/v2/x/y", "/v2/library/x/manifests/", "/v2/library/x/blobs/", "/v2/library/x/tags/",
                 "/v2/library/x/unknown/y", "/v2/library/x/manifests/a/b", "/v2/_catalog", "/v2//x/manifests/y",
                 "/v2/%2e%2e/%2e%2e/etc/passwd", "/v2/library/x/blobs/sha256%3A" + HEX, "/v2/library%2Fx/manifests/a",
                 "/nope", "/nope%0Ax", "/healthz%0A", "/v2%0A", "/_edgecache/token/x%0Ay", "/%0A"]:
        cases.append(("GET", path, {}))
    return cases


CASES = _cases()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def dead_edge(edge_factory: EdgeFactory) -> AsyncIterator[Edge]:
    yield await edge_factory(f"http://127.0.0.1:{_dead_port()}", name="dead", library_prefix=True)


def test_there_are_hundreds_of_cases() -> None:
    assert len(CASES) > 400


async def test_malformed_requests_get_oci_errors(dead_edge: Edge, http: aiohttp.ClientSession) -> None:
    failures = []
    for method, path, headers in CASES:
        url = URL(dead_edge.url + path, encoded=True)
        async with http.request(method, url, headers=headers) as r:
            body = await r.read()
            if not 400 <= r.status < 500 or "X-Request-Id" not in r.headers:  # every answer is the edge's
                failures.append((method, path, headers, r.status, body[:200]))
                continue
            if method != "HEAD":
                try:
                    doc = orjson.loads(body)
                except orjson.JSONDecodeError:
                    doc = None
                if not (isinstance(doc, dict) and doc.get("errors") and doc["errors"][0].get("code")):
                    failures.append((method, path, headers, r.status, body[:200]))
    assert failures == []
