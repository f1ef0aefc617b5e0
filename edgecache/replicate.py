"""Replication lists: images kept warm in the cache on a schedule (DESIGN §5b).

Each ``[[replicate]]`` entry is pulled through the pull-through policy itself
(tag revalidated when stale, index, platform manifests, configs, layers), so a
new region is warm before its first pull. Progress is in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from . import errors, oci
from .config import Replication
from .metrics import Metrics
from .oci import Digest, Reference
from .pullthrough import PullThrough, Target
from .upstream import ANONYMOUS, UpstreamClient

log = logging.getLogger("edgecache.replicate")

ACCEPT = ", ".join(sorted(oci.MANIFEST_TYPES))


class Replicator:
    def __init__(self, policy: PullThrough, clients: Callable[[], Mapping[str, UpstreamClient]], metrics: Metrics) -> None:
        self.policy, self.clients, self.metrics = policy, clients, metrics  # clients(): the live table (SIGHUP)

    async def run_forever(self, item: Replication) -> None:
        """Replicate now, then every ``interval``; failures are logged and retried next round."""
        while True:
            await self.replicate(item)
            await asyncio.sleep(item.interval)

    async def replicate(self, item: Replication) -> bool:
        started = time.monotonic()
        try:
            blobs = await self._pull(item)
        except (errors.OCIError, ValueError, KeyError, TypeError) as e:
            self.metrics.warm_images.labels("failed").inc()
            log.warning("replication of %s/%s failed: %s", item.upstream, item.image, e)
            return False
        self.metrics.warm_images.labels("ok").inc()
        log.info("replicated %s/%s: %d blobs in %.1fs", item.upstream, item.image, blobs, time.monotonic() - started)
        return True

    async def _pull(self, item: Replication) -> int:
        name, ref = oci.split_image(item.image)
        target = Target(self.clients()[item.upstream], oci.parse_name(name), ANONYMOUS)
        top = await self.policy.manifest(target, Reference.parse(ref), ACCEPT)
        manifests = [top]
        doc = orjson.loads(top.data)
        if top.media_type in oci.INDEX_TYPES:
            for desc in doc.get("manifests", []):
                if oci.platform_matches(desc, item.platforms):
                    child = Reference(digest=Digest.parse(str(desc["digest"])))
                    manifests.append(await self.policy.manifest(target, child, ACCEPT))
        count = 0
        for m in manifests[1:] if top.media_type in oci.INDEX_TYPES else manifests:
            body = orjson.loads(m.data)
            for desc in [body.get("config"), *body.get("layers", [])]:
                if isinstance(desc, dict) and "digest" in desc:
                    await self._blob(target, Digest.parse(str(desc["digest"])))
                    count += 1
        return count

    async def _blob(self, target: Target, digest: Digest) -> None:
        result = await self.policy.blob(target, digest, head=False)
        try:
            if result.source is not None:
                async for _ in result.source.spans(0, None):  # wait for the fill to be verified and committed
                    pass
        finally:
            result.release()
