"""What the edge learns about one request, for the access log, metrics and error rendering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from .oci import ApiPath


@dataclass(slots=True)
class RequestInfo:
    request_id: str = ""
    api: ApiPath | None = None
    upstream: str | None = None
    repository: str | None = None
    cache: str | None = None  # X-Cache outcome
    bytes: int = 0
    error: str | None = None


INFO = web.RequestKey("edgecache_info", RequestInfo)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The edge around a route's handler: (handler, route label for metrics, methods allowed or None for any).
Wrap = Callable[[Handler, str, "tuple[str, ...] | None"], Handler]


def info(request: web.Request) -> RequestInfo:
    """The request's record (the edge middleware creates it first thing)."""
    try:
        return request[INFO]
    except KeyError:
        found = request[INFO] = RequestInfo()
        return found
