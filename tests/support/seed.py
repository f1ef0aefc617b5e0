"""Push deterministic synthetic images into a registry through the plain HTTP API.

Everything is built in memory (real tar.gz layers, real-looking image configs,
OCI index, Docker schema2, an artifact with a ``subject``) and pushed with
POST + PUT ``?digest=`` uploads.  Same inputs always give the same digests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import re
import tarfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SBOM_ARTIFACT_TYPE = "application/vnd.example.sbom.v1"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

# repo -> request headers (e.g. a bearer token good for pull+push on that repo)
TokenFor = Callable[[str], Awaitable[Mapping[str, str]]]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes for a manifest/config."""
    return json.dumps(obj, indent=2, sort_keys=False).encode()


def make_tar_gz(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A deterministic gzip'd tar; returns (tar.gz bytes, diff_id of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            info.uid = info.gid = 0
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256(tar_bytes)


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def image_config(arch: str, diff_ids: list[str], *, os_name: str = "linux", label: str = "") -> bytes:
    return canonical({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": {"org.example.seed": label or arch}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"seed layer {i}"}
                    for i in range(len(diff_ids))],
    })


@dataclass(frozen=True)
class Image:
    """One single-platform image manifest as pushed."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    config_digest: str
    layer_digests: tuple[str, ...]
    blobs: Mapping[str, bytes] = field(repr=False)  # config + layers


@dataclass(frozen=True)
class Seeded:
    """Everything :func:`seed_images` pushed, keyed for easy assertions."""

    blobs: dict[str, bytes]                      # every blob pushed: digest -> bytes
    manifest_bytes: dict[str, bytes]             # every manifest pushed: digest -> bytes
    media_types: dict[str, str]                  # manifest digest -> media type
    multi_repo: str                              # "library/multi" (tags v1, latest)
    index_digest: str
    index_bytes: bytes
    manifests: dict[str, tuple[str, bytes]]      # arch -> (digest, bytes)
    layers: dict[str, tuple[str, ...]]           # arch -> layer digests
    configs: dict[str, str]                      # arch -> config digest
    images: dict[str, Image]                     # arch -> Image (and "schema2", "big")
    schema2: Image                               # "library/schema2:v1" (Docker media types)
    big: Image                                   # "team/big:v1"
    big_layer_digest: str
    empty_digest: str                            # zero-byte blob in library/multi
    artifact_digest: str                         # SBOM artifact (subject = index) in library/multi
    artifact_bytes: bytes


def _abs(base_url: str, location: str) -> URL:
    loc = URL(location, encoded=True)
    return loc if loc.is_absolute() else URL(base_url).join(loc)


async def _check(resp: aiohttp.ClientResponse, what: str, *ok: int) -> None:
    if resp.status not in ok:
        body = await resp.text(errors="replace")
        raise RuntimeError(f"{what}: HTTP {resp.status}: {body[:500]}")


async def push_blob(session: aiohttp.ClientSession, base_url: str, repo: str, data: bytes,
                    headers: Mapping[str, str] | None = None) -> str:
    """Upload one blob (POST, then PUT ?digest= with the whole body); returns its digest."""
    digest = sha256(data)
    hdrs = dict(headers or {})
    async with session.post(f"{base_url}/v2/{repo}/blobs/uploads/", headers=hdrs) as r:
        await _check(r, f"start upload {repo}", 202)
        location = r.headers["Location"]
    url = _abs(base_url, location).update_query({"digest": digest})
    put_headers = {**hdrs, "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
    async with session.put(url, data=io.BytesIO(data), headers=put_headers) as r:
        await _check(r, f"finish upload {repo}@{digest}", 201)
    return digest


async def push_manifest(session: aiohttp.ClientSession, base_url: str, repo: str, ref: str, data: bytes,
                        media_type: str, headers: Mapping[str, str] | None = None) -> str:
    """PUT a manifest by tag or digest; returns its digest (checked against the registry's answer)."""
    digest = sha256(data)
    async with session.put(f"{base_url}/v2/{repo}/manifests/{ref}", data=data,
                           headers={**(headers or {}), "Content-Type": media_type}) as r:
        await _check(r, f"put manifest {repo}:{ref}", 201)
        got = r.headers.get("Docker-Content-Digest")
    if got is not None and got != digest:
        raise RuntimeError(f"registry computed {got} for manifest {repo}:{ref}, expected {digest}")
    return digest


async def push_image(session: aiohttp.ClientSession, base_url: str, repo: str, tag: str | None, *,
                     arch: str = "amd64", salt: str = "", layer_count: int = 1,
                     headers: Mapping[str, str] | None = None, docker: bool = False,
                     extra_layers: list[bytes] | None = None) -> Image:
    """Build and push a small single-platform image (OCI by default, Docker schema2 if ``docker``).

    ``salt`` changes every layer, so the same repo/tag with a new salt is a different image.
    With ``tag=None`` the manifest is pushed by digest only.
    """
    layers: list[bytes] = []
    diff_ids: list[str] = []
    for i in range(layer_count):
        gz, diff = make_tar_gz({
            f"etc/seed-{i}.txt": f"{repo} {arch} layer {i} {salt}\n".encode(),
            f"usr/share/{arch}/data-{i}.bin": hashlib.sha256(f"{repo}{arch}{i}{salt}".encode()).digest() * 64,
        })
        layers.append(gz)
        diff_ids.append(diff)
    for extra in extra_layers or []:
        layers.append(extra)
        diff_ids.append(sha256(gzip.decompress(extra)))
    config = image_config(arch, diff_ids, label=f"{repo}{salt}")
    layer_type = DOCKER_LAYER if docker else OCI_LAYER_GZIP
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [descriptor(layer_type, b) for b in layers],
    }
    if not docker:
        manifest_obj["annotations"] = {"org.opencontainers.image.ref.name": f"{repo}-{arch}{salt}"}
    manifest = canonical(manifest_obj)
    blobs = {sha256(b): b for b in [config, *layers]}
    for b in blobs.values():
        await push_blob(session, base_url, repo, b, headers)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    digest = await push_manifest(session, base_url, repo, tag or sha256(manifest), manifest, media_type, headers)
    return Image(repo, tag, digest, manifest, media_type, sha256(config), tuple(sha256(b) for b in layers), blobs)


