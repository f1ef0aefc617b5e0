"""Scale-out: tiered caches, passthrough through two tiers, the consistent-hash LB, Redis-shared tags.

Everything runs on 127.0.0.1 against the real registries of the root conftest:

* node tier -> regional tier -> origin (in-process edgecache instances, ``upstream_ns``);
* credential passthrough through both tiers against the token-auth registry;
* three regional edgecache *processes* behind real nginx running deploy/nginx/regional-lb.conf
  (only its addresses rewritten), two node instances in front of it;
* two instances sharing tag->digest answers through a real ``redis-server``.

Counts come from taps (counting proxies) and from each instance's own metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgecache.app import METRICS, STATE
from tests.support.edge import Edge, EdgeFactory, EdgeProcess, make_config, start_edge, wait_ready
from tests.support.nginx import NginxLB
from tests.support.registry import RegistryProcess, free_port
from tests.support.seed import MANIFEST_ACCEPT, move_tag, parse_bearer_challenge, push_blob, push_image, sha256
from tests.support.token_server import TokenServer

ACCEPT = {"Accept": MANIFEST_ACCEPT}
REDIS_BIN = "/usr/bin/redis-server"


# -- helpers ---------------------------------------------------------------------------------------------------
def hit_count(edge: Edge, outcome: str = "hit") -> float:
    """``edgecache_cache_outcomes_total{outcome=...}`` of an in-process instance (as a scrape sees it)."""
    edge.app[METRICS].flush()
    value = edge.app[METRICS].registry.get_sample_value("edgecache_cache_outcomes_total", {"outcome": outcome})
    return value or 0.0


def upstream_request_count(edge: Edge) -> float:
    """Sum of ``edgecache_upstream_requests_total`` over every label set."""
    total = 0.0
    for family in edge.app[METRICS].registry.collect():
        if family.name == "edgecache_upstream_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def token_requests(edge: Edge, status: str) -> float:
    """Requests answered by an instance's own token endpoint (passthrough relay) with ``status``."""
    edge.app[METRICS].flush()
    value = edge.app[METRICS].registry.get_sample_value(
        "edgecache_requests_total", {"route": "/_edgecache/token/{upstream}", "method": "GET", "status": status})
    return value or 0.0


