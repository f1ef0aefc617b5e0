"""podman pulling through edgecache via a registries.conf mirror (deploy/clients/podman/registries.conf).

Chain: podman -> tapA -> edgecache (/v2/<prefix>/...) -> tapB -> registry.  The image's registry name is a
third tap (tapC -> registry), which is also the ``[[registry]] location``: podman falls back to it when the
mirror fails, so any fallback shows up there.  Storage is a private vfs store; no container is ever run.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import realm_host
from tests.support.edge import Edge, EdgeFactory, run
from tests.support.registry import RegistryProcess
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_REGISTRIES_CONF = ROOT / "deploy/clients/podman/registries.conf"
PREFIX = "up"  # edge_factory's upstream name and path prefix


def registries_conf(name_host: str, mirror: str) -> str:
    """The docker.io block of deploy/clients/podman/registries.conf with the addresses substituted."""
    deploy = DEPLOY_REGISTRIES_CONF.read_text()
    block = ('[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
             '[[registry.mirror]]\nlocation = "127.0.0.1:5000/dockerhub"\ninsecure = true\n')
    assert block in deploy, "deploy/clients/podman/registries.conf changed shape"
    ours = (block.replace('prefix = "docker.io"', f'prefix = "{name_host}"')
            .replace('location = "docker.io"', f'location = "{name_host}"\ninsecure = true')
            .replace('"127.0.0.1:5000/dockerhub"', f'"{mirror}"'))
    return "unqualified-search-registries = []\n\n" + ours


@dataclass
class Podman:
    edge: Edge
    tap_a: Tap
    tap_b: Tap
    tap_c: Tap
    workdir: Path
    env: dict[str, str]

    @property
    def name_host(self) -> str:
        return self.tap_c.host

    async def __call__(self, *args: str, timeout: float = 90) -> tuple[int, str]:
        base = ["podman", "--root", str(self.workdir / "root"), "--runroot", str(self.workdir / "runroot"),
                "--tmpdir", str(self.workdir / "tmp"), "--storage-driver", "vfs", "--events-backend", "none",
                "--cgroup-manager", "cgroupfs"]
        return await run(*base, *args, env=self.env, timeout=timeout)

    async def pull(self, ref: str, *extra: str) -> str:
        code, out = await self("pull", *extra, f"{self.name_host}/{ref}")
        assert code == 0, f"podman pull {ref} failed:\n{out}"
        return out

    async def images(self) -> list[dict[str, object]]:
        code, out = await self("images", "--digests", "--format", "json")
        assert code == 0, out
        result: list[dict[str, object]] = json.loads(out)
        return result

    async def images_table(self) -> str:
        code, out = await self("images", "--digests")
        assert code == 0, out
        return out

    def check_chain(self, repo: str, blob_digests: set[str]) -> None:
        assert self.tap_c.count() == 0, ("podman fell back to the registry location: "
                                         f"{[(r.method, r.path, r.status) for r in self.tap_c.records]}")
        pulls = [r for r in self.tap_a.records if r.kind in ("manifest", "blob")]
        assert pulls, "podman never reached the mirror"
        for r in pulls:
            assert r.name == f"{PREFIX}/{repo}", f"{r.method} {r.path}: not the mirror path with the prefix"
            assert r.status == 200, f"{r.method} {r.path} -> {r.status}"
        for d in blob_digests:
            assert self.tap_a.count("GET", "blob", d) == 1
            assert self.tap_b.count("GET", "blob", d) == 1, f"registry got {d} {self.tap_b.count('GET', 'blob', d)}x"
        assert all(r.name == repo for r in self.tap_b.find(kind="blob")), "edgecache kept the prefix upstream"


PodmanFactory = Callable[..., Awaitable[Podman]]


@pytest.fixture
async def make_podman(edge_factory: EdgeFactory, make_tap: Callable[[str], Awaitable[Tap]],
                      tmp_path: Path) -> AsyncIterator[PodmanFactory]:
    """``await make_podman(upstream_url, **edge_kw)``: a private podman store wired to a fresh edgecache chain."""
    dirs: list[Path] = []

    async def factory(upstream_url: str, **edge_kw: object) -> Podman:
        tap_b = await make_tap(upstream_url)
        tap_c = await make_tap(upstream_url)
        edge = await edge_factory(tap_b.url, name=PREFIX, **edge_kw)
        tap_a = await make_tap(edge.url)
        short = Path(tempfile.mkdtemp(prefix="pdm-", dir="/tmp"))  # podman: runroot must be < 50 characters
        dirs.append(short)
        conf = short / "registries.conf"
        conf.write_text(registries_conf(tap_c.host, f"{tap_a.host}/{PREFIX}"))
        for sub in ("root", "runroot", "tmp"):
            (short / sub).mkdir()
        (short / "auth.json").write_text('{"auths": {}}')  # no stored credentials
        env = {"CONTAINERS_REGISTRIES_CONF": str(conf), "REGISTRY_AUTH_FILE": str(short / "auth.json"),
               "XDG_RUNTIME_DIR": str(short / "runroot")}
        return Podman(edge, tap_a, tap_b, tap_c, short, env)

    try:
        yield factory
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def podman(make_podman: PodmanFactory, registry: RegistryProcess) -> Podman:
    return await make_podman(registry.url)


def find_image(images: list[dict[str, object]], name: str) -> dict[str, object]:
    for img in images:
        if name in (img.get("Names") or []):  # type: ignore[operator]
            return img
    raise AssertionError(f"{name} not in podman images: {json.dumps(images)[:2000]}")


async def test_pull_multi_arch(podman: Podman, registry: RegistryProcess) -> None:
    s = registry.seeded
    await podman.pull("library/multi:v1", "--arch", "amd64")
    img = find_image(await podman.images(), f"{podman.name_host}/library/multi:v1")
    assert img["Digest"] == s.index_digest
    assert f"{podman.name_host}/library/multi@{s.index_digest}" in img["RepoDigests"]  # type: ignore[operator]
    assert f"{podman.name_host}/library/multi@{s.manifests['amd64'][0]}" in img["RepoDigests"]  # type: ignore[operator]
    assert str(img["Id"]) == s.configs["amd64"].split(":")[1]  # the image ID is the config digest
    assert s.index_digest in await podman.images_table()
    podman.check_chain("library/multi", {s.configs["amd64"], *s.layers["amd64"]})
    assert podman.tap_a.count("GET", "blob", s.configs["arm64"]) == 0


async def test_pull_schema2_and_by_digest(podman: Podman, registry: RegistryProcess) -> None:
    s = registry.seeded
    img2 = s.images["schema2"]
    await podman.pull(f"{img2.repo}:{img2.tag}")
    arm_digest = s.manifests["arm64"][0]
    await podman.pull(f"library/multi@{arm_digest}", "--arch", "arm64")
    images = await podman.images()
    got = find_image(images, f"{podman.name_host}/{img2.repo}:{img2.tag}")
    assert got["Digest"] == img2.digest
    assert str(got["Id"]) == img2.config_digest.split(":")[1]
    by_digest = [i for i in images if str(i["Id"]) == s.configs["arm64"].split(":")[1]]
    assert len(by_digest) == 1 and by_digest[0]["Digest"] == arm_digest
    assert f"{podman.name_host}/library/multi@{arm_digest}" in by_digest[0]["RepoDigests"]  # type: ignore[operator]
    table = await podman.images_table()
    assert img2.digest in table and arm_digest in table
    assert podman.tap_c.count() == 0
    for d in set(img2.blobs) | {s.configs["arm64"], *s.layers["arm64"]}:
        assert podman.tap_b.count("GET", "blob", d) == 1
    assert {r.name for r in podman.tap_a.find(kind="blob")} == {f"{PREFIX}/{img2.repo}", f"{PREFIX}/library/multi"}


def mirror_authfile(podman: Podman, user: str, password: str) -> str:
    """containers/image never sends ``--creds`` (meant for the primary registry) to a mirror on another host, so
    credentials for edgecache live in auth.json under the mirror's host, as ``podman login <edge>`` would store."""
    path = podman.workdir / f"auth-{user}.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {podman.tap_a.host: {"auth": token}}}))
    return str(path)


