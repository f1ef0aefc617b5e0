"""OCI error codes and the upstream error family.

Every error a client can see is an :class:`OCIError`; it carries its OCI code
(distribution spec, "Error Codes") and HTTP status, and is rendered to JSON in
one place (:func:`render`). The upstream client maps transport failures into
:class:`UpstreamError` subclasses at its boundary.
"""

from __future__ import annotations

from typing import Any

import orjson


class OCIError(Exception):
    """An error answered to the client as OCI error JSON."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return orjson.dumps({"errors": [err]})


class NameInvalid(OCIError):
    code, status = "NAME_INVALID", 400


class NameUnknown(OCIError):
    code, status = "NAME_UNKNOWN", 404


class DigestInvalid(OCIError):
    code, status = "DIGEST_INVALID", 400


class TagInvalid(OCIError):
    # TAG_INVALID is distribution's own code for a reference outside the grammar.
    code, status = "TAG_INVALID", 400


class ManifestUnknown(OCIError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(OCIError):
    code, status = "BLOB_UNKNOWN", 404


class RangeInvalid(OCIError):
    code, status = "RANGE_INVALID", 416


class Unsupported(OCIError):
    code, status = "UNSUPPORTED", 405


class BadRequest(OCIError):
    code, status = "UNSUPPORTED", 400


class SizeInvalid(OCIError):
    code, status = "SIZE_INVALID", 413


class Unauthorized(OCIError):
    code, status = "UNAUTHORIZED", 401


class Denied(OCIError):
    code, status = "DENIED", 403


class TooManyRequests(OCIError):
    code, status = "TOOMANYREQUESTS", 429


class NotFound(OCIError):
    code, status = "NOT_FOUND", 404


class UpstreamError(OCIError):
    """The upstream failed (5xx, protocol violation): 502."""

    code, status = "UPSTREAM_ERROR", 502


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached or timed out: 503."""

    code, status = "UNAVAILABLE", 503


class DigestMismatch(UpstreamError):
    """The upstream sent bytes that do not hash to the digest asked for."""

    code, status = "DIGEST_INVALID", 502


class ServiceUnavailable(OCIError):
    code, status = "UNAVAILABLE", 503
