"""Sending blob bodies to the client: the part of the HTTP edge that streams.

A hit is sent from the committed file's descriptor (sendfile; Range, If-Range, If-None-Match;
pieces read in a thread under TLS); a fill in progress as spans of the growing file as they land;
a disk-full miss or a far Range relayed from the upstream as it comes. Once headers are out the
only honest failure is a cut connection. Called by :mod:`edgecache.routes` with what the policy
decided; part of the HTTP edge (see routes).
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from . import errors, oci
from .collapse import FlightFailed
from .pullthrough import BlobResult, PullThrough, Target
from .requestinfo import info, stamp
from .upstream import UpstreamResponse

SPAN_READ = 1 << 20


async def start_stream(request: web.BaseRequest, resp: web.StreamResponse) -> None:
    """Send a streamed answer's headers, with the ones every answer carries."""
    stamp(request, resp)
    await resp.prepare(request)


async def send_file(request: web.BaseRequest, result: BlobResult, rng: oci.RangeSpec | None,
                    headers: dict[str, str]) -> web.StreamResponse:
    """A hit: the committed file's descriptor, sent with sendfile (Range, If-Range, If-None-Match).

    The strong validator is the digest itself: the bytes behind a digest never change.
    """
    assert result.fd is not None and result.size is not None
    size = result.size
    etag = f'"{result.digest}"'
    headers["ETag"] = etag
    ri = info(request)
    ri.bytes = 0
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and _etag_listed(if_none_match, etag):
        return web.Response(status=304, headers=headers)
    if rng is not None:
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            rng = None  # the client's copy is of something else: send the whole blob
    start, length, status = 0, size, 200
    if rng is not None:
        byte_range = rng.resolve(size)  # None for multi-range: the whole blob (RFC 9110 allows it)
        if byte_range is not None:
            start, length, status = byte_range.start, byte_range.length, 206
            headers["Content-Range"] = byte_range.content_range(size)
    if request.method == "HEAD":
        headers["Content-Length"] = str(length)
        return web.Response(status=status, headers=headers)
    ri.bytes, ri.source = length, "cache"
    transport = request.transport
    if transport is not None and transport.get_extra_info("sslcontext") is not None:
        return await _send_file_tls(request, result.fd, start, length, status, headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    sender = SpanSender(request, resp, result.fd, owns_fd=False)
    try:
        await start_stream(request, resp)
        if length:
            await sender.send(start, length)
    except ConnectionError:
        ri.error = "client disconnected"
        return resp
    finally:
        sender.close()
    await resp.write_eof()
    return resp


def _etag_listed(header: str, etag: str) -> bool:
    """If-None-Match: ``*`` or a list of entity tags (weak comparison, RFC 9110 §13.1.2)."""
    if header.strip() == "*":
        return True
    return any(t.strip().removeprefix("W/") == etag for t in header.split(","))


async def send_flight(request: web.BaseRequest, result: BlobResult, rng: oci.RangeSpec | None,
                      headers: dict[str, str]) -> web.StreamResponse:
    """A fill in progress: stream spans of the growing file as they land; cut the stream on failure."""
    assert result.source is not None and result.open_partial is not None
    start, end, status = 0, None, 200
    if rng is not None and result.size is not None:
        byte_range = rng.resolve(result.size)
        if byte_range is not None:
            start, end, status = byte_range.start, byte_range.end, 206
            headers["Content-Range"] = byte_range.content_range(result.size)
    resp = web.StreamResponse(status=status, headers=headers)
    if result.size is not None:
        resp.content_length = (end - start + 1) if end is not None else result.size - start
    fd = await result.open_partial()
    sender = SpanSender(request, resp, fd)
    sent = 0
    try:
        await start_stream(request, resp)
        async for offset, count in result.source.spans(start, end):
            data = result.source.memory(offset, count)
            if data is not None:  # disk full: straight through from memory
                await resp.write(data)
            else:
                await sender.send(offset, count)
            sent += count
    except (FlightFailed, errors.OCIError) as e:
        info(request).error = str(e)
        _cut(request)
        return resp
    except ConnectionError:  # the client went away; the fill goes on without it
        info(request).error = "client disconnected"
        return resp
    finally:
        sender.close()
        ri = info(request)
        ri.bytes, ri.source = sent, "upstream"
    await resp.write_eof()
    return resp


async def relay(request: web.BaseRequest, result: BlobResult, headers: dict[str, str]) -> web.StreamResponse:
    """Disk full: the upstream body straight to the client (a short body is cut, never padded)."""
    assert result.direct is not None
    return await _stream_upstream(request, result.direct, 200, result.size, headers)


async def send_direct(request: web.BaseRequest, policy: PullThrough, target: Target, digest: oci.Digest,
                      byte_range: oci.ByteRange, size: int, headers: dict[str, str]) -> web.StreamResponse:
    """A range far beyond the download position: relay it from upstream directly."""
    upstream = await policy.direct_range(target, digest, byte_range.start, byte_range.end)
    headers["Content-Range"] = byte_range.content_range(size)
    try:
        return await _stream_upstream(request, upstream, 206, byte_range.length, headers)
    finally:
        upstream.release()


async def _stream_upstream(request: web.BaseRequest, upstream: UpstreamResponse, status: int, length: int | None,
                           headers: dict[str, str]) -> web.StreamResponse:
    """Relay an upstream body as it comes; an interrupted one cuts the client's connection."""
    resp = web.StreamResponse(status=status, headers=headers)
    if length is not None:
        resp.content_length = length
    sent = 0
    try:
        await start_stream(request, resp)
        async for chunk in upstream.iter_chunks():
            await resp.write(chunk)
            sent += len(chunk)
    except errors.OCIError as e:
        info(request).error = e.code
        _cut(request)
        return resp
    except ConnectionError:
        info(request).error = "client disconnected"
        return resp
    finally:
        ri = info(request)
        ri.bytes, ri.source = sent, "upstream"
    await resp.write_eof()
    return resp


def _cut(request: web.BaseRequest) -> None:
    """Headers are sent: the only honest failure is a cut connection (never a short body that looks whole)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


TLS_READ = 4 << 20


async def _send_file_tls(request: web.BaseRequest, fd: int, start: int, length: int, status: int,
                         headers: dict[str, str]) -> web.StreamResponse:
    """Under TLS there is no sendfile: read big pieces in a thread and write them (asyncio's
    sendfile fallback moves 256 KiB at a time through the SSL transport, several times slower)."""
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    loop = asyncio.get_running_loop()
    try:
        await start_stream(request, resp)
        pos, end = start, start + length
        while pos < end:
            data = await loop.run_in_executor(None, os.pread, fd, min(TLS_READ, end - pos), pos)
            if not data:
                raise errors.UpstreamError("cached file shrank")
            await resp.write(data)
            pos += len(data)
    except ConnectionError:
        return resp
    await resp.write_eof()
    return resp


class SpanSender:
    """Writes file spans to the client: zero-copy ``loop.sendfile`` where the loop and transport allow it."""

    def __init__(self, request: web.BaseRequest, resp: web.StreamResponse, fd: int, owns_fd: bool = True) -> None:
        self.request, self.resp, self.fd = request, resp, fd
        self.file = os.fdopen(fd, "rb", buffering=0, closefd=owns_fd)  # close() closes the fd if owned
        transport = request.transport
        # sendfile writes raw bytes: not under TLS, and not into a chunked body (no length known)
        self.zero_copy = (transport is not None and transport.get_extra_info("sslcontext") is None
                          and resp.content_length is not None)

    async def send(self, offset: int, count: int) -> None:
        loop = asyncio.get_running_loop()
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        if self.zero_copy:
            try:
                await loop.sendfile(transport, self.file, offset, count, fallback=False)
                return
            except (NotImplementedError, RuntimeError):
                self.zero_copy = False  # uvloop, TLS: copy through Python instead
        end = offset + count
        while offset < end:
            data = await loop.run_in_executor(None, os.pread, self.fd, min(SPAN_READ, end - offset), offset)
            if not data:
                raise errors.UpstreamError("partial file shrank")
            await self.resp.write(data)
            offset += len(data)

    def close(self) -> None:
        self.file.close()

