"""Prove the support fixtures work against the real distribution 2.8 registry."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import RegistryFactory, TapFactory
from tests.support.registry import RegistryProcess
from tests.support.seed import (Image, DOCKER_MANIFEST, MANIFEST_ACCEPT, basic_auth_header, OCI_INDEX, OCI_MANIFEST, Seeded, fetch_token,
                                move_tag, push_image, sha256)
from tests.support.tap import Tap
from tests.support.token_server import TokenServer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def seeded(registry: RegistryProcess) -> Seeded:
    assert isinstance(registry.seeded, Seeded)
    return registry.seeded


async def test_registry_serves_seeded_index(registry: RegistryProcess, session: aiohttp.ClientSession) -> None:
    s = seeded(registry)
    for tag in ("v1", "latest"):
        async with session.get(f"{registry.url}/v2/library/multi/manifests/{tag}",
                               headers={"Accept": MANIFEST_ACCEPT}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == OCI_INDEX
            assert r.headers["Docker-Content-Digest"] == s.index_digest
            assert await r.read() == s.index_bytes
    async with session.get(f"{registry.url}/v2/library/multi/manifests/{s.artifact_digest}",
                           headers={"Accept": MANIFEST_ACCEPT}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == OCI_MANIFEST
        assert await r.read() == s.artifact_bytes  # artifactType/subject kept byte-for-byte
    async with session.get(f"{registry.url}/v2/library/schema2/manifests/v1",
                           headers={"Accept": MANIFEST_ACCEPT}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == DOCKER_MANIFEST
    async with session.get(f"{registry.url}/v2/library/multi/blobs/{s.empty_digest}") as r:
        assert r.status == 200 and await r.read() == b""
    async with session.get(f"{registry.url}/v2/team/big/blobs/{s.big_layer_digest}") as r:
        body = await r.read()
        assert len(body) > 8 * 1024 * 1024 and sha256(body) == s.big_layer_digest
    for arch in ("amd64", "arm64"):
        for d in (*s.layers[arch], s.configs[arch]):
            assert sha256(s.blobs[d]) == d


async def test_tap_counts_and_passes_through(tap: Tap, registry: RegistryProcess,
                                             session: aiohttp.ClientSession) -> None:
    s = seeded(registry)
    layer = s.layers["amd64"][0]
    async with session.get(f"{tap.url}/v2/") as r:
        assert r.status == 200
    async with session.head(f"{tap.url}/v2/library/multi/blobs/{layer}") as r:
        assert r.status == 200 and r.content_length == len(s.blobs[layer])
    async with session.get(f"{tap.url}/v2/library/multi/blobs/{layer}") as r:
        assert await r.read() == s.blobs[layer]
    async with session.get(f"{tap.url}/v2/library/multi/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}) as r:
        assert await r.read() == s.index_bytes
    assert tap.count(kind="ping") == 1
    assert tap.count("GET", "blob", layer) == 1 and tap.count("HEAD", "blob") == 1
    assert tap.count(kind="manifest") == 1
    # a push through the tap: upload Location is rewritten to the tap, so the PUT comes back here too
    img = await push_image(session, tap.url, "library/viatap", "v1", salt="tap")
    assert tap.count("PUT", "upload") == 2 and tap.count("PUT", "manifest") == 1
    async with session.get(f"{registry.url}/v2/library/viatap/manifests/v1", headers={"Accept": OCI_MANIFEST}) as r:
        assert r.headers["Docker-Content-Digest"] == img.digest


async def test_tap_corrupts_and_cuts(tap: Tap, registry: RegistryProcess, session: aiohttp.ClientSession) -> None:
    s = seeded(registry)
    d = s.big_layer_digest
    url = f"{tap.url}/v2/team/big/blobs/{d}"
    tap.corrupt_next_blob(d)
    async with session.get(url) as r:
        body = await r.read()
    assert len(body) == len(s.blobs[d]) and body != s.blobs[d]
    assert sum(a != b for a, b in zip(body, s.blobs[d])) == 1
    tap.cut_next_blob(d, after_bytes=100_000)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(url) as r:
            assert r.content_length == len(s.blobs[d])
            await r.read()
    async with session.get(url) as r:  # one-shot faults: next one is clean
        assert hashlib.sha256(await r.read()).hexdigest() == d.split(":")[1]
    assert [rec.fault for rec in tap.find("GET", "blob", d)] == ["corrupt", "cut", None]


async def test_tap_status_hold_and_down(tap: Tap, registry: RegistryProcess, session: aiohttp.ClientSession) -> None:
    s = seeded(registry)
    tap.status_next("manifest", 429, {"Retry-After": "1"})
    async with session.get(f"{tap.url}/v2/library/multi/manifests/v1") as r:
        assert r.status == 429 and r.headers["Retry-After"] == "1"
    gate = tap.hold_first("manifest")
    task = asyncio.create_task(session.get(f"{tap.url}/v2/library/multi/manifests/v1",
                                           headers={"Accept": MANIFEST_ACCEPT}))
    await tap.wait_requests(2, kind="manifest")
    await gate.wait_held(1)
    assert not task.done()
    gate.release()
    async with await task as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == s.index_digest
    tap.set_down()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with session.get(f"{tap.url}/v2/"):
            pass
    tap.set_down(False)


async def test_tap_redirect_drops_auth_cross_host(make_tap: TapFactory, registry: RegistryProcess,
                                                  session: aiohttp.ClientSession) -> None:
    s = seeded(registry)
    front, blobstore = await make_tap(registry.url), await make_tap(registry.url)
    front.redirect_blobs_to(f"http://localhost:{blobstore.port}")
    layer = s.layers["arm64"][0]
    async with session.get(f"{front.url}/v2/library/multi/blobs/{layer}",
                           headers={"Authorization": "Bearer secret"}) as r:
        assert r.status == 200 and await r.read() == s.blobs[layer]
    assert front.find("GET", "blob")[0].status == 307 and front.find("GET", "blob")[0].has_auth
    assert blobstore.count("GET", "blob", layer) == 1
    assert not blobstore.find("GET", "blob")[0].has_auth


async def test_token_registry_policy(token_registry: RegistryProcess, token_server: TokenServer,
                                     session: aiohttp.ClientSession) -> None:
    seeded_auth = token_registry.seeded
    url = token_registry.url
    manifest = f"{url}/v2/private/app/manifests/v1"
    async with session.get(manifest, headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 401 and 'scope="repository:private/app:pull"' in r.headers["WWW-Authenticate"]
    for user, pw, ok in [(None, None, False), ("mallory", "mallorypw", False), ("alice", "alicepw", True),
                         ("bob", "bobpw", True)]:
        tok = await fetch_token(session, url, "repository:private/app:pull", user, pw)
        async with session.get(manifest, headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {tok}"}) as r:
            assert (r.status == 200) == ok, (user, r.status)
            if ok:
                assert r.headers["Docker-Content-Digest"] == seeded_auth.private.digest
    anon = await fetch_token(session, url, "repository:public/app:pull")
    async with session.get(f"{url}/v2/public/app/manifests/v1",
                           headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {anon}"}) as r:
        assert r.status == 200 and r.headers["Docker-Content-Digest"] == seeded_auth.public.digest
    async with session.get(token_server.realm, params={"service": token_server.service},
                           headers=basic_auth_header("alice", "wrong")) as r:
        assert r.status == 401
    users = [(q.username, q.has_basic, q.status) for q in token_server.requests if q.method == "GET"]
    assert ("alice", True, 200) in users and (None, False, 200) in users and ("alice", True, 401) in users


async def test_token_post_grant(token_registry: RegistryProcess, token_server: TokenServer,
                                session: aiohttp.ClientSession) -> None:
    form = {"grant_type": "password", "username": "bob", "password": "bobpw", "service": token_server.service,
            "scope": "repository:private/app:pull", "client_id": "edgecache-tests", "access_type": "offline"}
    async with session.post(token_server.realm, data=form) as r:
        assert r.status == 200
        body = await r.json()
    assert body["expires_in"] == 300 and body["token"] == body["access_token"] and body["refresh_token"]
    async with session.get(f"{token_registry.url}/v2/private/app/manifests/v1",
                           headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {body['access_token']}"}) as r:
        assert r.status == 200
    async with session.post(token_server.realm, data={**form, "password": "nope"}) as r:
        assert r.status == 401
    async with session.post(token_server.realm, data={"grant_type": "refresh_token", "service": token_server.service,
                                                      "refresh_token": body["refresh_token"],
                                                      "scope": "repository:private/app:pull"}) as r:
        assert r.status == 200
    assert [q.status for q in token_server.requests if q.method == "POST"][-3:] == [200, 401, 200]


async def test_restart_keeps_content_and_move_tag(registry_factory: RegistryFactory,
                                                  session: aiohttp.ClientSession) -> None:
    reg = registry_factory()
    first = await push_image(session, reg.url, "library/moving", "v1")
    reg.restart()
    await session.close()  # pooled keep-alive connections died with the old process
    async with aiohttp.ClientSession() as fresh:
        await check_moved(fresh, reg, first)


async def check_moved(session: aiohttp.ClientSession, reg: RegistryProcess, first: Image) -> None:
    second = await move_tag(session, reg.url, "library/moving", "v1", salt="moved")
    assert first.digest != second.digest
    async with session.head(f"{reg.url}/v2/library/moving/manifests/v1", headers={"Accept": OCI_MANIFEST}) as r:
        assert r.headers["Docker-Content-Digest"] == second.digest
    async with session.head(f"{reg.url}/v2/library/moving/manifests/{first.digest}",
                            headers={"Accept": OCI_MANIFEST}) as r:
        assert r.status == 200
