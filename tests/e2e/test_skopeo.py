"""skopeo (containers/image) pulling through an in-process edgecache.

skopeo runs via :func:`tests.support.edge.run` so the edgecache loop keeps serving meanwhile.
Every OCI layout skopeo writes is re-hashed blob by blob and compared with the seeded bytes.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import layout_refs, realm_host, verify_oci_layout
from tests.support.edge import EdgeFactory, run
from tests.support.registry import RegistryProcess
from tests.support.seed import OCI_INDEX, OCI_MANIFEST
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")]

ARCHES = ("amd64", "arm64")


@pytest.fixture
def skopeo_env(tmp_path: Path) -> dict[str, str]:
    """Isolate skopeo from the host's registries.conf mirrors and stored credentials."""
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = []\n")
    return {"CONTAINERS_REGISTRIES_CONF": str(conf), "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}


async def skopeo(env: dict[str, str], *args: str, arch: str | None = None) -> tuple[int, str]:
    glob = ["--insecure-policy"]
    if arch is not None:
        glob += ["--override-arch", arch, "--override-os", "linux"]
    return await run("skopeo", *glob, *args, env=env, timeout=90)


async def copy(env: dict[str, str], src: str, dest: Path, ref: str, *extra: str, arch: str | None = None) -> str:
    code, out = await skopeo(env, "copy", "--src-tls-verify=false", *extra, f"docker://{src}", f"oci:{dest}:{ref}",
                             arch=arch)
    assert code == 0, f"skopeo copy {src} failed:\n{out}"
    return out


def check_image_in_layout(layout: Path, registry: RegistryProcess, arch: str, ref: str) -> dict[str, bytes]:
    """The layout holds exactly the seeded single-arch image for ``arch`` under ``ref``, byte for byte."""
    s = registry.seeded
    blobs = verify_oci_layout(layout)
    digest, manifest = s.manifests[arch]
    desc = layout_refs(layout)[ref]
    assert desc["digest"] == digest and desc["mediaType"] == OCI_MANIFEST
    assert blobs[digest] == manifest  # manifest kept byte-for-byte (no conversion, digest preserved)
    for d in (s.configs[arch], *s.layers[arch]):
        assert blobs[d] == s.blobs[d], f"{arch} blob {d} differs from the seeded bytes"
    return blobs


async def test_inspect(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                       skopeo_env: dict[str, str]) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    code, out = await skopeo(skopeo_env, "inspect", "--tls-verify=false", "--raw",
                             f"docker://{edge.host}/library/multi:v1")
    assert code == 0, out
    assert out.encode() == s.index_bytes  # the index, byte for byte
    assert json.loads(out)["mediaType"] == OCI_INDEX
    for arch in ARCHES:
        code, out = await skopeo(skopeo_env, "inspect", "--tls-verify=false",
                                 f"docker://{edge.host}/library/multi:v1", arch=arch)
        assert code == 0, out
        doc = json.loads(out)
        assert doc["Digest"] == s.index_digest  # skopeo reports the digest of what the tag names
        assert doc["Architecture"] == arch and doc["Os"] == "linux"
        assert doc["Layers"] == list(s.layers[arch])
    assert tap.count("GET", "manifest", "v1", name="library/multi") >= 1  # edgecache really went upstream


@pytest.mark.parametrize("arch", ARCHES)
async def test_copy_by_tag_and_digest(edge_factory: EdgeFactory, tap: Tap, registry: RegistryProcess,
                                      skopeo_env: dict[str, str], tmp_path: Path, arch: str) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    manifest_digest = s.manifests[arch][0]

    by_tag = tmp_path / "by-tag"
    await copy(skopeo_env, f"{edge.host}/library/multi:v1", by_tag, "v1", arch=arch)
    blobs = check_image_in_layout(by_tag, registry, arch, "v1")
    assert set(blobs) == {manifest_digest, s.configs[arch], *s.layers[arch]}  # the other arch was not copied

    # By the platform manifest's digest, and by the index digest (skopeo picks the platform).
    by_digest = tmp_path / "by-digest"
    await copy(skopeo_env, f"{edge.host}/library/multi@{manifest_digest}", by_digest, "m", arch=arch)
    check_image_in_layout(by_digest, registry, arch, "m")
    await copy(skopeo_env, f"{edge.host}/library/multi@{s.index_digest}", by_digest, "i", arch=arch)
    check_image_in_layout(by_digest, registry, arch, "i")

    # Every blob went upstream once at most: the digest copies were served from the cache.
    for d in (s.configs[arch], *s.layers[arch]):
        assert tap.count("GET", "blob", d) == 1, f"blob {d} fetched upstream {tap.count('GET', 'blob', d)} times"


async def test_copy_all_and_second_copy_is_served_from_cache(edge_factory: EdgeFactory, tap: Tap,
                                                              registry: RegistryProcess, skopeo_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    edge = await edge_factory(tap.url)
    s = registry.seeded
    all_blobs = {s.index_digest}
    for arch in ARCHES:
        all_blobs |= {s.manifests[arch][0], s.configs[arch], *s.layers[arch]}
    layer_blobs = all_blobs - {s.index_digest, *(s.manifests[a][0] for a in ARCHES)}

    first = tmp_path / "first"
    await copy(skopeo_env, f"{edge.host}/library/multi:v1", first, "v1", "--all")
    blobs = verify_oci_layout(first)
    desc = layout_refs(first)["v1"]
    assert desc["digest"] == s.index_digest and desc["mediaType"] == OCI_INDEX
    assert blobs[s.index_digest] == s.index_bytes
    assert set(blobs) == all_blobs
    for arch in ARCHES:
        assert blobs[s.manifests[arch][0]] == s.manifests[arch][1]
    for d in layer_blobs:
        assert blobs[d] == s.blobs[d]
        assert tap.count("GET", "blob", d) == 1

    upstream_blob_gets = tap.count("GET", "blob")
    tap.reset()
    second = tmp_path / "second"
    await copy(skopeo_env, f"{edge.host}/library/multi@{s.index_digest}", second, "v1", "--all")
    blobs2 = verify_oci_layout(second)
    assert blobs2 == blobs
    assert upstream_blob_gets == len(layer_blobs)
    assert tap.count("GET", "blob") == 0, [r.path for r in tap.find("GET", "blob")]
    assert tap.count("HEAD", "blob") == 0
    # manifests by digest are immutable: no upstream trip for them either
    assert tap.count(kind="manifest") == 0, [(r.method, r.path) for r in tap.find(kind="manifest")]


async def test_passthrough_credentials(edge_factory: EdgeFactory, make_tap: object, token_registry: RegistryProcess,
                                       token_server: TokenServer, skopeo_env: dict[str, str], tmp_path: Path) -> None:
    up = await make_tap(token_registry.url)  # type: ignore[operator]
    edge = await edge_factory(up.url, auth="passthrough", token_realm_hosts=[realm_host(token_server)])
    img = token_registry.seeded.private
    src = f"{edge.host}/{img.repo}:{img.tag}"

    def check(layout: Path) -> None:
        blobs = verify_oci_layout(layout)
        assert layout_refs(layout)["v1"]["digest"] == img.digest
        assert blobs[img.digest] == img.manifest
        for d, data in img.blobs.items():
            assert blobs[d] == data

    await copy(skopeo_env, src, tmp_path / "alice", "v1", "--src-creds", "alice:alicepw")
    check(tmp_path / "alice")
    for d in img.blobs:
        assert up.count("GET", "blob", d) == 1
        assert all(r.has_auth for r in up.find("GET", "blob", d))

    by_digest = f"{edge.host}/{img.repo}@{img.digest}"  # cached now: edgecache must still ask the upstream
    for creds, ref in itertools.product((("--src-no-creds",), ("--src-creds", "mallory:mallorypw")), (src, by_digest)):
        dest = tmp_path / (creds[-1].split(":")[0].lstrip("-") + ("-d" if "@" in ref else "-t"))
        code, out = await skopeo(skopeo_env, "copy", "--src-tls-verify=false", *creds, f"docker://{ref}",
                                 f"oci:{dest}:v1")
        assert code != 0, f"{creds} could read {img.repo} through the cache:\n{out}"
        assert not any(dest.glob("blobs/*/*")) or not (set(p.name for p in dest.glob("blobs/*/*"))
                                                         & {d.split(":")[1] for d in img.blobs}), \
            f"{creds}: private blobs were written"
        assert "unauthorized" in out.lower() or "denied" in out.lower() or "401" in out or "403" in out, out

    # bob may read private/*: served (from alice's cached blobs), after his own authorization upstream
    await copy(skopeo_env, src, tmp_path / "bob", "v1", "--src-creds", "bob:bobpw")
    check(tmp_path / "bob")
    for d in img.blobs:
        assert up.count("GET", "blob", d) <= 2
    users = {r.username for r in token_server.requests if r.status == 200}
    assert {"alice", "bob"} <= users
    # mallory's token request was relayed as mallory (the token server grants him no access to private/*)
    assert any(r.username == "mallory" for r in token_server.requests)
