"""The spec grammar: names, references, digests, ranges, Accept keys."""

from __future__ import annotations

import pytest

from edgecache import errors, oci

HEX = "a" * 64


@pytest.mark.parametrize("name", ["a", "library/alpine", "a/b/c", "foo.bar/baz_qux", "a__b", "a---b", "x" * 255])
def test_valid_names(name: str) -> None:
    assert oci.parse_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "a/", "/a", "a//b", "a_", "-a", "a..b", "a/../b", "x" * 256, "a b", "a___b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(errors.NameInvalid):
        oci.parse_name(name)


def test_digest_round_trip() -> None:
    d = oci.Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")
    assert str(oci.Digest.parse("sha512:" + "b" * 128)) == "sha512:" + "b" * 128
    assert oci.Digest.of(b"") == oci.Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize("text", ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256:",
                                  "sha512:" + "a" * 64, "sha256:" + "a" * 64 + "\n", "sha256:../" + "a" * 61])
def test_invalid_digests(text: str) -> None:
    with pytest.raises(errors.DigestInvalid):
        oci.Digest.parse(text)


def test_parse_paths() -> None:
    assert oci.parse_path("/v2/").kind is oci.Kind.BASE
    p = oci.parse_path("/v2/library/alpine/manifests/3.19")
    assert (p.kind, p.name, p.reference) == (oci.Kind.MANIFEST, "library/alpine", oci.Reference(tag="3.19"))
    p = oci.parse_path(f"/v2/a/manifests/b/blobs/sha256:{HEX}")
    assert (p.kind, p.name) == (oci.Kind.BLOB, "a/manifests/b")
    assert oci.parse_path("/v2/a/b/tags/list").kind is oci.Kind.TAGS
    assert oci.parse_path(f"/v2/a/referrers/sha256:{HEX}").kind is oci.Kind.REFERRERS


@pytest.mark.parametrize("path,error", [
    ("/v2/a%2Fb/manifests/x", errors.NameInvalid),
    ("/v2/../etc/passwd", errors.NotFound),
    ("/v2/a/blobs/latest", errors.DigestInvalid),
    ("/v2/a/manifests/-bad", errors.TagInvalid),
    ("/v2/a/unknown/x", errors.NotFound),
    ("/v2/A/manifests/x", errors.NameInvalid),
])
def test_bad_paths(path: str, error: type[errors.OCIError]) -> None:
    with pytest.raises(error):
        oci.parse_path(path)


@pytest.mark.parametrize("header,size,expected", [
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=90-", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)),
    ("bytes=5-1000", 100, (5, 99)),
])
def test_ranges(header: str, size: int, expected: tuple[int, int]) -> None:
    spec = oci.parse_range(header)
    assert spec is not None
    r = spec.resolve(size)
    assert r is not None and (r.start, r.end) == expected


def test_multi_range_means_whole() -> None:
    spec = oci.parse_range("bytes=0-1,5-6")
    assert spec is not None and spec.multi and spec.resolve(10) is None


@pytest.mark.parametrize("header", ["bytes=", "bytes=a-b", "items=0-1", "bytes=5-1", "bytes=-", "bytes 0-1"])
def test_invalid_ranges(header: str) -> None:
    with pytest.raises(errors.RangeInvalid):
        oci.parse_range(header)


@pytest.mark.parametrize("header,size", [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)])
def test_unsatisfiable(header: str, size: int) -> None:
    spec = oci.parse_range(header)
    assert spec is not None
    with pytest.raises(errors.RangeInvalid) as e:
        spec.resolve(size)
    assert e.value.headers["Content-Range"] == f"bytes */{size}"


def test_accept_key() -> None:
    assert oci.accept_key("") == "*"
    assert oci.accept_key(f"{oci.OCI_MANIFEST}, */*") == "*"
    key = oci.accept_key(f"{oci.DOCKER_MANIFEST};q=0.9, {oci.OCI_INDEX}")
    assert key == ",".join(sorted([oci.DOCKER_MANIFEST, oci.OCI_INDEX]))
    assert oci.accepts(key, oci.OCI_INDEX) and not oci.accepts(key, oci.OCI_MANIFEST)
