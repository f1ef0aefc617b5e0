"""E2E fixtures: edgecache instances (tests.support.edge) plus helpers shared by the real-client tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.support.edge import edge_factory, http  # noqa: F401  (fixtures)
from tests.support.token_server import TokenServer


def realm_host(ts: TokenServer) -> str:
    """host:port of the token server's realm (edgecache only follows realms on allow-listed hosts)."""
    return ts.realm.split("://", 1)[1].split("/", 1)[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_oci_layout(layout: Path) -> dict[str, bytes]:
    """Re-hash every blob of an OCI image layout against its file name; returns {digest: bytes}."""
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    blobs: dict[str, bytes] = {}
    for f in sorted((layout / "blobs").glob("*/*")):
        digest = f"{f.parent.name}:{f.name}"
        data = f.read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, f"blob {f} does not match its name"
        blobs[digest] = data
    return blobs


def layout_refs(layout: Path) -> dict[str, dict[str, object]]:
    """``org.opencontainers.image.ref.name`` -> descriptor from the layout's index.json."""
    index = json.loads((layout / "index.json").read_text())
    return {m.get("annotations", {}).get("org.opencontainers.image.ref.name", ""): m for m in index["manifests"]}