async def move_tag(session: aiohttp.ClientSession, base_url: str, repo: str, tag: str, *, salt: str,
                   arch: str = "amd64", headers: Mapping[str, str] | None = None) -> Image:
    """Point an existing tag at a brand-new image (different layers/config/digest)."""
    return await push_image(session, base_url, repo, tag, arch=arch, salt=salt, headers=headers)


def big_layer(size: int, seed: int = 1234) -> bytes:
    """A real tar.gz whose single file is ``size`` deterministic random bytes (so it barely compresses)."""
    data = random.Random(seed).randbytes(size)
    gz, _ = make_tar_gz({"big.bin": data})
    return gz


async def _no_headers(repo: str) -> Mapping[str, str]:
    return {}


async def seed_images(base_url: str, token_for: TokenFor | None = None, *,
                      big_size: int = 8 * 1024 * 1024) -> Seeded:
    """Seed the standard test content (see :class:`Seeded`) into the registry at ``base_url``."""
    hdr = token_for or _no_headers
    blobs: dict[str, bytes] = {}
    manifests_b: dict[str, bytes] = {}
    media: dict[str, str] = {}
    images: dict[str, Image] = {}

    def note(img: Image) -> Image:
        blobs.update(img.blobs)
        manifests_b[img.digest] = img.manifest
        media[img.digest] = img.media_type
        return img

    async with aiohttp.ClientSession(auto_decompress=False) as s:
        repo = "library/multi"
        h = await hdr(repo)
        for arch, n in (("amd64", 2), ("arm64", 1)):
            images[arch] = note(await push_image(s, base_url, repo, None, arch=arch, layer_count=n, headers=h))
        index = canonical({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(OCI_MANIFEST, images[a].manifest, platform={"architecture": a, "os": "linux"})
                for a in ("amd64", "arm64")
            ],
        })
        index_digest = await push_manifest(s, base_url, repo, "v1", index, OCI_INDEX, h)
        await push_manifest(s, base_url, repo, "latest", index, OCI_INDEX, h)
        manifests_b[index_digest], media[index_digest] = index, OCI_INDEX

        empty = await push_blob(s, base_url, repo, b"", h)
        blobs[empty] = b""

        # Artifact (SBOM) whose subject is the index; pushed by digest only.
        empty_cfg = b"{}"
        sbom = canonical({"spdxVersion": "SPDX-2.3", "name": "library/multi", "packages": []})
        for b in (empty_cfg, sbom):
            blobs[await push_blob(s, base_url, repo, b, h)] = b
        artifact = canonical({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM_ARTIFACT_TYPE,
            "config": descriptor(OCI_EMPTY, empty_cfg),
            "layers": [descriptor("application/spdx+json", sbom)],
            "subject": descriptor(OCI_INDEX, index),
            "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        })
        artifact_digest = await push_manifest(s, base_url, repo, sha256(artifact), artifact, OCI_MANIFEST, h)
        manifests_b[artifact_digest], media[artifact_digest] = artifact, OCI_MANIFEST

        images["schema2"] = note(await push_image(s, base_url, "library/schema2", "v1", layer_count=1,
                                                  docker=True, headers=await hdr("library/schema2")))
        images["big"] = note(await push_image(s, base_url, "team/big", "v1", layer_count=0,
                                              extra_layers=[big_layer(big_size)], headers=await hdr("team/big")))

    return Seeded(
        blobs=blobs, manifest_bytes=manifests_b, media_types=media, multi_repo="library/multi",
        index_digest=index_digest, index_bytes=index,
        manifests={a: (images[a].digest, images[a].manifest) for a in ("amd64", "arm64")},
        layers={a: images[a].layer_digests for a in ("amd64", "arm64")},
        configs={a: images[a].config_digest for a in ("amd64", "arm64")},
        images=images, schema2=images["schema2"], big=images["big"],
        big_layer_digest=images["big"].layer_digests[0], empty_digest=empty,
        artifact_digest=artifact_digest, artifact_bytes=artifact,
    )


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """``Bearer realm="...",service="...",scope="..."`` -> dict (empty if not a Bearer challenge)."""
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return dict(_CHALLENGE_PARAM.findall(rest))


def basic_auth_header(username: str, password: str) -> dict[str, str]:
    """``{"Authorization": "Basic ..."}`` (aiohttp 3.14 deprecates ``aiohttp.BasicAuth``)."""
    raw = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def fetch_token(session: aiohttp.ClientSession, base_url: str, scope: str,
                      username: str | None = None, password: str | None = None) -> str:
    """Do the Docker token dance (GET realm with Basic auth) for ``scope``; returns the bearer token."""
    async with session.get(f"{base_url}/v2/") as r:
        challenge = parse_bearer_challenge(r.headers.get("WWW-Authenticate", ""))
    if not challenge:
        raise RuntimeError(f"{base_url} sent no Bearer challenge")
    headers = basic_auth_header(username, password or "") if username is not None else {}
    params = {"service": challenge.get("service", ""), "scope": scope}
    async with session.get(challenge["realm"], params=params, headers=headers) as r:
        await _check(r, "token", 200)
        body = await r.json()
    token: str = body.get("token") or body["access_token"]
    return token


def token_for_user(base_url: str, username: str | None, password: str | None,
                   actions: str = "pull,push") -> TokenFor:
    """A :data:`TokenFor` that fetches a token for each repo as the given user."""
    async def get(repo: str) -> Mapping[str, str]:
        async with aiohttp.ClientSession() as s:
            tok = await fetch_token(s, base_url, f"repository:{repo}:{actions}", username, password)
        return {"Authorization": f"Bearer {tok}"}
    return get


@dataclass(frozen=True)
class AuthSeeded:
    """Content of the token-auth registry: one public and one private single-arch OCI image."""

    public: Image    # "public/app:v1"
    private: Image   # "private/app:v1"
    blobs: dict[str, bytes]


async def seed_auth_images(base_url: str, token_for: TokenFor) -> AuthSeeded:
    """Push ``public/app:v1`` and ``private/app:v1`` (distinct layers) with the given credentials."""
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        pub = await push_image(s, base_url, "public/app", "v1", salt="public",
                               headers=await token_for("public/app"))
        priv = await push_image(s, base_url, "private/app", "v1", salt="private",
                                headers=await token_for("private/app"))
    return AuthSeeded(pub, priv, {**pub.blobs, **priv.blobs})
