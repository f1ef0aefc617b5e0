"""Credential passthrough and tenancy against a real token-auth registry (issue: passthrough).

``DockerClient`` below does what Docker, containerd and skopeo do: take the
challenge from a 401, fetch a token from the realm it names (edgecache's own
token endpoint in passthrough mode), retry with the Bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
import uuid

import aiohttp
import orjson
import pytest

from edgecache.app import METRICS
from edgecache.routes import CTX
from tests.support.edge import Edge, EdgeFactory
from tests.support.registry import RegistryProcess
from tests.support.seed import parse_bearer_challenge, push_image, token_for_user
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}


def realm_host(ts: TokenServer) -> str:
    return ts.realm.split("://", 1)[1].split("/", 1)[0]


class DockerClient:
    """A registry client that answers Bearer challenges with its own credentials (or none)."""

    def __init__(self, http: aiohttp.ClientSession, user: str | None = None, password: str | None = None,
                 grant: str = "GET") -> None:
        self.http, self.user, self.password, self.grant = http, user, password, grant
        self.token: str | None = None
        self.tokens_seen: list[str] = []

    def _basic(self) -> dict[str, str]:
        if self.user is None:
            return {}
        raw = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    async def get(self, url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        for _ in range(2):
            h = dict(headers or {})
            if self.token:
                h["Authorization"] = f"Bearer {self.token}"
            async with self.http.request(method, url, headers=h) as r:
                body = await r.read()
                if r.status != 401 or self.token is not None and _ > 0:
                    return r.status, body, dict(r.headers)
                challenge = parse_bearer_challenge(r.headers.get("WWW-Authenticate", ""))
                if not challenge:
                    return r.status, body, dict(r.headers)
            await self._fetch_token(challenge)
        return r.status, body, dict(r.headers)

    async def _fetch_token(self, challenge: dict[str, str]) -> None:
        params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
        if self.grant.startswith("POST"):
            form = {"grant_type": "password", "username": self.user or "", "password": self.password or "",
                    "client_id": "test", **params}
            # "POST-100-continue": the body is sent only after the server's interim 100 answer
            async with self.http.post(challenge["realm"], data=form, expect100=self.grant.endswith("continue"),
                                      timeout=aiohttp.ClientTimeout(total=20)) as r:
                doc = await r.json()
                assert r.status == 200, doc
        else:
            async with self.http.get(challenge["realm"], params=params, headers=self._basic()) as r:
                doc = await r.json()
                if r.status != 200:
                    self.token = "refused"
                    return
        self.token = doc.get("token") or doc["access_token"]
        self.tokens_seen.append(self.token or "")


@pytest.fixture
async def auth_edge(edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess,
                    token_server: TokenServer) -> tuple[Edge, Tap]:
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, auth="passthrough", token_realm_hosts=[realm_host(token_server)],
                              access_ttl="1m")
    return edge, tap


async def pull_image(client: DockerClient, edge: Edge, repo: str, tag: str) -> dict[str, int]:
    """Pull manifest by tag, then every blob; returns status per path."""
    statuses = {}
    status, body, _ = await client.get(f"{edge.url}/v2/{repo}/manifests/{tag}", headers=ACCEPT)
    statuses["manifest"] = status
    if status != 200:
        return statuses
    manifest = orjson.loads(body)
    for desc in [manifest["config"], *manifest["layers"]]:
        status, blob, _ = await client.get(f"{edge.url}/v2/{repo}/blobs/{desc['digest']}")
        statuses[desc["digest"]] = status
        if status == 200:
            assert hashlib.sha256(blob).hexdigest() == desc["digest"][7:]
    return statuses


async def test_passthrough_public_image_anonymously(auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess) -> None:
    edge, _ = auth_edge
    async with aiohttp.ClientSession() as http:
        async with http.get(edge.url + "/v2/") as r:  # the ping challenges, with our own realm
            assert r.status == 401
            challenge = parse_bearer_challenge(r.headers["WWW-Authenticate"])
            assert challenge["realm"] == f"{edge.url}/_edgecache/token/up"
        statuses = await pull_image(DockerClient(http), edge, "public/app", "v1")
    assert set(statuses.values()) == {200}


async def test_private_image_is_served_only_to_those_the_upstream_lets_in(
        auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess, token_server: TokenServer) -> None:
    edge, tap = auth_edge
    img = token_registry.seeded.private
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw")
        assert set((await pull_image(alice, edge, img.repo, "v1")).values()) == {200}
        tap.reset()
        paths = [f"/v2/{img.repo}/manifests/{img.digest}", f"/v2/{img.repo}/manifests/v1"] + [
            f"/v2/{img.repo}/blobs/{d}" for d in (img.config_digest, *img.layer_digests)]
        for who in (DockerClient(http), DockerClient(http, "mallory", "mallorypw"),
                    DockerClient(http, "alice", "wrong-password")):
            for path in paths:
                for method in ("GET", "HEAD"):
                    status, body, headers = await who.get(edge.url + path, method=method)
                    assert status in (401, 403), (who.user, path, status)
                    for d, content in img.blobs.items():
                        assert content not in body or not content
                    assert img.manifest not in body
                    if method == "GET":
                        assert orjson.loads(body)["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")
        bob = DockerClient(http, "bob", "bobpw")
        statuses = await pull_image(bob, edge, img.repo, "v1")
        assert set(statuses.values()) == {200}
    # access is decided per credential here: hit answers are never replayed from the edge's memo
    assert len(edge.app[CTX].router.answers) == 0
    # bob was served from the cache: upstream saw only HEADs (the access checks) and no blob GET
    assert tap.count("GET", "blob") == 0


async def test_access_confirmation_is_remembered(auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess) -> None:
    edge, tap = auth_edge
    img = token_registry.seeded.private
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw")
        await pull_image(alice, edge, img.repo, "v1")
        tap.reset()
        for _ in range(3):
            statuses = await pull_image(alice, edge, img.repo, "v1")
            assert set(statuses.values()) == {200}
    assert tap.count() == 0  # same credential, within access_ttl and tag_ttl: no upstream request


@pytest.mark.parametrize("grant", ["GET", "POST", "POST-100-continue"])
async def test_token_relay_grants(auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess,
                                  token_server: TokenServer, grant: str) -> None:
    edge, _ = auth_edge
    token_server.clear()
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw", grant=grant)
        status, body, _ = await alice.get(f"{edge.url}/v2/private/app/manifests/v1", headers=ACCEPT)
        assert status == 200 and body == token_registry.seeded.private.manifest
        relayed = [r for r in token_server.requests if r.username == "alice"]
        assert relayed and relayed[0].method == grant.partition("-")[0]
        async with http.get(f"{edge.url}/_edgecache/token/up", params={"scope": "repository:private/app:pull"},
                            headers={"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()}) as r:
            assert r.status == 401


async def test_realm_on_unconfigured_http_host_is_refused(edge_factory: EdgeFactory, make_tap: object,
                                                          token_registry: RegistryProcess,
                                                          token_server: TokenServer) -> None:
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, auth="anonymous")  # token server's http host not configured
    token_server.clear()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge.url}/v2/public/app/manifests/v1", headers=ACCEPT) as r:
            assert r.status == 502
            assert "realm" in (await r.json())["errors"][0]["message"]
    assert token_server.requests == []  # never dialled


async def test_logs_never_contain_credentials(auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from edgecache.log import JsonFormatter

    edge, _ = auth_edge
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw")
        await pull_image(alice, edge, "private/app", "v1")
        await pull_image(DockerClient(http, "mallory", "mallorypw"), edge, "private/app", "v1")
        secrets = ["alicepw", "mallorypw", base64.b64encode(b"alice:alicepw").decode(), *alice.tokens_seen]
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert "edgecache.access" in text  # the access log was captured
    for secret in secrets:
        assert secret not in text
    edge_metrics = edge.app[METRICS]
    edge_metrics.flush()
    metrics = edge_metrics.render().decode()
    for secret in secrets:
        assert secret not in metrics


async def test_credentials_mode_uses_the_configured_account(edge_factory: EdgeFactory, make_tap: object,
                                                            token_registry: RegistryProcess, token_server: TokenServer,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """auth = "credentials": edgecache logs in with its own account (password from the environment);
    who may use the mirror is the operator's business, so any client gets what that account can read."""
    monkeypatch.setenv("EDGECACHE_TEST_REGISTRY_PASSWORD", "bobpw")
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, auth="credentials", username="bob", password_env="EDGECACHE_TEST_REGISTRY_PASSWORD",
                              token_realm_hosts=[realm_host(token_server)])
    token_server.clear()
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as http:
        statuses = await pull_image(DockerClient(http), edge, "private/app", "v1")  # an anonymous client
    assert set(statuses.values()) == {200}
    assert {r.username for r in token_server.requests} == {"bob"}
    assert "bobpw" not in caplog.text


