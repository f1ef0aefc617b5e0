"""The HTTP edge: parse and validate, route to an upstream, answer from the policy.

Owns the dispatcher, routing (:class:`Router`), manifest answers, listings, the token endpoint
and the health and metrics endpoints; blob bodies are sent by :mod:`edgecache.send`.
The only module (with :mod:`edgecache.middleware` and :mod:`edgecache.send`) that uses ``aiohttp.web``.
Nothing below it sees a raw path: requests become :class:`~edgecache.oci.ApiPath`
values and a :class:`~edgecache.pullthrough.Target`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import time
from collections.abc import Awaitable, Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from . import errors, oci
from .answers import MEMO_SECONDS, Answer, AnswerMemo, MemoKey
from .requestinfo import INFO, Handler, RequestInfo, Wrap, info
from .pullthrough import Outcome, PullThrough, Target
from .send import relay, send_direct, send_file, send_flight
from .upstream import Credential, UpstreamClient

# containerd's ns= is a registry host, optionally with a port.
_NS_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*(?::[0-9]{1,5})?")
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_PASSED_HEADERS = ("Content-Type", "Link", "OCI-Filters-Applied", "Docker-Content-Digest")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


class Router:
    """Chooses the upstream: ``?ns=``, then a path prefix, then the default (DESIGN §2 Routing)."""

    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        self.clients = dict(clients)
        self.by_ns = {ns: c for c in clients.values() for ns in c.cfg.namespaces}
        self.by_prefix = {c.cfg.prefix: c for c in clients.values() if c.cfg.prefix}
        self.default = next((c for c in clients.values() if c.cfg.default), None)
        self._memo: dict[tuple[str | None, str], tuple[UpstreamClient, str]] = {}
        self.answers = AnswerMemo()  # a new routing table (config reload) starts with none

    def upstream_for(self, ns: str | None, name: str) -> tuple[UpstreamClient, str]:
        """The upstream and the repository name there; unknown keys dial nothing. Memoised (a router
        is rebuilt when the config is reloaded); refusals are not kept."""
        key = (ns, name)
        found = self._memo.get(key)
        if found is None:
            found = self._route(ns, name)
            if len(self._memo) >= 4096:
                self._memo.clear()
            self._memo[key] = found
        return found

    def _route(self, ns: str | None, name: str) -> tuple[UpstreamClient, str]:
        if ns is not None:
            if _NS_RE.fullmatch(ns) is None:
                raise errors.NameInvalid("invalid ns parameter", detail={"ns": ns[:200]})
            client = self.by_ns.get(ns)
            if client is None:
                raise errors.NameUnknown(f"namespace {ns!r} is not configured on this mirror", detail={"ns": ns})
        else:
            first, sep, rest = name.partition("/")
            client = self.by_prefix.get(first) if sep else None
            if client is not None:
                name = rest
            elif self.default is not None:
                client = self.default
            else:
                raise errors.NameUnknown(f"no upstream for {name!r}: no ns, no known prefix and no default upstream",
                                         detail={"name": name})
        return client, client.cfg.repository(name)

    def upstream_for_base(self, ns: str | None, name: str | None = None) -> UpstreamClient | None:
        if ns is not None:
            return self.upstream_for(ns, "x")[0]
        if name and name in self.by_prefix:
            return self.by_prefix[name]
        return self.default


def target_for(request: web.BaseRequest, router: Router, api: oci.ApiPath, ns: str | None) -> Target:
    client, repo = router.upstream_for(ns, api.name)
    ri = info(request)
    ri.upstream, ri.repository = client.name, repo
    check_policy(client, repo)
    credential = Credential.from_header(request.headers.get("Authorization"))
    return Target(client, repo, credential)


def check_policy(client: UpstreamClient, repo: str) -> None:
    """Allow and deny rules (DESIGN §5b), decided before any upstream request."""
    for pattern in client.cfg.deny:
        if fnmatch.fnmatchcase(repo, pattern):
            raise errors.Denied(f"repository {repo!r} is denied by rule deny={pattern!r} of upstream {client.name}",
                                detail={"rule": f"deny:{pattern}"})
    if client.cfg.allow and not any(fnmatch.fnmatchcase(repo, p) for p in client.cfg.allow):
        raise errors.Denied(f"repository {repo!r} is not in the allow list of upstream {client.name}",
                            detail={"rule": "allow"})


def _ctx(request: web.BaseRequest) -> "EdgeContext":
    return request[INFO].app[CTX]


def _common_headers(request: web.BaseRequest, target: Target, outcome: Outcome) -> dict[str, str]:
    info(request).cache = outcome
    _ctx(request).policy.answered(outcome)
    h = {"X-Cache": outcome, **API_VERSION}
    if target.cfg.namespaces:
        h["OCI-Namespace"] = target.cfg.namespaces[0]
    return h


async def handle_v2(request: web.BaseRequest) -> web.StreamResponse:
    """Every ``/v2/...`` request."""
    path, _, query = request.raw_path.partition("?")
    ri = info(request)
    ctx = _ctx(request)
    router = ctx.router  # one routing table for the whole request, even across a reload
    ns = request.query.get("ns") if query else None
    method = request.method
    key: MemoKey | None = None
    if "/manifests/" in path and (method == "GET" or method == "HEAD"):
        # A replayed answer first: its key holds everything the answer depends on (see AnswerMemo).
        headers = request.headers
        key = (path, ns, ",".join(headers.getall("Accept", ())), headers.get("Authorization", ""))
        policy = ctx.policy
        answer = router.answers.get(key, time.monotonic(), policy.clock(), policy.generation)
        if answer is not None:
            policy.answered(Outcome.HIT, answer.digest)
            ri.api, ri.upstream, ri.repository, ri.cache = answer.api, answer.upstream, answer.repository, Outcome.HIT
            return _document(request, ri, ctx, answer.headers, answer.body, "cache")
    api = ri.api = oci.parse_path(path)
    if method not in ("GET", "HEAD"):
        raise errors.Unsupported("this mirror serves the pull API only (GET and HEAD)")
    if api.kind is oci.Kind.BASE:
        return await _base(request, ctx)
    if api.kind is oci.Kind.MANIFEST:
        assert key is not None
        return await _manifest(request, ctx.policy, router, target_for(request, router, api, ns), api, key)
    target = target_for(request, router, api, ns)
    if api.kind is oci.Kind.BLOB:
        assert api.digest is not None
        return await _blob(request, ctx.policy, target, api.digest)
    if api.kind is oci.Kind.TAGS:
        return await _passthrough(request, target, f"/v2/{target.repo}/tags/list", _tags_query(request))
    assert api.digest is not None
    return await _passthrough(request, target, f"/v2/{target.repo}/referrers/{api.digest}", _referrers_query(request))


async def _base(request: web.BaseRequest, ctx: "EdgeContext") -> web.StreamResponse:
    """``/v2/``: 200, or the passthrough challenge pointing at our token endpoint."""
    client = ctx.router.upstream_for_base(request.query.get("ns"))
    info(request).cache = Outcome.MISS
    headers = {"X-Cache": "MISS", **API_VERSION}
    if (client is not None and client.cfg.auth == "passthrough" and "Authorization" not in request.headers
            and await client.challenge_params()):
        err = errors.Unauthorized("authentication required", detail={"upstream": client.name})
        err.challenge = client.name  # type: ignore[attr-defined]
        err.headers.update(headers)
        raise err
    return web.json_response({}, headers=headers)


async def _manifest(request: web.BaseRequest, policy: PullThrough, router: Router, target: Target, api: oci.ApiPath,
                    key: MemoKey) -> web.StreamResponse:
    assert api.reference is not None
    accept = key[2]
    generation = policy.generation
    result = await policy.manifest(target, api.reference, accept)
    if api.reference.tag is not None and not oci.accepts(oci.accept_key(accept), result.media_type):
        raise errors.ManifestUnknown("manifest unknown: no stored media type is acceptable",
                                     detail={"accept": accept[:300]})
    headers = _common_headers(request, target, result.outcome)
    headers.update({"Docker-Content-Digest": result.digest, "Content-Type": result.media_type, "ETag": f'"{result.digest}"'})
    ctx = _ctx(request)
    now = policy.clock()
    fresh_for = min(MEMO_SECONDS, result.fresh_for(now))
    if fresh_for > 0 and policy.memoisable(target):
        router.answers.put(key, Answer(time.monotonic() + fresh_for, now + fresh_for, generation, dict(headers),
                                       result.data, result.digest, api, target.upstream.name, target.repo))
    source = "cache" if result.outcome is Outcome.HIT else "upstream"
    return _document(request, info(request), ctx, headers, result.data, source)


def _document(request: web.BaseRequest, ri: RequestInfo, ctx: "EdgeContext", headers: dict[str, str], body: bytes,
              source: str) -> web.StreamResponse:
    """A manifest answer, decided now or replayed: HEAD gets the length and no body."""
    if request.method == "HEAD":
        ri.bytes = 0
        return web.Response(status=200, headers={**headers, "Content-Length": str(len(body))})
    ri.bytes, ri.source = len(body), source
    return web.Response(status=200, body=body, headers=headers)


async def _blob(request: web.BaseRequest, policy: PullThrough, target: Target, digest: oci.Digest) -> web.StreamResponse:
    rng = oci.parse_range(request.headers.get("Range"))
    result = await policy.blob(target, digest, head=request.method == "HEAD")
    try:
        headers = _common_headers(request, target, result.outcome)
        headers.update({"Docker-Content-Digest": result.digest, "Content-Type": oci.OCTET_STREAM,
                        "Accept-Ranges": "bytes"})
        if result.fd is not None:
            return await send_file(request, result, rng, headers)
        if request.method == "HEAD" or (result.source is None and result.direct is None):
            if result.size is not None:
                headers["Content-Length"] = str(result.size)
            info(request).bytes = 0
            return web.Response(status=200, headers=headers)
        if result.direct is not None:
            return await relay(request, result, headers)
        byte_range = rng.resolve(result.size) if rng is not None and result.size is not None else None
        if byte_range is not None and policy.far_ahead(result, byte_range.start):
            return await send_direct(request, policy, target, digest, byte_range, result.size or 0, headers)
        return await send_flight(request, result, rng, headers)
    finally:
        result.release()


def _tags_query(request: web.BaseRequest) -> dict[str, str]:
    q: dict[str, str] = {}
    n = request.query.get("n")
    if n is not None:
        if not n.isdigit() or len(n) > 6:
            raise errors.BadRequest("invalid n parameter", detail={"n": n[:50]})
        q["n"] = n
    last = request.query.get("last")
    if last is not None:
        if oci.TAG_RE.fullmatch(last) is None:
            raise errors.TagInvalid("invalid last parameter", detail={"last": last[:200]})
        q["last"] = last
    return q


def _referrers_query(request: web.BaseRequest) -> dict[str, str]:
    artifact_type = request.query.get("artifactType")
    if artifact_type is None:
        return {}
    if _MEDIA_TYPE_RE.fullmatch(artifact_type) is None:
        raise errors.BadRequest("invalid artifactType parameter", detail={"artifactType": artifact_type[:200]})
    return {"artifactType": artifact_type}


async def _passthrough(request: web.BaseRequest, target: Target, path: str, query: dict[str, str]) -> web.StreamResponse:
    """Tags list and referrers: answered by the upstream, headers that matter passed back."""
    kind = oci.Kind.TAGS if path.endswith("/tags/list") else oci.Kind.REFERRERS
    body, passed = await _ctx(request).policy.listing(
        target, kind, path, query, request.headers.get("Accept", "application/json"), _PASSED_HEADERS)
    headers = _common_headers(request, target, Outcome.MISS)
    headers.update(passed)
    if "Link" in headers:
        headers["Link"] = _rewrite_link(request, target, headers["Link"])
    info(request).bytes = len(body)
    return web.Response(status=200, body=body, headers=headers)


def _rewrite_link(request: web.BaseRequest, target: Target, link: str) -> str:
    """Point a pagination Link at the name the client used (prefix, ns)."""
    m = re.match(r"<([^>]*)>(.*)", link)
    if m is None:
        return link
    url, rest = m.group(1), m.group(2)
    path, _, query = url.partition("?")
    api = info(request).api
    assert api is not None
    client_path = path.replace(f"/v2/{target.repo}/", f"/v2/{api.name}/", 1)
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    if "ns" in request.query:
        params["ns"] = request.query["ns"]
    return f"<{client_path}?{urlencode(params, safe=':/%')}>{rest}"


async def handle_token(request: web.BaseRequest) -> web.StreamResponse:
    """Our token endpoint (passthrough): relay the client's credentials to the upstream realm."""
    ctx = _ctx(request)
    name = request.raw_path.partition("?")[0][len(TOKEN_PATH):]  # one plain segment (the dispatcher checked)
    client = ctx.router.clients.get(name)
    if client is None or client.cfg.auth != "passthrough":
        raise errors.NameUnknown(f"no passthrough upstream named {name!r}", detail={"upstream": name})
    query = {k: v for k, v in request.query.items() if k in ("account", "client_id", "offline_token")}
    ns = request.query.get("ns")  # set by our own challenge when the client routed with ns=
    scopes = request.query.getall("scope", [])
    if scopes:
        query["scope"] = _translate_scopes(ctx.router, client, ns, " ".join(scopes))
    form: dict[str, str] | None = None
    if request.method == "POST":
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as aiohttp's router would
            request.writer.output_size = 0  # the interim answer is not part of the answer's size
        raw = await request.post()
        form = {k: str(v) for k, v in raw.items() if isinstance(v, str)}
        if "scope" in form:
            form["scope"] = _translate_scopes(ctx.router, client, ns, form["scope"])
    status, body = await ctx.policy.relay_token(client, request.method, query, form,
                                                request.headers.get("Authorization"))
    info(request).upstream = client.name
    if status == 401:
        raise errors.Unauthorized("credentials refused by the upstream token server", detail={"upstream": name})
    if status != 200:
        raise errors.UpstreamError(f"upstream {name} token server answered {status}", detail={"upstream": name})
    return web.Response(status=200, body=body, content_type="application/json")


