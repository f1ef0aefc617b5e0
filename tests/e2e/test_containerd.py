"""containerd (ctr) pulling through edgecache as a hosts.toml mirror, against a private containerd daemon.

Chain: ctr -> containerd -> tapA -> edgecache -> tapB -> registry.  The image is named after the host edgecache
knows as the upstream's namespace (tapB), the mirror host in hosts.toml is tapA, and ``server`` (containerd's
silent fallback on mirror errors) is a third tap, tapC, so any fallback is visible and fails the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from tests.e2e.conftest import realm_host
from tests.support.edge import Edge, EdgeFactory, run
from tests.support.registry import RegistryProcess
from tests.support.tap import Tap
from tests.support.token_server import TokenServer

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("containerd") is None or shutil.which("ctr") is None,
                                 reason="containerd/ctr not installed")]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_HOSTS_TOML = ROOT / "deploy/clients/containerd/certs.d/docker.io/hosts.toml"


def containerd_major() -> int:
    out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out) or re.search(r"(\d+)\.(\d+)\.\d+", out)
    assert m is not None, out
    return int(m.group(1))


def overlay_works(base: Path) -> bool:
    """Can we mount overlayfs on the filesystem holding ``base`` (containerd's snapshotter would)?"""
    d = Path(tempfile.mkdtemp(dir=base, prefix="ovl-"))
    for sub in ("lower", "upper", "work", "merged"):
        (d / sub).mkdir()
    (d / "lower" / "f").write_text("x")
    try:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={d / 'lower'},upperdir={d / 'upper'},workdir={d / 'work'}", str(d / "merged")],
                           capture_output=True, timeout=10)
        if r.returncode != 0:
            return False
        ok = (d / "merged" / "f").read_text() == "x"
        subprocess.run(["umount", str(d / "merged")], capture_output=True, timeout=10)
        return ok
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Containerd:
    workdir: Path
    address: str
    snapshotter: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    _ns: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def content_dir(self) -> Path:
        return self.workdir / "root" / "io.containerd.content.v1.content" / "blobs"

    def new_namespace(self) -> str:
        """A fresh namespace; with content_sharing_policy=isolated it has to download every blob itself."""
        return f"e2e{next(self._ns)}"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]