async def test_upstream_down_never_serves_a_private_digest_under_a_public_name(
        auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess) -> None:
    """With the upstream unreachable, cached content is only served where it was seen, to whom it was shown."""
    edge, tap = auth_edge
    private, public = token_registry.seeded.private, token_registry.seeded.public
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw")
        assert set((await pull_image(alice, edge, private.repo, "v1")).values()) == {200}
        assert set((await pull_image(DockerClient(http), edge, public.repo, "v1")).values()) == {200}
        tap.set_down()
        anonymous = DockerClient(http)
        for digest in (private.config_digest, *private.layer_digests):
            status, body, _ = await anonymous.get(f"{edge.url}/v2/{public.repo}/blobs/{digest}")
            assert status in (401, 403, 502, 503), status  # never 200
            assert private.blobs[digest] not in body
        status, _, _ = await anonymous.get(f"{edge.url}/v2/{public.repo}/blobs/{public.layer_digests[0]}")
        assert status == 200  # what the public repository showed everyone is still served


async def test_upstream_down_never_serves_another_upstreams_private_blob(
        edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess, token_server: TokenServer,
        registry: RegistryProcess) -> None:
    """A digest cached from a passthrough upstream is not served through an anonymous one that is down."""
    corp = await make_tap(token_registry.url)  # type: ignore[operator]
    hub = await make_tap(registry.url)  # type: ignore[operator]
    edge = await edge_factory(hub.url, name="hub", auth="anonymous", extra_upstreams={"corp": {
        "url": corp.url, "namespaces": ["corp.example"], "prefix": "corp", "auth": "passthrough",
        "token_realm_hosts": [realm_host(token_server)]}})
    private = token_registry.seeded.private
    async with aiohttp.ClientSession() as http:
        alice = DockerClient(http, "alice", "alicepw")
        status, _, _ = await alice.get(f"{edge.url}/v2/corp/{private.repo}/blobs/{private.layer_digests[0]}")
        assert status == 200
        hub.set_down()
        status, body, _ = await DockerClient(http).get(f"{edge.url}/v2/library/x/blobs/{private.layer_digests[0]}")
        assert status != 200 and private.blobs[private.layer_digests[0]] not in body


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_a_404_shown_to_an_anonymous_caller_is_not_replayed_to_an_authorised_one(
        auth_edge: tuple[Edge, Tap], token_registry: RegistryProcess, by: str) -> None:
    """ghcr.io and Docker Hub answer 404 for a private repository to callers without access: that
    answer is remembered for those callers only, never handed to a credential the upstream lets in."""
    edge, tap = auth_edge
    img = token_registry.seeded.private
    ref = "v1" if by == "tag" else img.digest
    url = f"{edge.url}/v2/{img.repo}/manifests/{ref}"
    hidden = orjson.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
    tap.status_next("manifest", 404, methods=("GET",), body=hidden)  # the upstream hides it from anonymous
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the second anonymous ask is answered from the negative cache
            async with http.get(url, headers=ACCEPT) as r:
                assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert tap.count("GET", "manifest") == 1
        alice = {"Authorization": "Basic " + base64.b64encode(b"alice:alicepw").decode(), **ACCEPT}
        async with http.get(url, headers=alice) as r:
            assert r.status == 200 and await r.read() == img.manifest
    assert tap.count("GET", "manifest", status=200) >= 1  # alice's answer came from upstream