def _translate_scopes(router: Router, client: UpstreamClient, ns: str | None, scopes: str) -> str:
    """Space-separated scopes in the client's naming to the upstream's: each repository name goes
    through the same routing as a ``/v2/`` request with this ``ns`` (so a prefix is stripped once,
    and only without ``ns``); a name that would route to another upstream is dropped, not relayed."""
    out = []
    for scope in scopes.split(" "):
        parts = scope.split(":")
        if len(parts) < 3 or parts[0] != "repository":
            out.append(scope)
            continue
        try:
            routed, repo = router.upstream_for(ns, ":".join(parts[1:-1]))
        except errors.OCIError:
            continue
        if routed is client:
            out.append(f"repository:{repo}:pull")
    return " ".join(s for s in out if s)


async def handle_healthz(request: web.BaseRequest) -> web.StreamResponse:
    return web.json_response({"status": "ok", "pid": os.getpid()})  # pid: which worker answered


async def handle_readyz(request: web.BaseRequest) -> web.StreamResponse:
    ctx = _ctx(request)
    problems = await ctx.readiness()
    if problems:
        return web.json_response({"status": "unready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def handle_metrics(request: web.BaseRequest) -> web.StreamResponse:
    ctx = _ctx(request)
    ctx.refresh_gauges()
    ctx.metrics.flush()
    body = await asyncio.get_running_loop().run_in_executor(None, ctx.metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


class EdgeContext:
    """What the edge needs, assembled by :func:`edgecache.app.create_app`."""

    def __init__(self, router: Router, policy: PullThrough, metrics: Any, readiness: Any, refresh: Any) -> None:
        self.router = router
        self.policy = policy
        self.metrics = metrics
        self.readiness = readiness
        self.refresh_gauges = refresh


CTX = web.AppKey("edge", EdgeContext)


async def handle_unmatched(request: web.BaseRequest) -> web.StreamResponse:
    raise errors.NotFound("not found")



_READ = ("GET", "HEAD")


TOKEN_PATH = "/_edgecache/token/"


def make_dispatch(wrap: Wrap) -> Handler:
    """The server's one handler: every path, known or not, goes through ``wrap`` (the edge: errors,
    request id, metrics, access log) to its handler.

    Paths are matched on the raw (undecoded) path, one spelling only: a percent-encoded alias of
    a route is not that route (``/v2/`` refuses ``%`` itself). A handler takes every method and the
    wrapper refuses the others, so a wrong method is an OCI 405; an unknown path is an OCI 404
    labelled ``unmatched``. Our own dispatch instead of aiohttp's URL router: its per-request path
    walk cost more than a whole replayed manifest answer (measured in loadtests/).
    """
    v2 = wrap(handle_v2, "/v2/invalid", None)  # methods: handle_v2 answers the pull API's own error
    token = wrap(handle_token, "/_edgecache/token/{upstream}", ("GET", "POST"))
    unmatched = wrap(handle_unmatched, "unmatched", None)
    fixed = {"/v2": v2,
             "/healthz": wrap(handle_healthz, "/healthz", _READ),
             "/readyz": wrap(handle_readyz, "/readyz", _READ),
             "/metrics": wrap(handle_metrics, "/metrics", _READ)}

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        path = request.raw_path
        if path.startswith("/v2/"):
            return v2(request)
        path = path.partition("?")[0]
        handler = fixed.get(path)
        if handler is None:
            name = path[len(TOKEN_PATH):] if path.startswith(TOKEN_PATH) else ""
            if name and "/" not in name and "%" not in name:  # one spelling only, as for /v2/
                handler = token
            else:
                handler = unmatched
        return handler(request)

    return dispatch