async def test_private_image_with_passthrough_credentials(make_podman: PodmanFactory, token_registry: RegistryProcess,
                                                          token_server: TokenServer) -> None:
    """Credentials through the prefixed mirror: the client's token scope names up/private/app; edgecache
    translates it to private/app at the upstream realm and relays the user's credentials."""
    img = token_registry.seeded.private
    podman = await make_podman(token_registry.url, auth="passthrough", token_realm_hosts=[realm_host(token_server)])
    ref = f"{img.repo}:{img.tag}"
    await podman.pull(ref, "--authfile", mirror_authfile(podman, "alice", "alicepw"))
    got = find_image(await podman.images(), f"{podman.name_host}/{ref}")
    assert got["Digest"] == img.digest and str(got["Id"]) == img.config_digest.split(":")[1]
    podman.check_chain(img.repo, set(img.blobs))
    assert all(r.has_auth for r in podman.tap_b.find("GET", "blob"))
    alice = [r for r in token_server.requests if r.username == "alice" and r.status == 200]
    assert any(f"repository:{img.repo}:pull" in r.scope for r in alice), [r.scope for r in token_server.requests]

    for t in (podman.tap_a, podman.tap_b, podman.tap_c):
        t.reset()
    podman.tap_c.set_down()  # no fallback to the origin: only edgecache's answer counts
    code, out = await podman("pull", "--authfile", mirror_authfile(podman, "mallory", "mallorypw"),
                             f"{podman.name_host}/{img.repo}@{img.digest}")
    assert code != 0, f"mallory pulled a private image:\n{out}"
    assert "unauthorized" in out.lower() or "denied" in out.lower(), out
    assert any(r.status == 401 for r in podman.tap_a.find(kind="manifest")), out
    served = [(r.method, r.path) for r in podman.tap_a.records if r.status == 200 and r.kind in ("manifest", "blob")]
    assert served == [], f"edgecache served private content to mallory: {served}"
    assert any(r.username == "mallory" for r in token_server.requests)