async def test_token_relay_names_the_right_repository_when_its_first_segment_is_the_prefix(
        edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess,
        token_server: TokenServer) -> None:
    """An upstream whose prefix is ``private`` serves repository ``private/app``: as
    ``/v2/private/private/app`` (prefix routing) and as ``/v2/private/app?ns=`` (containerd). The
    token relay must ask for ``private/app`` both times (the prefix is stripped exactly once)."""
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, name="private", auth="passthrough",
                              token_realm_hosts=[realm_host(token_server)])
    img = token_registry.seeded.private
    assert img.repo == "private/app"
    for name, query in (("private/private/app", ""), ("private/app", f"?ns={tap.host}")):
        token_server.clear()
        async with aiohttp.ClientSession() as http:
            alice = DockerClient(http, "alice", "alicepw")
            status, body, _ = await alice.get(f"{edge.url}/v2/{name}/manifests/v1{query}", headers=ACCEPT)
            assert status == 200 and body == img.manifest, (name, status, body[:200])
            status, blob, _ = await alice.get(f"{edge.url}/v2/{name}/blobs/{img.layer_digests[0]}{query}")
            assert status == 200 and blob == img.blobs[img.layer_digests[0]]
        relayed = {s for r in token_server.requests if r.username == "alice" for s in r.scope}
        assert relayed == {"repository:private/app:pull"}, (name, relayed)


