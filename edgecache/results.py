"""The pull-through policy's vocabulary: where a request goes and what the policy answers.

:class:`Target` (upstream, repository, credential), the answers (:class:`ManifestResult`,
:class:`BlobResult`) and how they were made (:class:`Outcome`), and the one mapping of an
upstream status to the OCI error a client sees. Shared by the policy and its collaborators
(:mod:`edgecache.tenancy`, :mod:`edgecache.blobs`); see DESIGN.md §2 (Policy).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import errors, oci
from .collapse import Source
from .config import UpstreamConfig
from .upstream import Credential, UpstreamClient, UpstreamResponse


class Outcome(enum.StrEnum):
    """How an answer was made: its ``X-Cache`` value (a str, used as one on the hot path)."""

    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"
    COLLAPSED = "COLLAPSED"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: the upstream, its repository name there, the client's credential."""

    upstream: UpstreamClient
    repo: str
    credential: Credential

    @property
    def cfg(self) -> UpstreamConfig:
        return self.upstream.cfg

    @property
    def scope(self) -> str:
        return f"repository:{self.repo}:pull"


@dataclass(slots=True)
class ManifestResult:
    digest: str
    media_type: str
    data: bytes
    outcome: Outcome
    fresh_until: float = math.inf  # (policy clock) a tag answer holds until then; by digest: forever

    def fresh_for(self, now: float) -> float:
        """Seconds this answer stays right without asking anyone (0: not at all)."""
        return max(0.0, self.fresh_until - now) if self.outcome is Outcome.HIT else 0.0


@dataclass(slots=True)
class BlobResult:
    digest: str
    size: int | None
    media_type: str
    outcome: Outcome
    fd: int | None = None  # committed file, open (release() closes it): serve with sendfile
    source: Source | None = None  # fill in progress: serve spans as they land
    open_partial: Callable[[], Awaitable[int]] | None = None
    release: Callable[[], None] = field(default=lambda: None)
    direct: UpstreamResponse | None = None  # disk full: relay this upstream body as it comes


def unauthorized(target: Target, message: str = "authentication required") -> errors.OCIError:
    err = errors.Unauthorized(message, detail={"upstream": target.upstream.name, "repository": target.repo})
    err.challenge = target.upstream.name  # type: ignore[attr-defined]  # the edge words it for the client
    return err


def upstream_failure(resp: UpstreamResponse, target: Target, kind: oci.Kind, ref: str) -> errors.OCIError:
    """Map an upstream status to the OCI error the client sees."""
    detail = {"upstream": target.upstream.name, "repository": target.repo, "reference": ref}
    if resp.status == 401:
        return unauthorized(target)
    if resp.status == 403:
        return errors.Denied("access denied by upstream", detail=detail)
    if resp.status == 404:
        if kind is oci.Kind.BLOB:
            return errors.BlobUnknown("blob unknown to upstream", detail=detail)
        return errors.ManifestUnknown("manifest unknown to upstream", detail=detail)
    if resp.status == 429:
        headers = {"Retry-After": resp.headers["Retry-After"]} if "Retry-After" in resp.headers else {}
        return errors.TooManyRequests(f"upstream {target.upstream.name} rate limit", detail=detail, headers=headers)
    return errors.UpstreamError(f"upstream {target.upstream.name} answered {resp.status}", detail=detail)