async def get(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """GET -> (status, body, X-Cache)."""
    async with http.get(url, headers=headers or {}) as r:
        return r.status, await r.read(), r.headers.get("X-Cache", "")


async def pull_multi(http: aiohttp.ClientSession, base: str, seeded: Any) -> dict[str, str]:
    """Pull library/multi:v1 for amd64 (index by tag, manifest by digest, config + layers); returns ref -> X-Cache.

    Every body is checked against its digest and against what the seeder pushed.
    """
    outcomes: dict[str, str] = {}
    status, body, xc = await get(http, f"{base}/v2/library/multi/manifests/v1", ACCEPT)
    assert status == 200, body[:300]
    assert sha256(body) == seeded.index_digest and body == seeded.index_bytes
    outcomes["v1"] = xc
    index = orjson.loads(body)
    (desc,) = [m for m in index["manifests"] if m["platform"]["architecture"] == "amd64"]
    status, body, xc = await get(http, f"{base}/v2/library/multi/manifests/{desc['digest']}", ACCEPT)
    assert status == 200, body[:300]
    assert sha256(body) == desc["digest"] == seeded.manifests["amd64"][0]
    outcomes[desc["digest"]] = xc
    manifest = orjson.loads(body)
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    assert digests == [seeded.configs["amd64"], *seeded.layers["amd64"]]
    for d in digests:
        status, blob, xc = await get(http, f"{base}/v2/library/multi/blobs/{d}")
        assert status == 200, blob[:300]
        assert hashlib.sha256(blob).hexdigest() == d[7:] and blob == seeded.blobs[d]
        outcomes[d] = xc
    return outcomes


class DockerClient:
    """A registry client that answers Bearer challenges with its own credentials (or none).

    (As in test_auth.py: take the 401's challenge, GET a token from its realm with Basic auth, retry.)
    """

    def __init__(self, http: aiohttp.ClientSession, user: str | None = None, password: str | None = None) -> None:
        self.http, self.user, self.password = http, user, password
        self.token: str | None = None
        self.realms: list[str] = []

    async def get(self, url: str, method: str = "GET",
                  headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        for attempt in range(2):
            h = dict(headers or {})
            if self.token:
                h["Authorization"] = f"Bearer {self.token}"
            async with self.http.request(method, url, headers=h) as r:
                body = await r.read()
                status, resp_headers = r.status, dict(r.headers)
            if status != 401 or attempt > 0:
                return status, body, resp_headers
            challenge = parse_bearer_challenge(resp_headers.get("WWW-Authenticate", ""))
            if not challenge:
                return status, body, resp_headers
            await self._fetch_token(challenge)
        return status, body, resp_headers

    async def _fetch_token(self, challenge: dict[str, str]) -> None:
        self.realms.append(challenge["realm"])
        params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
        basic = {}
        if self.user is not None:
            basic = {"Authorization": "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()}
        async with self.http.get(challenge["realm"], params=params, headers=basic) as r:
            doc = await r.json(content_type=None)
            self.token = (doc.get("token") or doc.get("access_token")) if r.status == 200 else "refused"


# -- 1. node tier -> regional tier -> origin ----------------------------------------------------------------------
async def test_two_tier_chain_second_node_is_served_by_the_regional_tier(
        edge_factory: EdgeFactory, make_tap: Any, registry: RegistryProcess) -> None:
    seeded = registry.seeded
    tap_o = await make_tap(registry.url)                      # origin <- tapO
    regional = await edge_factory(tap_o.url, name="origin")   # routes ns=<tapO host> to the origin
    tap_a, tap_b = await make_tap(regional.url), await make_tap(regional.url)
    node_a = await edge_factory(tap_a.url, name="regional", upstream_ns=tap_o.host)
    node_b = await edge_factory(tap_b.url, name="regional", upstream_ns=tap_o.host)
    blobs = [seeded.configs["amd64"], *seeded.layers["amd64"]]
    amd64 = seeded.manifests["amd64"][0]

    async with aiohttp.ClientSession(auto_decompress=False) as http:
        first = await pull_multi(http, node_a.url, seeded)
        assert set(first.values()) == {"MISS"}, first
        # A's pull reached the origin once per object, through the regional tier
        assert tap_o.count("GET", "manifest", "v1") == 1
        assert tap_o.count("GET", "manifest", amd64) == 1
        for d in blobs:
            assert tap_o.count("GET", "blob", d) == 1, d
        origin_before = len(tap_o.records)
        regional_hits_before = hit_count(regional)
        regional_upstream_before = upstream_request_count(regional)

        second = await pull_multi(http, node_b.url, seeded)

    # B had nothing: every answer was a MISS at B ...
    assert set(second.values()) == {"MISS"}, second
    # ... and the regional tier answered all of them from its cache: the origin saw nothing new
    assert len(tap_o.records) == origin_before, [(r.method, r.path) for r in tap_o.records[origin_before:]]
    assert upstream_request_count(regional) == regional_upstream_before
    assert hit_count(regional) - regional_hits_before == 2 + len(blobs)  # tag, manifest, config + layers
    # B asked the regional tier exactly once per object, always with ns=<origin namespace>
    assert tap_b.count("GET", "manifest", "v1") == 1
    assert tap_b.count("GET", "manifest", amd64) == 1
    for d in blobs:
        assert tap_b.count("GET", "blob", d) == 1, d
        assert tap_b.count("GET", "blob", d, status=200) == 1
    assert tap_b.records and all(r.query == f"ns={tap_o.host}" for r in tap_b.records), \
        [(r.path, r.query) for r in tap_b.records]
    # node B now holds the content itself
    for d in blobs:
        assert (Path(node_b.config.cache.dir) / "blobs" / "sha256" / d[7:9] / d[7:]).is_file()


# -- 2. credential passthrough through both tiers -------------------------------------------------------------------
def realm_host(ts: TokenServer) -> str:
    return ts.realm.split("://", 1)[1].split("/", 1)[0]


async def test_passthrough_through_both_tiers(edge_factory: EdgeFactory, make_tap: Any,
                                              token_registry: RegistryProcess, token_server: TokenServer) -> None:
    img = token_registry.seeded.private
    tap_o = await make_tap(token_registry.url)
    regional = await edge_factory(tap_o.url, name="origin", auth="passthrough",
                                  token_realm_hosts=[realm_host(token_server)], access_ttl="1m")
    tap_r = await make_tap(regional.url)
    # The regional tier's realm names its own host (not the tap's): listed as an extra http realm host.
    node = await edge_factory(tap_r.url, name="regional", auth="passthrough", upstream_ns=tap_o.host,
                              token_realm_hosts=[regional.host], access_ttl="1m")
    token_server.clear()
    paths = {"tag": f"/v2/{img.repo}/manifests/v1", "manifest": f"/v2/{img.repo}/manifests/{img.digest}",
             **{d: f"/v2/{img.repo}/blobs/{d}" for d in (img.config_digest, *img.layer_digests)}}

    async with aiohttp.ClientSession(auto_decompress=False) as http:
        # The node challenges with its own token endpoint.
        async with http.get(node.url + "/v2/") as r:
            assert r.status == 401
            assert parse_bearer_challenge(r.headers["WWW-Authenticate"])["realm"] == \
                f"{node.url}/_edgecache/token/regional"

        alice = DockerClient(http, "alice", "alicepw")
        status, body, headers = await alice.get(node.url + paths["tag"], headers=ACCEPT)
        assert status == 200, body[:300]
        assert body == img.manifest and headers["Docker-Content-Digest"] == img.digest
        for d in (img.config_digest, *img.layer_digests):
            status, blob, _ = await alice.get(node.url + paths[d])
            assert status == 200, blob[:300]
            assert hashlib.sha256(blob).hexdigest() == d[7:] and blob == img.blobs[d]
        assert alice.realms == [f"{node.url}/_edgecache/token/regional"]
        # alice's credentials travelled node -> regional token endpoint -> origin token server
        assert any(r.username == "alice" and r.status == 200 for r in token_server.requests)
        # (the regional realm names the regional's own host, so the relay goes there directly, not via tap_r)
        assert token_requests(regional, "200") >= 1
        # the origin served the private content to alice's token, relayed through both tiers
        assert tap_o.count("GET", "manifest", "v1", status=200) == 1
        for d in (img.config_digest, *img.layer_digests):
            assert tap_o.count("GET", "blob", d, status=200) == 1

        # Now cached in both tiers: anonymous and wrong credentials still get nothing.
        for who in (DockerClient(http), DockerClient(http, "mallory", "mallorypw"),
                    DockerClient(http, "alice", "wrong")):
            for path in paths.values():
                for method in ("GET", "HEAD"):
                    status, body, _ = await who.get(node.url + path, method=method, headers=ACCEPT)
                    assert status in (401, 403), (who.user, method, path, status)
                    assert img.manifest not in body
                    assert not any(content and content in body for content in img.blobs.values())

        # bob is allowed upstream: served from the caches (no blob GET reaches the origin again).
        tap_o.reset()
        bob = DockerClient(http, "bob", "bobpw")
        for path in paths.values():
            status, body, _ = await bob.get(node.url + path, headers=ACCEPT)
            assert status == 200, (path, status, body[:200])
    assert tap_o.count("GET", "blob") == 0


# -- 3. three regional processes behind nginx ---------------------------------------------------------------------
def regional_toml(port: int, cache_dir: Path, origin_url: str, origin_ns: str) -> str:
    return f"""version = 1

[server]
listen = "127.0.0.1:{port}"
workers = 1
shutdown_timeout = "5s"
access_log = false

[cache]
dir = "{cache_dir}"
max_size = "1GiB"

[upstreams.origin]
url = "{origin_url}"
namespaces = ["{origin_ns}", "docker.io"]
default = false
auth = "anonymous"
retries = 1
connect_timeout = "2s"
read_timeout = "10s"
"""


def owners(cache_dirs: list[Path], digest: str) -> list[int]:
    hexd = digest.split(":", 1)[1]
    return [i for i, d in enumerate(cache_dirs) if (d / "blobs" / "sha256" / hexd[:2] / hexd).is_file()]


@pytest.mark.slow
async def test_regional_tier_behind_nginx_fetches_and_stores_each_blob_once(
        tmp_path: Path, edge_factory: EdgeFactory, make_tap: Any, registry: RegistryProcess) -> None:
    seeded = registry.seeded
    tap_o = await make_tap(registry.url)

    # Extra small blobs so there are enough keys for the ring to spread.
    extra_repo = f"scale/lb-{uuid.uuid4().hex[:8]}"
    rnd = random.Random(42)
    wanted: list[tuple[str, str]] = []  # (repo, digest)
    content: dict[str, bytes] = dict(seeded.blobs)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for i in range(10):
            data = rnd.randbytes(1000 + 97 * i) + uuid.uuid4().bytes
            d = await push_blob(s, registry.url, extra_repo, data)
            content[d] = data
            wanted.append((extra_repo, d))
    for img in seeded.images.values():
        wanted += [(img.repo, d) for d in (img.config_digest, *img.layer_digests)]
    digests = {d for _, d in wanted}
    assert len(digests) == len(wanted) >= 18

    ports = [free_port() for _ in range(3)]
    cache_dirs = [tmp_path / f"regional{i}" for i in range(3)]
    procs: list[EdgeProcess] = []
    lb = NginxLB(tmp_path / "lb", ports)
    try:
        for i, port in enumerate(ports):
            cfg = tmp_path / f"regional{i}.toml"
            cfg.write_text(regional_toml(port, cache_dirs[i], tap_o.url, tap_o.host))
            p = EdgeProcess(cfg, tmp_path / f"regional{i}.log")
            p.start_nowait()
            procs.append(p)
        await asyncio.gather(*(asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}", 30.0, p.proc)
                               for port, p in zip(ports, procs)))
        await asyncio.to_thread(lb.start)

        # Node A sends ns= itself (upstream_ns) to the main entry; node B uses the per-origin
        # entry that adds ns=docker.io (deploy's edgecache-tiered.toml). Both reach the same origin;
        # the regional tier has no default upstream, so a request without ns= would be refused.
        node_a = await edge_factory(lb.url, name="regional", upstream_ns=tap_o.host)
        node_b = await edge_factory(lb.origin_url("docker.io"), name="regional")

        async with aiohttp.ClientSession(auto_decompress=False) as http:
            some = wanted[0]
            status, _, _ = await get(http, f"{lb.url}/v2/{some[0]}/blobs/{some[1]}")
            assert status == 404  # no ns=, no prefix, no default upstream: NAME_UNKNOWN, nothing dialled
            assert tap_o.count() == 0

            async def fetch(node: Edge, repo: str, d: str) -> str:
                status, body, xc = await get(http, f"{node.url}/v2/{repo}/blobs/{d}")
                assert status == 200, (node.url, repo, d, body[:300])
                assert hashlib.sha256(body).hexdigest() == d[7:] and body == content[d]
                return xc

            for node in (node_a, node_b):
                outcomes = await asyncio.gather(*(fetch(node, repo, d) for repo, d in wanted))
                assert set(outcomes) == {"MISS"}, outcomes  # each node's first time
            # a tag through both entries: hashed by $uri, one owner, one origin request
            for node in (node_a, node_b):
                status, body, _ = await get(http, f"{node.url}/v2/library/multi/manifests/v1", ACCEPT)
                assert status == 200 and sha256(body) == seeded.index_digest

        # The origin saw each blob exactly once, although 2 nodes x 3 regional instances asked.
        for d in digests:
            assert tap_o.count("GET", "blob", d) == 1, (d, [(r.method, r.path) for r in tap_o.find(digest=d)])
        assert tap_o.count("GET", "blob") == len(digests)
        assert tap_o.count("GET", "manifest", "v1") == 1

        # Each blob lives on exactly one regional instance, and it is the one nginx routed it to.
        by_key: dict[str, set[str]] = {}
        for line in lb.access_lines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f and f.split("=", 1)[0] in
                          ("key", "upstream"))
            if "key" in fields and "upstream" in fields:
                by_key.setdefault(fields["key"], set()).add(fields["upstream"])
        placement: dict[int, int] = {}
        for d in digests:
            where = owners(cache_dirs, d)
            assert len(where) == 1, (d, where)
            assert by_key.get(d) == {f"127.0.0.1:{ports[where[0]]}"}, (d, by_key.get(d))
            placement[where[0]] = placement.get(where[0], 0) + 1
        assert len(placement) >= 2, placement  # the ring spreads the keys over the instances
        # Both nodes hold every blob themselves.
        for node in (node_a, node_b):
            assert all(owners([Path(node.config.cache.dir)], d) == [0] for d in digests)
    finally:
        lb.stop()
        for p in procs:
            await asyncio.to_thread(p.stop)


# -- 4. Redis-shared tag state -------------------------------------------------------------------------------------
def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    log = open(workdir / "redis.log", "wb")
    proc = subprocess.Popen([REDIS_BIN, "--save", "", "--appendonly", "no", "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(workdir)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while not _redis_ping(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {(workdir / 'redis.log').read_text()}")
            if time.monotonic() > end:
                raise TimeoutError("redis-server not ready after 10s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
async def edges() -> AsyncIterator[list[Edge]]:
    started: list[Edge] = []
    yield started
    for e in reversed(started):
        await e.stop()


async def shared_tag_digests(redis_url: str, repo: str, tag: str = "v1") -> list[str]:
    """Digests of the Redis tag entries for ``repo:tag`` (keys ``edgecache:...t|<upstream>|<repo>|<tag>|<accept>``)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)  # type: ignore[no-untyped-call]
    try:
        keys = sorted(await client.keys(f"edgecache:*t|origin|{repo}|{tag}|*"))
        return [orjson.loads(await client.get(k))["digest"] for k in keys]
    finally:
        await client.aclose()


async def moving_tag_scenario(tmp_path: Path, make_tap: Any, registry: RegistryProcess, edges: list[Edge],
                              redis: str | None) -> dict[str, Any]:
    """A and B resolve repo:v1; the tag moves upstream; A's clock passes the TTL and A revalidates; then B answers.

    Returns what B answered at the end and what B sent upstream for it.
    """
    repo = f"scale/moving-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        old = await push_image(s, registry.url, repo, "v1", salt="old")
    tap_a, tap_b = await make_tap(registry.url), await make_tap(registry.url)
    for name, tap in (("a", tap_a), ("b", tap_b)):
        cfg = make_config(tmp_path / f"cache-{name}", tap.url, name="origin", tag_ttl="5m")
        edges.append(await start_edge(cfg.replace(redis_url=redis)))
    a, b = edges[-2], edges[-1]
    url = f"/v2/{repo}/manifests/v1"

    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for edge in (a, b):
            status, body, _ = await get(http, edge.url + url, ACCEPT)
            assert status == 200 and sha256(body) == old.digest
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            new = await move_tag(s, registry.url, repo, "v1", salt="new")
        assert new.digest != old.digest

        # Within the TTL both still answer the old digest without asking upstream.
        tap_a.reset()
        tap_b.reset()
        for edge in (a, b):
            status, body, xc = await get(http, edge.url + url, ACCEPT)
            assert (status, sha256(body), xc) == (200, old.digest, "HIT")
        assert tap_a.count() == tap_b.count() == 0

        # A's clock passes the TTL: A revalidates upstream and learns the new digest.
        policy = a.app[STATE].policy
        assert policy is not None
        policy.clock = lambda: time.time() + 3600
        status, body, _ = await get(http, a.url + url, ACCEPT)
        assert status == 200 and sha256(body) == new.digest and body == new.manifest
        assert tap_a.count(kind="manifest", digest="v1") >= 1
        shared = await shared_tag_digests(redis, repo) if redis else None

        # B's clock is not advanced: the tag entry it sees is fresh.
        tap_b.reset()
        status, body, xc = await get(http, b.url + url, ACCEPT)
        assert status == 200
    return {"old": old, "new": new, "digest": sha256(body), "body": body, "x_cache": xc, "shared_after_a": shared,
            "tag_requests": [(r.method, r.path) for r in tap_b.find(kind="manifest", digest="v1")],
            "requests": [(r.method, r.path) for r in tap_b.records], "repo": repo}


# aiocache 0.12's Redis backend calls redis-py's deprecated ``close()`` when edgecache shuts down (see report).
@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
async def test_redis_shared_tags_make_instances_agree(tmp_path: Path, make_tap: Any, registry: RegistryProcess,
                                                       edges: list[Edge], redis_url: str) -> None:
    got = await moving_tag_scenario(tmp_path, make_tap, registry, edges, redis_url)
    new = got["new"]
    # A's revalidation put the new answer in Redis (one entry for repo:v1), where B finds it ...
    assert got["shared_after_a"] == [new.digest]
    # ... so B answers the digest A learnt, although B's own clock says its old answer is fresh ...
    assert got["digest"] == new.digest and got["body"] == new.manifest, got["requests"]
    # ... without asking upstream for the tag (the manifest bytes it lacks are content-addressed).
    assert got["tag_requests"] == [], got["requests"]
    assert set(got["requests"]) <= {("GET", f"/v2/{got['repo']}/manifests/{new.digest}")}, got["requests"]


async def test_without_redis_instances_disagree(tmp_path: Path, make_tap: Any, registry: RegistryProcess,
                                                edges: list[Edge]) -> None:
    """The control for the Redis test: per-process tag state, B keeps its own (old) answer within its TTL."""
    got = await moving_tag_scenario(tmp_path, make_tap, registry, edges, None)
    assert got["digest"] == got["old"].digest != got["new"].digest
    assert got["x_cache"] == "HIT" and got["requests"] == []


@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
async def test_purge_command_reaches_redis_shared_tags(tmp_path: Path, tap: Any, registry: RegistryProcess,
                                                       edges: list[Edge], redis_url: str) -> None:
    """With Redis-shared tags the tag lives only in Redis: ``edgecache purge`` must delete it there."""
    import sys

    from tests.support.edge import run

    repo = f"scale/pinned-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        old = await push_image(s, registry.url, repo, "release-1", salt="old")
    cache = tmp_path / "cache"
    cfg = make_config(cache, tap.url, name="origin", tag_ttl="1h", pinned_tags=[f"{repo}:release-*"])
    edges.append(await start_edge(cfg.replace(redis_url=redis_url)))
    edge = edges[-1]
    url = f"{edge.url}/v2/{repo}/manifests/release-1"
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        assert sha256((await get(http, url, ACCEPT))[1]) == old.digest
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            new = await move_tag(s, registry.url, repo, "release-1", salt="new")
        assert sha256((await get(http, url, ACCEPT))[1]) == old.digest  # pinned
        assert await shared_tag_digests(redis_url, repo, "release-1") == [old.digest]
        admin = tmp_path / "admin.toml"
        admin.write_text(f'version = 1\n[cache]\ndir = "{cache}"\n[redis]\nurl = "{redis_url}"\n')
        code, out = await run(sys.executable, "-m", "edgecache", "purge", "--config", str(admin),
                              "--tag", f"origin/{repo}:release-1")
        assert code == 0, out
        assert await shared_tag_digests(redis_url, repo, "release-1") == []  # gone from Redis, where instances read it
        deadline = time.monotonic() + 15  # replayed answers last a second; the purge counter is read every 2 s
        while sha256((await get(http, url, ACCEPT))[1]) != new.digest:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_a_pinned_tag_is_pinned_once_in_redis(tmp_path: Path, tap: Any, edges: list[Edge], redis_url: str) -> None:
    """Two instances sharing Redis tags that both pin a tag they found absent: the first entry holds for both."""
    from edgecache.metadata import TagEntry

    held = []
    key = f"origin|scale/once-{uuid.uuid4().hex[:8]}|release-1|*/*"
    for i, digest in enumerate(("sha256:" + "1" * 64, "sha256:" + "2" * 64)):
        cfg = make_config(tmp_path / f"cache{i}", tap.url, name="origin", tag_ttl="1h")
        edges.append(await start_edge(cfg.replace(redis_url=redis_url)))
        metadata = edges[-1].app[STATE].metadata
        assert metadata is not None
        held.append(await metadata.add_tag(key, TagEntry(digest, "application/vnd.oci.image.manifest.v1+json", 10, 0.0)))
        assert (await metadata.get_tag(key)) == held[0]
    assert held[0].digest == held[1].digest == "sha256:" + "1" * 64
