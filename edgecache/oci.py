"""The OCI distribution vocabulary: grammar, parsed request values, media types.

This is the only module that knows the spec's grammar (distribution-spec
"Pulling manifests" and opencontainers/image-spec descriptor.md#digests).
Everything below the edge receives the frozen values defined here, never a
raw path, and a digest is validated before it can become a file name.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import errors

# distribution-spec: <name> components, joined by "/".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# Only the registered algorithms we can verify, lowercase hex (image-spec).
DIGEST_RE = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
MAX_NAME_LENGTH = 255
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_V1_SIGNED})
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_text", f"{self.algorithm}:{self.hex}")  # str() is on every hot path

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = DIGEST_RE.fullmatch(text)
        if m is None:
            raise errors.DigestInvalid("invalid digest", detail={"digest": text[:200]})
        algo, hexpart = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return cls(algo, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return self._text


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if ":" in text:
            return cls(digest=Digest.parse(text))
        if TAG_RE.fullmatch(text) is None:
            raise errors.TagInvalid("invalid tag", detail={"tag": text[:200]})
        return cls(tag=text)

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def parse_name(text: str) -> str:
    if len(text) > MAX_NAME_LENGTH or NAME_RE.fullmatch(text) is None:
        raise errors.NameInvalid("invalid repository name", detail={"name": text[:300]})
    return text


class Kind(enum.StrEnum):
    """Which API endpoint a /v2/ path addresses (a str: hashed and compared as one on the hot path)."""

    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


@dataclass(frozen=True, slots=True)
class ApiPath:
    """A parsed /v2/ path: the name still carries any routing prefix."""

    kind: Kind
    name: str = ""
    reference: Reference | None = None

    @property
    def digest(self) -> Digest | None:
        return self.reference.digest if self.reference else None

    @property
    def route(self) -> str:
        """Low-cardinality route pattern for logs and metrics."""
        return _ROUTES[self.kind]


_ROUTES = {
    Kind.BASE: "/v2/",
    Kind.MANIFEST: "/v2/{name}/manifests/{reference}",
    Kind.BLOB: "/v2/{name}/blobs/{digest}",
    Kind.TAGS: "/v2/{name}/tags/list",
    Kind.REFERRERS: "/v2/{name}/referrers/{digest}",
}
_SAFE_PATH = re.compile(r"[A-Za-z0-9._:/-]*")


@functools.lru_cache(maxsize=4096)
def parse_path(raw_path: str) -> ApiPath:
    """Parse the raw (undecoded) request path of a /v2/ request.

    Percent-encoding never appears in a valid name, tag or digest, so any ``%``
    (and so any encoded slash or dot-dot) is refused before decoding. The values are
    frozen, so parses are memoised (the same few paths are asked for over and over);
    refused paths raise and are not kept.
    """
    if raw_path in ("/v2", "/v2/"):
        return ApiPath(Kind.BASE)
    if not raw_path.startswith("/v2/") or _SAFE_PATH.fullmatch(raw_path) is None:
        raise errors.NameInvalid("invalid path", detail={"path": raw_path[:300]})
    rest = raw_path[4:]
    if rest.endswith("/tags/list"):
        return ApiPath(Kind.TAGS, parse_name(rest[: -len("/tags/list")]))
    for marker, kind in (("/manifests/", Kind.MANIFEST), ("/blobs/", Kind.BLOB), ("/referrers/", Kind.REFERRERS)):
        name, sep, ref = rest.rpartition(marker)
        if not sep:
            continue
        if "/" in ref or not name:
            continue
        name = parse_name(name)
        if kind is Kind.MANIFEST:
            return ApiPath(kind, name, Reference.parse(ref))
        return ApiPath(kind, name, Reference(digest=Digest.parse(ref)))
    raise errors.NotFound("no such endpoint", detail={"path": raw_path[:300]})


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One satisfiable byte range, ``start`` to ``end`` inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """A parsed ``Range: bytes=`` header, not yet resolved against a size.

    ``first`` is None for a suffix range (``bytes=-N``), ``last`` is None for an
    open-ended one (``bytes=N-``). ``multi`` marks a multi-range request, which we
    answer with the whole representation (RFC 9110 §14.2 lets a server ignore
    Range), so that clients fall back to an ordinary download.
    """

    first: int | None
    last: int | None
    multi: bool = False

    def resolve(self, size: int) -> ByteRange | None:
        """The range for a representation of ``size`` bytes, None for "whole"."""
        if self.multi:
            return None
        if self.first is None:
            assert self.last is not None
            if self.last == 0 or size == 0:
                raise _unsatisfiable(size)
            return ByteRange(max(0, size - self.last), size - 1)
        if self.first >= size:
            raise _unsatisfiable(size)
        end = size - 1 if self.last is None else min(self.last, size - 1)
        return ByteRange(self.first, end)


def _unsatisfiable(size: int) -> errors.OCIError:
    return errors.RangeInvalid("range not satisfiable", headers={"Content-Range": f"bytes */{size}"})


_RANGE_ONE = re.compile(r"(\d{0,19})-(\d{0,19})")


def parse_range(header: str | None) -> RangeSpec | None:
    """Parse a Range header (RFC 9110 §14.1.2); None when absent."""
    if header is None:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes":
        raise errors.RangeInvalid("invalid range", detail={"range": header[:200]})
    parts = [p.strip() for p in spec.split(",")]
    parsed = [_parse_one(p, header) for p in parts]
    if len(parsed) > 1:
        return RangeSpec(parsed[0].first, parsed[0].last, multi=True)
    return parsed[0]


def _parse_one(part: str, header: str) -> RangeSpec:
    m = _RANGE_ONE.fullmatch(part)
    if m is None or (not m.group(1) and not m.group(2)):
        raise errors.RangeInvalid("invalid range", detail={"range": header[:200]})
    if not m.group(1):
        return RangeSpec(None, int(m.group(2)))
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else None
    if last is not None and last < first:
        raise errors.RangeInvalid("invalid range", detail={"range": header[:200]})
    return RangeSpec(first, last)


def accept_key(accept: str) -> str:
    """Normalise an Accept list to the set of manifest types it admits.

    A tag resolves to different documents under different Accept lists (an
    index for a modern client, a single manifest for an old one), so the tag
    cache keys on this. ``*/*`` or no Accept admits everything.
    """
    types = {t.split(";")[0].strip().lower() for t in accept.split(",") if t.strip()}
    if not types or "*/*" in types:
        return "*"
    known = sorted(types & MANIFEST_TYPES)
    return ",".join(known) if known else "*"


def accepts(accept_key_value: str, media_type: str) -> bool:
    return accept_key_value == "*" or media_type in accept_key_value.split(",")


def split_image(image: str) -> tuple[str, str]:
    """``name[:tag|@digest]`` to (name, reference); tag defaults to ``latest``."""
    if "@" in image:
        name, _, ref = image.partition("@")
        return name, ref
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:]
    return image, "latest"


def platform_matches(desc: dict[str, object], platforms: Iterable[str]) -> bool:
    wanted = list(platforms)
    if not wanted:
        return True
    p = desc.get("platform")
    if not isinstance(p, dict):
        return False
    value = f"{p.get('os')}/{p.get('architecture')}" + (f"/{p['variant']}" if p.get("variant") else "")
    return any(value == w or value.startswith(w + "/") for w in wanted)