async def test_a_public_repository_made_private_stops_being_served_anonymously(
        edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess, token_server: TokenServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Public is an upstream answer that expires (visibility_ttl), not a fact forever: after that, an
    anonymous request is checked upstream again before cached content goes out."""
    repo = f"public/flip-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as s:
        img = await push_image(s, token_registry.url, repo, "v1", salt=repo,
                               headers=await token_for_user(token_registry.url, "alice", "alicepw")(repo))
    # Registries check a token's claims, not a revocation list: revocation reaches them as tokens expire.
    monkeypatch.setattr(token_server, "expires_in", 6)  # edgecache keeps such a token for 1 s
    tap = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(tap.url, auth="passthrough", token_realm_hosts=[realm_host(token_server)],
                              visibility_ttl="200ms", access_ttl="200ms")
    paths = [f"/v2/{repo}/manifests/v1", f"/v2/{repo}/manifests/{img.digest}"] + [
        f"/v2/{repo}/blobs/{d}" for d in (img.config_digest, *img.layer_digests)]
    async with aiohttp.ClientSession() as http:
        assert set((await pull_image(DockerClient(http), edge, repo, "v1")).values()) == {200}  # anonymously
        monkeypatch.setattr(token_server, "anonymous_denied", frozenset({repo}))  # the repository goes private
        deadline = time.monotonic() + 15
        while True:  # the cached token expires after 1 s, the visibility and access records after 0.2 s
            async with http.get(edge.url + paths[-1]) as r:
                if r.status in (401, 403):
                    break
                assert r.status == 200 and time.monotonic() < deadline, "still served anonymously"
            await asyncio.sleep(0.1)
        for path in paths:
            for method in ("GET", "HEAD"):
                async with http.request(method, edge.url + path, headers=ACCEPT) as r:
                    body = await r.read()
                    assert r.status in (401, 403), (method, path, r.status)
                    assert img.manifest not in body and not any(b in body for b in img.blobs.values())
        tap.reset()
        statuses = await pull_image(DockerClient(http, "alice", "alicepw"), edge, repo, "v1")
    assert set(statuses.values()) == {200}
    assert tap.count("GET", "blob") == 0  # alice is served from the cache
