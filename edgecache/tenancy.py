"""Tenancy: who may read what is cached (DESIGN.md §4).

Per repository, its visibility (public or private, learnt from upstream answers and one anonymous
probe); per credential, which repositories it was confirmed for (the ``access`` cache, with a TTL).
:class:`Tenancy` decides whether a cached manifest or blob may be served to a :class:`Target`,
asking the upstream only when it must, and with the upstream down, serves only what that credential
was already shown. Owned by :class:`edgecache.pullthrough.PullThrough`.
"""

from __future__ import annotations

from aiocache import BaseCache

from . import errors, oci
from .collapse import SingleFlight
from .metadata import Metadata
from .results import Target, unauthorized, upstream_failure


class Tenancy:
    """Visibility and access checks over the metadata index and the access cache."""

    def __init__(self, metadata: Metadata, access: BaseCache) -> None:
        self.metadata = metadata
        self.access = access  # (upstream, repo, credential key) -> confirmed, with a TTL
        self._probes: SingleFlight[bool | None] = SingleFlight()

    async def remember_access(self, target: Target, path: str) -> None:
        """After an upstream success with ``target``'s credential: record visibility and access."""
        up, repo = target.upstream.name, target.repo
        if target.cfg.auth != "passthrough":
            return
        cred = target.upstream.effective_credential(target.credential)
        if target.cfg.access_ttl > 0:  # as a float: aiocache keeps a ttl of 0 (int("500ms")) forever
            await self.access.set(f"{up}|{repo}|{cred.key}", True, ttl=target.cfg.access_ttl)
        known = await self.metadata.visibility(up, repo)
        if cred.anonymous:
            if known != "public":
                await self.metadata.set_visibility(up, repo, "public", target.cfg.visibility_ttl)
            return
        if known is None:  # never asked, or the answer expired: repositories change visibility
            public = await self._probes.do(f"{up}|{repo}", lambda: self._probe_public(target, path))
            if public is not None:  # an erring probe (429, 5xx, timeout) decides nothing
                await self.metadata.set_visibility(up, repo, "public" if public else "private",
                                                   target.cfg.visibility_ttl)

    async def _probe_public(self, target: Target, path: str) -> bool | None:
        """Would an anonymous client be let in? One HEAD per repository, remembered; None: no answer."""
        from .upstream import ANONYMOUS  # local: the sentinel, not a second client

        anon = Target(target.upstream, target.repo, ANONYMOUS)
        try:
            resp = await anon.upstream.request("HEAD", path, scope=anon.scope, credential=ANONYMOUS)
        except errors.OCIError:
            return None
        resp.release()
        if resp.status == 200:
            return True
        return False if resp.status in (401, 403, 404) else None

    async def authorize_cached(self, target: Target, kind: oci.Kind, digest: str, accept: str | None = None) -> None:
        """Decide whether ``target`` may read cached ``digest``, asking upstream only when we must."""
        up, repo = target.upstream.name, target.repo
        linked = await self.metadata.has_link(up, repo, digest)
        if linked and target.cfg.auth != "passthrough":
            return
        if linked:
            visibility = await self.metadata.visibility(up, repo)
            if visibility == "public":
                return
            cred = target.upstream.effective_credential(target.credential)
            if await self.access.get(f"{up}|{repo}|{cred.key}"):
                return
            if cred.anonymous and visibility == "private":
                raise unauthorized(target)
        path = f"/v2/{repo}/{'blobs' if kind is oci.Kind.BLOB else 'manifests'}/{digest}"  # only asked now
        headers = {"Accept": accept} if accept else {}
        resp = await target.upstream.request("HEAD", path, scope=target.scope, credential=target.credential,
                                             headers=headers)
        resp.release()
        if resp.status != 200:
            if resp.status in (401, 403) and target.cfg.auth == "passthrough" and target.credential.anonymous:
                # Not (or no longer) public: the next anonymous callers are refused without asking.
                await self.metadata.set_visibility(up, repo, "private", target.cfg.visibility_ttl)
            raise upstream_failure(resp, target, kind, digest)
        await self.metadata.add_link(up, repo, digest)
        await self.remember_access(target, path)

    async def authorize_cached_offline(self, target: Target, digest: str) -> None:
        """With upstream down, serve only what this credential was already shown (public, or confirmed)."""
        up, repo = target.upstream.name, target.repo
        if not await self.metadata.has_link(up, repo, digest):  # never seen there: maybe another repo's secret
            if target.cfg.auth == "passthrough":
                raise unauthorized(target, "upstream unavailable and this content was never seen in this repository")
            raise errors.UpstreamUnavailable(f"upstream {up} unavailable and this content was never seen in {repo}",
                                             detail={"upstream": up})
        if target.cfg.auth != "passthrough":
            return
        # Upstream down: the last "public" answer holds a while longer, as stale tags do (max_stale).
        if await self.metadata.visibility(up, repo, stale_ok=target.cfg.max_stale) == "public":
            return
        cred = target.upstream.effective_credential(target.credential)
        if not await self.access.get(f"{up}|{repo}|{cred.key}"):
            raise unauthorized(target, "upstream unavailable and this credential is not confirmed")
