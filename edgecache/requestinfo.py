"""What the edge learns about one request (for the access log, metrics and error rendering), and the
headers every answer carries."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from .oci import ApiPath


@dataclass(slots=True)
class RequestInfo:
    app: web.Application  # the application answering (its collaborators, by key)
    request_id: str = ""
    api: ApiPath | None = None
    upstream: str | None = None
    repository: str | None = None
    cache: str | None = None  # X-Cache outcome
    bytes: int = 0  # body bytes sent
    source: str | None = None  # where they came from (cache, upstream): counted by the edge as served bytes
    error: str | None = None


INFO = web.RequestKey("edgecache_info", RequestInfo)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The edge around a route's handler: (handler, route label for metrics, methods allowed or None for any).
Wrap = Callable[[Handler, str, "tuple[str, ...] | None"], Handler]


def info(request: web.BaseRequest) -> RequestInfo:
    """The request's record (the edge wrapper creates it first thing, for every request)."""
    return request[INFO]


def stamp(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """The headers every answer carries, set before its headers go out: by the edge wrapper on the
    answers handlers return, by :func:`edgecache.send.start_stream` on the ones they stream."""
    ri = request[INFO]
    headers = response.headers
    headers["X-Request-Id"] = ri.request_id
    if "X-Cache" not in headers and request.raw_path.startswith("/v2"):
        headers["X-Cache"] = ri.cache or "MISS"
