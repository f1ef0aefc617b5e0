"""``edgecache warm``: pull images through a running mirror so their content is cached.

It walks what containerd would pull: the tag (or digest), an index's platform
manifests (filtered by ``--platform``), then each manifest's config and layers.
Bodies are read and dropped; the mirror keeps them.
"""

from __future__ import annotations

import sys
from urllib.parse import quote

import aiohttp
import orjson

from . import oci
from .oci import platform_matches, split_image

ACCEPT = ", ".join([oci.OCI_INDEX, oci.DOCKER_LIST, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])


class Warmer:
    def __init__(self, session: aiohttp.ClientSession, base: str, ns: str | None, quiet: bool) -> None:
        self.session, self.base, self.ns, self.quiet = session, base.rstrip("/"), ns, quiet
        self.bytes = 0
        self.blobs = 0

    def _url(self, name: str, kind: str, ref: str) -> str:
        url = f"{self.base}/v2/{name}/{kind}/{quote(ref, safe=':')}"
        return url + (f"?ns={quote(self.ns)}" if self.ns else "")

    async def manifest(self, name: str, ref: str) -> tuple[dict[str, object], str]:
        async with self.session.get(self._url(name, "manifests", ref), headers={"Accept": ACCEPT}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{name}:{ref}: manifest answered {r.status}: {body[:200]!r}")
            return orjson.loads(body), r.headers.get("Content-Type", "")

    async def blob(self, name: str, digest: str) -> None:
        async with self.session.get(self._url(name, "blobs", digest)) as r:
            if r.status != 200:
                raise RuntimeError(f"{name}@{digest}: blob answered {r.status}")
            async for chunk in r.content.iter_chunked(1 << 20):
                self.bytes += len(chunk)
        self.blobs += 1
        self.progress(name)

    def progress(self, name: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"\r{name}: {self.blobs} blobs, {self.bytes / 2**20:8.1f} MiB")
            sys.stderr.flush()

    async def image(self, image: str, platforms: list[str]) -> None:
        name, ref = split_image(image)
        doc, media_type = await self.manifest(name, ref)
        manifests = doc.get("manifests")
        if isinstance(manifests, list):
            for desc in manifests:
                if isinstance(desc, dict) and platform_matches(desc, platforms):
                    child, _ = await self.manifest(name, str(desc["digest"]))
                    await self.content(name, child)
        else:
            await self.content(name, doc)
        if not self.quiet:
            sys.stderr.write("\n")

    async def content(self, name: str, manifest: dict[str, object]) -> None:
        descs = [manifest.get("config")] + list(manifest.get("layers") or [])  # type: ignore[call-overload]
        for desc in descs:
            if isinstance(desc, dict) and "digest" in desc:
                await self.blob(name, str(desc["digest"]))


async def warm(base: str, images: list[str], platforms: list[str], ns: str | None, quiet: bool) -> int:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        warmer = Warmer(session, base, ns, quiet)
        failed = 0
        for image in images:
            try:
                await warmer.image(image, platforms)
            except (RuntimeError, aiohttp.ClientError, ValueError) as e:
                print(f"edgecache warm: {e}", file=sys.stderr)
                failed += 1
    print(f"warmed {len(images) - failed}/{len(images)} images: {warmer.blobs} blobs, {warmer.bytes} bytes")
    return 1 if failed else 0
