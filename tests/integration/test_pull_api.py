"""The OCI pull API through edgecache against a real registry (issue: serve the pull API)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from edgecache.app import create_app
from tests.support.edge import EdgeFactory, make_config
from tests.support.registry import RegistryProcess
from tests.support.seed import push_blob
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

CONTAINERD_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
                     "application/vnd.docker.distribution.manifest.list.v2+json, "
                     "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*")
SKOPEO_ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, "
                 "application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, "
                 "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json")
def realm_host(ts: TokenServer) -> str:
    return ts.realm.split("://", 1)[1].split("/", 1)[0]


OLD_CLIENT_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


async def test_base_endpoint(edge_factory: EdgeFactory, tap: Tap, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    for method in ("GET", "HEAD"):
        async with http.request(method, edge.url + "/v2/") as r:
            assert r.status == 200
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("accept", [CONTAINERD_ACCEPT, SKOPEO_ACCEPT, OLD_CLIENT_ACCEPT])
async def test_manifest_bytes_and_headers_match_upstream(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                                         http: aiohttp.ClientSession, accept: str) -> None:
    edge = await edge_factory(tap.url)
    for ref in ("v1", registry.seeded.index_digest, registry.seeded.manifests["arm64"][0]):
        url = f"/v2/library/multi/manifests/{ref}"
        async with http.get(registry.url + url, headers={"Accept": accept}) as up:
            up_body, up_status, up_headers = await up.read(), up.status, up.headers
        for _ in range(2):  # miss, then hit
            async with http.get(edge.url + url, headers={"Accept": accept}) as r:
                assert r.status == up_status
                if up_status != 200:
                    continue
                assert await r.read() == up_body
                assert r.headers["Content-Type"] == up_headers["Content-Type"]
                assert r.headers["Docker-Content-Digest"] == up_headers["Docker-Content-Digest"]
            async with http.head(edge.url + url, headers={"Accept": accept}) as r:
                assert r.status == 200
                assert r.headers["Content-Length"] == str(len(up_body))  # HEAD keeps the real length
                assert r.headers["Docker-Content-Digest"] == up_headers["Docker-Content-Digest"]


async def test_schema2_image(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                             http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    img = registry.seeded.images["schema2"]
    async with http.get(f"{edge.url}/v2/{img.repo}/manifests/{img.tag}", headers={"Accept": CONTAINERD_ACCEPT}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert await r.read() == img.manifest


async def test_blobs_full_range_and_errors(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                           http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    digest = s.big_layer_digest
    data = s.blobs[digest]
    url = f"{edge.url}/v2/team/big/blobs/{digest}"
    async with http.head(url) as r:  # uncached HEAD: size from upstream, no body
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data))
    for _ in range(2):  # miss (streamed while it downloads), then hit (sendfile)
        async with http.get(url, headers={"X-Request-Id": "trace42"}) as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"] == "trace42"  # streamed answers carry it too
            assert r.headers["Docker-Content-Digest"] == digest
            assert r.headers["Content-Length"] == str(len(data))
            assert hashlib.sha256(await r.read()).hexdigest() == digest.split(":")[1]
    n = len(data)
    for header, status, expected in [
        ("bytes=0-99", 206, data[:100]),
        (f"bytes={n - 10}-", 206, data[-10:]),
        ("bytes=-5", 206, data[-5:]),
        ("bytes=100-", 206, data[100:]),
        ("bytes=0-1,5-6", 200, data),  # multi-range: the whole blob (RFC 9110 lets us ignore Range)
    ]:
        async with http.get(url, headers={"Range": header}) as r:
            assert r.status == status, header
            assert await r.read() == expected, header
            if status == 206:
                assert r.headers["Content-Range"].endswith(f"/{n}")
    async with http.get(url, headers={"Range": f"bytes={n}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{n}"
        assert orjson.loads(await r.read())["errors"][0]["code"] == "RANGE_INVALID"
    async with http.head(url) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"
    assert tap.count("HEAD", "blob", digest) == 1  # the cached HEAD never went upstream
    # validators: the digest is the strong ETag of a cached blob
    etag = f'"{digest}"'
    async with http.get(url) as r:
        assert r.headers["ETag"] == etag
        await r.read()
    async with http.get(url, headers={"If-None-Match": etag}) as r:
        assert r.status == 304 and await r.read() == b"" and r.headers["ETag"] == etag
    async with http.get(url, headers={"If-None-Match": '"sha256:other", W/' + etag}) as r:
        assert r.status == 304
    async with http.get(url, headers={"If-None-Match": '"sha256:other"'}) as r:
        assert r.status == 200 and await r.read() == data
    async with http.get(url, headers={"Range": "bytes=10-19", "If-Range": etag}) as r:
        assert r.status == 206 and await r.read() == data[10:20]
    async with http.get(url, headers={"Range": "bytes=10-19", "If-Range": '"sha256:other"'}) as r:
        assert r.status == 200 and await r.read() == data  # the client holds something else: all of it
    async with http.head(url, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206 and r.headers["Content-Length"] == "10"
        assert r.headers["Content-Range"] == f"bytes 10-19/{n}"


async def test_zero_byte_blob(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                              http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    for _ in range(2):
        async with http.get(f"{edge.url}/v2/library/multi/blobs/{registry.seeded.empty_digest}") as r:
            assert r.status == 200 and await r.read() == b"" and r.headers["Content-Length"] == "0"


async def test_unknown_blob_and_manifest(edge_factory: EdgeFactory, tap: Tap, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    async with http.get(f"{edge.url}/v2/library/multi/blobs/sha256:{'0' * 64}") as r:
        assert r.status == 404 and orjson.loads(await r.read())["errors"][0]["code"] == "BLOB_UNKNOWN"
    async with http.get(f"{edge.url}/v2/library/multi/manifests/nope") as r:
        assert r.status == 404 and orjson.loads(await r.read())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    async with http.get(f"{edge.url}/v2/library/multi/manifests/nope") as r:
        assert r.status == 404
    assert tap.count("GET", "manifest", "nope") == 1  # the 404 is remembered briefly


async def test_blob_is_not_served_under_a_repository_it_is_not_in(
        edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    digest = registry.seeded.big_layer_digest
    async with http.get(f"{edge.url}/v2/team/big/blobs/{digest}") as r:
        assert r.status == 200
        await r.read()
    async with http.get(f"{edge.url}/v2/library/schema2/blobs/{digest}") as r:
        assert r.status == 404  # the upstream does not have it there, so neither do we


async def test_tags_list_pagination(edge_factory: EdgeFactory, tap: Tap, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    async with http.get(f"{edge.url}/v2/library/multi/tags/list") as r:
        assert r.status == 200
        tags = orjson.loads(await r.read())["tags"]
        assert {"v1", "latest"} <= set(tags)
    async with http.get(f"{edge.url}/v2/library/multi/tags/list?n=1&last=latest") as r:
        assert r.status == 200
    rec = tap.find("GET", "tags")[-1]
    assert "n=1" in rec.query and "last=latest" in rec.query  # forwarded (distribution 2.8 ignores them)
    # A paginating upstream's Link header comes back naming the path the client used.
    link = '</v2/library/multi/tags/list?last=latest&n=1>; rel="next"'
    tap.status_next("tags", 200, {"Link": link, "Content-Type": "application/json"},
                    body=b'{"name":"library/multi","tags":["latest"]}')
    async with http.get(f"{edge.url}/v2/up/library/multi/tags/list?n=1") as r:
        assert r.status == 200
        assert r.headers["Link"] == '</v2/up/library/multi/tags/list?last=latest&n=1>; rel="next"'


async def test_referrers_404_is_passed_through(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                               http: aiohttp.ClientSession) -> None:
    """distribution 2.8 has no referrers API: so must we, or clients never fall back to the tag schema."""
    edge = await edge_factory(tap.url)
    index = registry.seeded.index_digest
    async with http.get(f"{edge.url}/v2/library/multi/referrers/{index}?artifactType=application/vnd.example.sbom.v1") as r:
        assert r.status == 404
    rec = tap.find("GET", "referrers")[-1]
    assert "artifactType=application" in rec.query
    # the fallback tag schema works through us
    tag = "sha256-" + index.split(":")[1]
    async with http.get(f"{edge.url}/v2/library/multi/manifests/{tag}") as r:
        assert r.status in (200, 404)


async def test_routing_by_ns_prefix_and_default(edge_factory: EdgeFactory, make_tap: object, registry: RegistryProcess,
                                                http: aiohttp.ClientSession) -> None:
    tap_a = await make_tap(registry.url)  # type: ignore[operator]
    tap_b = await make_tap(registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap_a.url, name="a", extra_upstreams={
        "b": {"url": tap_b.url, "namespaces": ["b.example"], "prefix": "bee", "auth": "anonymous"}})
    path = "/v2/{}library/multi/manifests/v1{}"
    H = {"Accept": CONTAINERD_ACCEPT}
    async with http.get(edge.url + path.format("", "?ns=b.example"), headers=H) as r:
        assert r.status == 200 and r.headers["OCI-Namespace"] == "b.example"
    assert tap_b.count("GET", "manifest") == 1 and tap_a.count() == 0
    async with http.get(edge.url + path.format("bee/", ""), headers=H) as r:
        assert r.status == 200
    async with http.get(edge.url + path.format("", ""), headers=H) as r:  # default upstream
        assert r.status == 200 and r.headers["OCI-Namespace"] == tap_a.host
    assert tap_a.count("GET", "manifest") == 1
    async with http.get(edge.url + path.format("", f"?ns={tap_a.host}"), headers=H) as r:
        assert r.status == 200 and r.headers["X-Cache"] == "HIT"


async def test_unknown_ns_makes_no_outbound_connection(edge_factory: EdgeFactory, tap: Tap,
                                                       http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    async with http.get(f"{edge.url}/v2/library/multi/manifests/v1?ns=evil.example.com") as r:
        assert r.status == 404
        body = orjson.loads(await r.read())
        assert body["errors"][0]["code"] == "NAME_UNKNOWN" and "evil.example.com" in body["errors"][0]["message"]
    assert tap.count() == 0


async def test_redirect_drops_authorization_on_other_host(edge_factory: EdgeFactory, make_tap: object,
                                                          token_registry: RegistryProcess, token_server: TokenServer,
                                                          registry_factory: object, http: aiohttp.ClientSession) -> None:
    """Blob GETs redirected to another host (S3, CDN) never carry the registry's Authorization."""
    img = token_registry.seeded.public
    digest = img.layer_digests[0]
    # The "CDN": another registry (plain, no auth) holding the same blob at the same path, on another host name.
    cdn_registry = registry_factory()  # type: ignore[operator]
    async with aiohttp.ClientSession() as s:
        await push_blob(s, cdn_registry.url, img.repo, token_registry.seeded.blobs[digest])
    cdn = await make_tap(cdn_registry.url)  # type: ignore[operator]
    front = await make_tap(token_registry.url)  # type: ignore[operator]
    front.redirect_blobs_to(cdn.url.replace("127.0.0.1", "localhost"))
    edge = await edge_factory(front.url, auth="anonymous", token_realm_hosts=[realm_host(token_server)])
    async with http.get(f"{edge.url}/v2/{img.repo}/manifests/{img.tag}", headers={"Accept": CONTAINERD_ACCEPT}) as r:
        assert r.status == 200  # edgecache now holds a token for this repository
    async with http.get(f"{edge.url}/v2/{img.repo}/blobs/{digest}") as r:
        assert r.status == 200
        assert hashlib.sha256(await r.read()).hexdigest() == digest[7:]
    assert any(rec.has_auth for rec in front.find("GET", "blob"))  # the registry host got the token
    assert cdn.count("GET", "blob") >= 1
    assert not any(rec.has_auth for rec in cdn.find())  # the other host never did


