"""Policy and replication: allow and deny rules, digest blocklist, pinned tags, scan gate, pre-warm lists."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from edgecache.app import METRICS, STATE
from edgecache.routes import CTX
from tests.support.edge import Edge, EdgeFactory, run
from tests.support.registry import RegistryProcess, free_port
from tests.support.seed import move_tag
from tests.support.tap import Tap

ACCEPT = {"Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.docker.distribution.manifest.v2+json"}


async def get(edge: Edge, path: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(edge.url + path, headers=ACCEPT) as r:
            body = await r.read()
            try:
                return r.status, orjson.loads(body), r.headers.get("Docker-Content-Digest", "")
            except orjson.JSONDecodeError:
                return r.status, body, r.headers.get("Docker-Content-Digest", "")


async def test_denied_repository_makes_no_upstream_request(edge_factory: EdgeFactory, tap: Tap) -> None:
    edge = await edge_factory(tap.url, deny=["team/*"])
    status, body, _ = await get(edge, "/v2/team/big/manifests/v1")
    assert status == 403 and isinstance(body, dict)
    assert body["errors"][0]["code"] == "DENIED" and "deny='team/*'" in body["errors"][0]["message"]
    status, _, _ = await get(edge, "/v2/library/multi/manifests/v1")
    assert status == 200
    assert tap.count(name="team/big") == 0
    allow_edge = await edge_factory(tap.url, allow=["library/*"])
    status, body, _ = await get(allow_edge, "/v2/team/big/blobs/sha256:" + "0" * 64)
    assert status == 403 and "allow list" in body["errors"][0]["message"]
    assert tap.count(name="team/big") == 0


async def test_blocked_digest_is_refused_even_when_cached(edge_factory: EdgeFactory, tap: Tap,
                                                          registry: RegistryProcess, tmp_path: Path) -> None:
    s = registry.seeded
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# nothing yet\n")
    edge = await edge_factory(tap.url, top={"policy": {"blocklist": str(blocklist)}})
    amd64 = s.manifests["amd64"][0]
    layer = s.layers["amd64"][0]
    for path in ("/v2/library/multi/manifests/v1", f"/v2/library/multi/manifests/{amd64}",
                 f"/v2/library/multi/blobs/{layer}"):
        for _ in range(2):  # a miss, then a hit (hit answers of manifests are replayed for a moment)
            assert (await get(edge, path))[0] == 200
    assert len(edge.app[CTX].router.answers) == 2  # the tag and the digest answers are memoised
    blocklist.write_text(f"{amd64}  # CVE-2099-0001\n{layer}\n")
    policy = edge.app[STATE].policy
    assert policy is not None
    policy.blocklist._checked = float("-inf")  # noqa: SLF001 - re-check now
    for path in (f"/v2/library/multi/manifests/{amd64}", f"/v2/library/multi/blobs/{layer}"):
        status, body, _ = await get(edge, path)
        assert status == 403 and body["errors"][0]["detail"]["rule"] == "blocklist"
    assert (await get(edge, "/v2/library/multi/manifests/v1"))[0] == 200  # the index itself is not blocked
    # blocking the index blocks the tag and every child manifest pulled through it
    blocklist.write_text(f"{s.index_digest}\n")
    policy.blocklist.reload()  # as SIGHUP does
    for path in ("/v2/library/multi/manifests/v1", f"/v2/library/multi/manifests/{amd64}",
                 f"/v2/library/multi/manifests/{s.manifests['arm64'][0]}"):
        status, _, _ = await get(edge, path)
        assert status == 403, path


async def test_pinned_tag_keeps_its_digest_until_purged(edge_factory: EdgeFactory, tap: Tap,
                                                        registry: RegistryProcess) -> None:
    edge = await edge_factory(tap.url, tag_ttl="1m", pinned_tags=["team/pinned:release-*"])
    offset = [0.0]
    policy = edge.app[STATE].policy
    assert policy is not None
    policy.clock = lambda: time.time() + offset[0]
    async with aiohttp.ClientSession() as s:
        first = (await move_tag(s, registry.url, "team/pinned", "release-1", salt="one")).digest
        await move_tag(s, registry.url, "team/pinned", "latest", salt="one")
    assert (await get(edge, "/v2/team/pinned/manifests/release-1"))[2] == first
    async with aiohttp.ClientSession() as s:
        second = (await move_tag(s, registry.url, "team/pinned", "release-1", salt="two")).digest
    offset[0] = 86400
    tap.reset()
    assert (await get(edge, "/v2/team/pinned/manifests/release-1"))[2] == first  # pinned: no revalidation
    assert tap.count(kind="manifest") == 0
    metadata = edge.app[STATE].metadata
    assert metadata is not None
    assert await metadata.purge("up|team/pinned|release-1|") >= 1  # what `edgecache purge --tag` does
    assert (await get(edge, "/v2/team/pinned/manifests/release-1"))[2] == second


async def test_two_processes_pinning_a_moving_tag_serve_one_digest(edge_factory: EdgeFactory, tap: Tap,
                                                                   registry: RegistryProcess, tmp_path: Path) -> None:
    """A pinned tag is never re-read once held. Two instances over one cache dir (two workers) that both
    found it absent, while it moved upstream between their fetches, must still settle on one digest:
    the first one pinned."""
    cache = tmp_path / "cache"
    first_edge = await edge_factory(tap.url, cache_dir=cache, tag_ttl="1m", pinned_tags=["team/race:release-*"])
    second_edge = await edge_factory(tap.url, cache_dir=cache, tag_ttl="1m", pinned_tags=["team/race:release-*"])
    async with aiohttp.ClientSession() as s:
        old = (await move_tag(s, registry.url, "team/race", "release-1", salt="old")).digest
    gate = tap.hold_first(kind="manifest")  # the first instance's fetch waits before reaching the upstream
    late = asyncio.create_task(get(first_edge, "/v2/team/race/manifests/release-1"))
    await gate.wait_held()
    assert (await get(second_edge, "/v2/team/race/manifests/release-1"))[2] == old  # pinned here first
    async with aiohttp.ClientSession() as s:
        new = (await move_tag(s, registry.url, "team/race", "release-1", salt="new")).digest
    gate.release()
    status, _, digest = await late
    assert status == 200 and digest == old  # fetched the new digest, but the tag was already pinned
    assert new != old and len(tap.find(kind="manifest", method="GET")) >= 2  # it really fetched the moved tag
    for edge in (first_edge, second_edge):
        assert (await get(edge, "/v2/team/race/manifests/release-1"))[2] == old


async def test_a_purge_by_the_command_reaches_a_running_instance(edge_factory: EdgeFactory, tap: Tap,
                                                                registry: RegistryProcess, tmp_path: Path) -> None:
    """``edgecache purge`` runs in its own process; a running instance must not keep the purged tag in memory."""
    cache = tmp_path / "cache"
    edge = await edge_factory(tap.url, cache_dir=cache, tag_ttl="1h", pinned_tags=["team/purged:release-*"])
    async with aiohttp.ClientSession() as s:
        first = (await move_tag(s, registry.url, "team/purged", "release-1", salt="one")).digest
    for _ in range(2):  # a miss, then a hit from memory (and replayed)
        assert (await get(edge, "/v2/team/purged/manifests/release-1"))[2] == first
    async with aiohttp.ClientSession() as s:
        second = (await move_tag(s, registry.url, "team/purged", "release-1", salt="two")).digest
    assert (await get(edge, "/v2/team/purged/manifests/release-1"))[2] == first  # pinned
    cfg = tmp_path / "admin.toml"
    cfg.write_text(f'version = 1\n[cache]\ndir = "{cache}"\n')
    code, out = await run(sys.executable, "-m", "edgecache", "purge", "--config", str(cfg),
                          "--tag", "up/team/purged:release-1")
    assert code == 0 and "purged 1 records" in out, out
    deadline = time.monotonic() + 15  # the instance looks at the index's purge counter every 2 s
    while (digest := (await get(edge, "/v2/team/purged/manifests/release-1"))[2]) != second:
        assert digest == first and time.monotonic() < deadline, digest
        await asyncio.sleep(0.1)


class FakeScanner:
    """Speaks the documented contract: POST {image, reference, digest, mediaType} -> {allow, reason}."""

    def __init__(self, blocked_repo: str) -> None:
        self.blocked_repo = blocked_repo
        self.calls: list[dict[str, Any]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.calls.append(doc)
        if doc["image"].endswith("/" + self.blocked_repo):
            return web.json_response({"allow": False, "reason": "CVE-2099-1234 (critical)"})
        return web.json_response({"allow": True, "reason": "clean"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/scan", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def scanner() -> AsyncIterator[FakeScanner]:
    s = FakeScanner("library/schema2")
    await s.start()
    yield s
    await s.stop()


async def test_scan_gate_blocks_and_allows_and_caches(edge_factory: EdgeFactory, tap: Tap, scanner: FakeScanner) -> None:
    edge = await edge_factory(tap.url, scanner_url=f"http://127.0.0.1:{scanner.port}/scan", scanner_ttl="1h")
    status, body, _ = await get(edge, "/v2/library/schema2/manifests/v1")
    assert status == 403 and "CVE-2099-1234" in body["errors"][0]["message"]
    assert body["errors"][0]["detail"]["rule"] == "scanner"
    for _ in range(3):
        assert (await get(edge, "/v2/library/multi/manifests/v1"))[0] == 200
    calls = [c for c in scanner.calls if c["image"].endswith("library/multi")]
    assert len(calls) == 1 and calls[0]["reference"] == "v1" and calls[0]["digest"].startswith("sha256:")
    assert set(calls[0]) == {"image", "reference", "digest", "mediaType"}


@pytest.mark.parametrize("fail_open", [True, False])
async def test_scanner_unreachable(edge_factory: EdgeFactory, tap: Tap, fail_open: bool) -> None:
    edge = await edge_factory(tap.url, scanner_url=f"http://127.0.0.1:{free_port()}/scan",
                              scanner_fail_open=fail_open, scanner_timeout="2s")
    status, body, _ = await get(edge, "/v2/library/multi/manifests/v1")
    if fail_open:
        assert status == 200
    else:
        assert status == 403 and "scanner unavailable" in body["errors"][0]["message"]


async def test_replication_list_prewarms(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                         tmp_path: Path) -> None:
    edge = await edge_factory(tap.url, top={"replicate": [
        {"upstream": "up", "image": "library/multi:v1", "platforms": ["linux/amd64"], "interval": "1h"}]})
    counter = edge.app[METRICS].warm_images.labels("ok")
    deadline = time.monotonic() + 20
    while counter._value.get() < 1:  # noqa: SLF001  (poll the metric with a deadline)
        assert time.monotonic() < deadline, "replication did not finish"
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as http:
        async with http.get(edge.url + "/metrics") as r:
            assert 'edgecache_replication_images_total{status="ok"} 1.0' in await r.text()
    gets = tap.count("GET", "blob")
    assert gets == 1 + len(registry.seeded.layers["amd64"])
    code, out = await run("skopeo", "copy", "--src-tls-verify=false", "--override-arch", "amd64", "--override-os",
                          "linux", f"docker://{edge.host}/library/multi:v1", f"oci:{tmp_path / 'layout'}:v1")
    assert code == 0, out
    assert tap.count("GET", "blob") == gets  # everything the copy needed was already there