def config_text(workdir: Path, sock: str) -> str:
    version = 3 if containerd_major() >= 2 else 2
    cri = "io.containerd.cri.v1.runtime" if version == 3 else "io.containerd.grpc.v1.cri"
    disabled = [cri] if version == 2 else [cri, "io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"]
    return "\n".join([
        f"version = {version}",
        f'root = "{workdir / "root"}"',
        f'state = "{workdir / "state"}"',
        f"disabled_plugins = {disabled!r}".replace("'", '"'),
        "[grpc]",
        f'  address = "{sock}"',
        "[ttrpc]",
        f'  address = "{sock}.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{workdir / "opt"}"',
        '[plugins."io.containerd.metadata.v1.bolt"]',
        '  content_sharing_policy = "isolated"',
        "",
    ])


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A private containerd (no CRI, own root/state/socket under /tmp/ctrd-*), shared by this module's tests."""
    workdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
    sock = str(workdir / "c.sock")
    assert len(sock) < 100
    (workdir / "config.toml").write_text(config_text(workdir, sock))
    log_file = workdir / "containerd.log"
    log = open(log_file, "wb")
    proc = subprocess.Popen(["containerd", "--config", str(workdir / "config.toml"), "--log-level", "info"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 30
        delay = 0.02
        while True:
            if proc.poll() is not None:
                pytest.skip(f"containerd exited with {proc.returncode}: {log_file.read_text(errors='replace')[-3000:]}")
            if os.path.exists(sock):
                r = subprocess.run(["ctr", "--address", sock, "version"], capture_output=True, timeout=10)
                if r.returncode == 0:
                    break
            if time.monotonic() > end:
                pytest.skip(f"containerd not serving after 30s: {log_file.read_text(errors='replace')[-3000:]}")
            time.sleep(delay)
            delay = min(0.2, delay * 2)
        snapshotter = "overlayfs" if overlay_works(workdir) else "native"
        yield Containerd(workdir, sock, snapshotter, proc, log_file)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        subprocess.run(["umount", "-R", str(workdir)], capture_output=True)  # only if a snapshot stayed mounted
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Chain:
    """ctr -> tapA -> edge -> tapB -> registry, with tapC (-> registry) as hosts.toml ``server``."""

    edge: Edge
    tap_a: Tap
    tap_b: Tap
    tap_c: Tap
    hosts_dir: Path

    @property
    def name_host(self) -> str:
        """The registry host in image references: what edgecache knows as the upstream's namespace."""
        return self.tap_b.host


ChainFactory = Callable[..., Awaitable[Chain]]


def hosts_toml(server_url: str, mirror_url: str) -> str:
    """deploy/clients/containerd/certs.d/*/hosts.toml with the addresses substituted."""
    text = DEPLOY_HOSTS_TOML.read_text()
    assert 'server = "https://registry-1.docker.io"' in text and '[host."http://127.0.0.1:5000"]' in text
    text = text.replace('server = "https://registry-1.docker.io"', f'server = "{server_url}"')
    text = text.replace('[host."http://127.0.0.1:5000"]', f'[host."{mirror_url}"]')
    assert 'capabilities = ["pull", "resolve"]' in text
    return text


@pytest.fixture
async def make_chain(edge_factory: EdgeFactory, make_tap: Callable[[str], Awaitable[Tap]],
                     tmp_path: Path) -> ChainFactory:
    async def factory(upstream_url: str, **edge_kw: object) -> Chain:
        tap_b = await make_tap(upstream_url)
        tap_c = await make_tap(upstream_url)
        edge = await edge_factory(tap_b.url, **edge_kw)
        tap_a = await make_tap(edge.url)
        hosts_dir = tmp_path / "certs.d"
        (hosts_dir / tap_b.host).mkdir(parents=True, exist_ok=True)
        (hosts_dir / tap_b.host / "hosts.toml").write_text(hosts_toml(tap_c.url, tap_a.url))
        return Chain(edge, tap_a, tap_b, tap_c, hosts_dir)
    return factory


async def ctr(cd: Containerd, ns: str, *args: str, timeout: float = 90) -> tuple[int, str]:
    return await run("ctr", "--address", cd.address, "--namespace", ns, *args, timeout=timeout)


async def pull(cd: Containerd, ns: str, chain: Chain, ref: str, *extra: str, ok: bool = True) -> str:
    code, out = await ctr(cd, ns, "images", "pull", "--snapshotter", cd.snapshotter, "--hosts-dir",
                          str(chain.hosts_dir), "--plain-http", *extra, f"{chain.name_host}/{ref}")
    if ok:
        assert code == 0, f"ctr pull {ref} failed:\n{out}\n--- containerd log ---\n{cd.log_text()}"
    else:
        assert code != 0, f"ctr pull {ref} unexpectedly succeeded:\n{out}"
    return out


async def content_digests(cd: Containerd, ns: str) -> set[str]:
    code, out = await ctr(cd, ns, "content", "ls", "--quiet")
    assert code == 0, out
    return {line.strip() for line in out.splitlines() if line.strip().startswith("sha256:")}


async def image_target(cd: Containerd, ns: str, ref: str) -> str:
    code, out = await ctr(cd, ns, "images", "ls")
    assert code == 0, out
    for line in out.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == ref:
            return next(c for c in cols if c.startswith("sha256:"))
    raise AssertionError(f"{ref} not in ctr images ls:\n{out}")


def check_store_bytes(cd: Containerd, expected: dict[str, bytes]) -> None:
    """Re-hash the blobs on disk in containerd's content store and compare with the seeded bytes."""
    for digest, data in expected.items():
        f = cd.content_dir / "sha256" / digest.split(":", 1)[1]
        got = f.read_bytes()
        assert "sha256:" + hashlib.sha256(got).hexdigest() == digest
        assert got == data, f"content store blob {digest} differs from the seeded bytes"


def check_chain(chain: Chain, digests: set[str]) -> None:
    """containerd went to the mirror with ns=<upstream>, each blob reached the registry at most once, no fallback."""
    assert chain.tap_c.count() == 0, ("containerd fell back to `server`: "
                                      f"{[(r.method, r.path, r.status) for r in chain.tap_c.records]}")
    pulls = [r for r in chain.tap_a.records if r.kind in ("manifest", "blob")]
    assert pulls, "containerd never reached the mirror"
    for r in pulls:
        assert parse_qs(r.query).get("ns") == [chain.name_host], f"{r.method} {r.path}?{r.query}: no/bad ns"
        assert r.status in (200, 401), f"{r.method} {r.path}?{r.query} -> {r.status}"
    for d in digests:
        assert chain.tap_b.count("GET", "blob", d) <= 1, f"registry got blob {d} {chain.tap_b.count('GET', 'blob', d)}x"
    for r in chain.tap_b.records:
        assert "ns" not in parse_qs(r.query), "edgecache leaked containerd's ns= upstream"


async def test_pull_one_platform(containerd: Containerd, make_chain: ChainFactory, registry: RegistryProcess) -> None:
    s = registry.seeded
    chain = await make_chain(registry.url)
    ns = containerd.new_namespace()
    await pull(containerd, ns, chain, "library/multi:v1", "--platform", "linux/amd64")
    have = await content_digests(containerd, ns)
    amd64 = {s.manifests["amd64"][0], s.configs["amd64"], *s.layers["amd64"]}
    arm64_only = {s.configs["arm64"], *s.layers["arm64"]}
    assert {s.index_digest} | amd64 <= have
    assert not (arm64_only & have), "arm64 content pulled for --platform linux/amd64"
    assert await image_target(containerd, ns, f"{chain.name_host}/library/multi:v1") == s.index_digest
    check_store_bytes(containerd, {d: s.blobs[d] for d in (s.configs["amd64"], *s.layers["amd64"])})
    check_chain(chain, amd64)
    for d in (s.configs["amd64"], *s.layers["amd64"]):
        assert chain.tap_b.count("GET", "blob", d) == 1  # a fresh cache: fetched once, through edgecache
        assert chain.tap_a.count("GET", "blob", d) == 1


async def test_pull_all_platforms_then_again_from_cache(containerd: Containerd, make_chain: ChainFactory,
                                                         registry: RegistryProcess) -> None:
    s = registry.seeded
    chain = await make_chain(registry.url)
    layers = {d for a in ("amd64", "arm64") for d in (s.configs[a], *s.layers[a])}
    everything = {s.index_digest, s.manifests["amd64"][0], s.manifests["arm64"][0]} | layers
    ns = containerd.new_namespace()
    await pull(containerd, ns, chain, "library/multi:v1", "--all-platforms")
    assert everything <= await content_digests(containerd, ns)
    check_store_bytes(containerd, {d: s.blobs[d] for d in layers})
    check_chain(chain, everything)
    assert chain.tap_b.count("GET", "blob") == len(layers)

    # A second containerd namespace (isolated content) pulls it all again: served from edgecache alone.
    ns2 = containerd.new_namespace()
    before_a = chain.tap_a.count("GET", "blob")
    await pull(containerd, ns2, chain, "library/multi:v1", "--all-platforms")
    assert everything <= await content_digests(containerd, ns2)
    assert chain.tap_a.count("GET", "blob") - before_a == len(layers)  # containerd did download them again
    check_chain(chain, everything)
    assert chain.tap_b.count("GET", "blob") == len(layers)  # ...but none reached the registry a second time


async def test_pull_schema2(containerd: Containerd, make_chain: ChainFactory, registry: RegistryProcess) -> None:
    img = registry.seeded.images["schema2"]
    chain = await make_chain(registry.url)
    ns = containerd.new_namespace()
    await pull(containerd, ns, chain, f"{img.repo}:{img.tag}")
    assert {img.digest, *img.blobs} <= await content_digests(containerd, ns)
    assert await image_target(containerd, ns, f"{chain.name_host}/{img.repo}:{img.tag}") == img.digest
    check_store_bytes(containerd, {img.digest: img.manifest, **img.blobs})
    check_chain(chain, set(img.blobs))


async def test_pull_by_digest(containerd: Containerd, make_chain: ChainFactory, registry: RegistryProcess) -> None:
    s = registry.seeded
    digest, manifest = s.manifests["arm64"]
    chain = await make_chain(registry.url)
    ns = containerd.new_namespace()
    await pull(containerd, ns, chain, f"library/multi@{digest}", "--platform", "linux/arm64")
    wanted = {digest, s.configs["arm64"], *s.layers["arm64"]}
    have = await content_digests(containerd, ns)
    assert wanted <= have and s.index_digest not in have
    check_store_bytes(containerd, {digest: manifest, **{d: s.blobs[d] for d in wanted - {digest}}})
    check_chain(chain, wanted)
    assert [r.reference for r in chain.tap_a.find(kind="manifest")] == [digest] * len(chain.tap_a.find(kind="manifest"))


async def test_concurrent_pulls_of_a_big_image_collapse(containerd: Containerd, make_chain: ChainFactory,
                                                         registry: RegistryProcess) -> None:
    """Two containerd namespaces pull the 8 MiB image at once: the registry sends the big layer once."""
    img = registry.seeded.big
    chain = await make_chain(registry.url)
    ns1, ns2 = containerd.new_namespace(), containerd.new_namespace()
    await asyncio.gather(pull(containerd, ns1, chain, f"{img.repo}:{img.tag}"),
                         pull(containerd, ns2, chain, f"{img.repo}:{img.tag}"))
    for ns in (ns1, ns2):
        assert {img.digest, *img.blobs} <= await content_digests(containerd, ns)
    check_store_bytes(containerd, img.blobs)
    check_chain(chain, set(img.blobs))
    big = registry.seeded.big_layer_digest
    assert chain.tap_a.count("GET", "blob", big) >= 2  # both pulls downloaded it from edgecache...
    assert chain.tap_b.count("GET", "blob", big) == 1  # ...which fetched it once


async def test_private_image_with_passthrough_credentials(containerd: Containerd, make_chain: ChainFactory,
                                                          token_registry: RegistryProcess,
                                                          token_server: TokenServer) -> None:
    img = token_registry.seeded.private
    chain = await make_chain(token_registry.url, auth="passthrough", token_realm_hosts=[realm_host(token_server)])
    ref = f"{img.repo}:{img.tag}"

    # No credentials: refused by edgecache (and by the origin behind `server`, where containerd falls back).
    ns0 = containerd.new_namespace()
    await pull(containerd, ns0, chain, ref, ok=False)
    assert not (set(img.blobs) & await content_digests(containerd, ns0))
    assert chain.tap_b.count("GET", "blob") == 0
    for t in (chain.tap_a, chain.tap_b, chain.tap_c):
        t.reset()

    ns = containerd.new_namespace()
    await pull(containerd, ns, chain, ref, "--user", "alice:alicepw")
    assert {img.digest, *img.blobs} <= await content_digests(containerd, ns)
    check_store_bytes(containerd, {img.digest: img.manifest, **img.blobs})
    check_chain(chain, set(img.blobs))
    assert any(r.has_auth for r in chain.tap_a.find("GET", "blob"))  # containerd presented a token to edgecache
    assert all(r.has_auth for r in chain.tap_b.find("GET", "blob"))  # and edgecache relayed alice's upstream
    assert any(r.username == "alice" for r in token_server.requests)

    # bob may read private/*: served from the cache; mallory may not, even by digest now that it is cached.
    ns_bob = containerd.new_namespace()
    await pull(containerd, ns_bob, chain, ref, "--user", "bob:bobpw")
    assert {img.digest, *img.blobs} <= await content_digests(containerd, ns_bob)
    check_chain(chain, set(img.blobs))
    assert any(r.username == "bob" for r in token_server.requests)
    for t in (chain.tap_a, chain.tap_b, chain.tap_c):
        t.reset()
    ns_mallory = containerd.new_namespace()
    for mref in (ref, f"{img.repo}@{img.digest}"):
        await pull(containerd, ns_mallory, chain, mref, "--user", "mallory:mallorypw", ok=False)
    assert not (({img.digest} | set(img.blobs)) & await content_digests(containerd, ns_mallory))
    served = [(r.method, r.path) for r in chain.tap_a.records if r.status == 200 and r.kind in ("manifest", "blob")]
    assert served == [], f"edgecache served private content to mallory: {served}"