async def test_anonymous_token_flow(edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess,
                                    token_server: TokenServer, http: aiohttp.ClientSession) -> None:
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, auth="anonymous", token_realm_hosts=[realm_host(token_server)])
    img = token_registry.seeded.public
    async with http.get(f"{edge.url}/v2/{img.repo}/manifests/{img.tag}", headers={"Accept": CONTAINERD_ACCEPT}) as r:
        assert r.status == 200 and await r.read() == img.manifest
    for digest in (img.config_digest, *img.layer_digests):
        async with http.get(f"{edge.url}/v2/{img.repo}/blobs/{digest}") as r:
            assert r.status == 200
            assert hashlib.sha256(await r.read()).hexdigest() == digest[7:]
    # one token for the repository scope, reused for every request after it
    assert tap.count(status=401) == 1


async def test_manifest_over_4_mib_is_refused(edge_factory: EdgeFactory, tap: Tap, http: aiohttp.ClientSession) -> None:
    edge = await edge_factory(tap.url)
    huge = b'{"schemaVersion":2,"padding":"' + b"x" * (4 * 1024 * 1024) + b'"}'
    tap.status_next("manifest", 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, body=huge)
    async with http.get(f"{edge.url}/v2/library/multi/manifests/huge", headers={"Accept": CONTAINERD_ACCEPT}) as r:
        assert r.status == 413
        assert (await r.json())["errors"][0]["code"] == "SIZE_INVALID"
    store = edge.app[__import__("edgecache.app", fromlist=["STATE"]).STATE].store
    assert store is not None and not any(p.stat().st_size > 4 * 1024 * 1024 for p in store.blobs.rglob("*") if p.is_file())


async def test_the_app_served_by_aiohttps_own_runner_still_answers_through_the_edge(
        tmp_path: Path, tap: Tap, http: aiohttp.ClientSession) -> None:
    """edgecache serves through EdgeRunner; an app handed to aiohttp's AppRunner must not answer bare 404s."""
    app = create_app(make_config(tmp_path / "cache", tap.url))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with http.get(f"{url}/v2/") as r:
            assert r.status == 200 and r.headers["X-Request-Id"] and r.headers["X-Cache"] == "MISS"
        async with http.get(f"{url}/nope") as r:
            assert r.status == 404 and r.headers["X-Request-Id"]
            assert (await r.json())["errors"][0]["code"] == "NOT_FOUND"
        async with http.get(f"{url}/metrics") as r:
            assert r.status == 200 and 'route="unmatched"' in await r.text()
    finally:
        await runner.cleanup()
