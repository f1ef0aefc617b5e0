"""Locust users that pull images from edgecache the way containerd does.

One pull: HEAD the tag (containerd's Accept list) -> GET the index by the digest it
answered -> GET one platform's manifest -> GET its config -> GET every layer; a
fraction of layer GETs are "resumed" downloads (``Range: bytes=0-(N-1)`` then
``Range: bytes=N-``) and the two parts are joined. Every body is hashed and must
equal its digest (sha256); a mismatch, a short body or a wrong status is a failure.

Configuration comes from the environment (run.py sets it):

* ``LOADTEST_PLAN``      JSON file written by run.py: {"images": [{"repo", "tag", "valid": [index digests]}]}
* ``LOADTEST_SCENARIO``  cold | warm | churn | mixed | soak (default warm)
* ``LOADTEST_PREFIX``    path prefix that selects the upstream on edgecache (default "up")
* ``LOADTEST_RANGE``     fraction of layer GETs done as a resumed download (default 0.25)

Scenarios (also selectable with locust ``--tags``, which pick the matching task):

* ``cold``  every user pulls the images in the same order, starting together: each new
  image is a storm of all users at once on an empty cache. After the last one, random warm pulls.
* ``warm``  random pulls of images the runner pre-pulled (steady state, all hits).
* ``churn`` as warm, while the runner moves tags upstream; the tag's digest must be one the
  runner ever pushed for it (a digest from another tag or garbage is a failure).
* ``mixed``/``soak`` random pulls over many images, cold and warm mixed.

Run directly (a registry and edgecache already up and a plan file written)::

    LOADTEST_PLAN=plan.json locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:5000
"""

from __future__ import annotations

import hashlib
import json
import os
import random

from locust import between, events, tag, task
from locust.contrib.fasthttp import FastHttpUser

CONTAINERD_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
                     "application/vnd.docker.distribution.manifest.list.v2+json, "
                     "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")

SCENARIO = os.environ.get("LOADTEST_SCENARIO", "warm")
PREFIX = os.environ.get("LOADTEST_PREFIX", "up").strip("/")
RANGE_FRACTION = float(os.environ.get("LOADTEST_RANGE", "0.25"))
PLAN: dict = {"images": []}


@events.init.add_listener
def _load_plan(environment, **_kw):  # noqa: ANN001
    global PLAN, SCENARIO
    tags = getattr(getattr(environment, "parsed_options", None), "tags", None) or []
    if len(tags) == 1:  # `--tags churn` selects the scenario as LOADTEST_SCENARIO would
        SCENARIO = tags[0]
    path = os.environ.get("LOADTEST_PLAN")
    if path:
        with open(path) as f:
            PLAN = json.load(f)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pull(Exception):
    """A pull step failed (already reported to locust)."""


class ContainerdUser(FastHttpUser):
    wait_time = between(0.0, 0.05)
    network_timeout = 120.0
    connection_timeout = 10.0
    _counter = 0

    def on_start(self) -> None:
        ContainerdUser._counter += 1
        self.uid = ContainerdUser._counter
        self.order = 0  # cold: next image in the shared order
        self.rng = random.Random(self.uid * 7919)

    def _base(self, repo: str) -> str:
        return f"/v2/{PREFIX}/{repo}" if PREFIX else f"/v2/{repo}"

    # one step: GET a digest-addressed object and check its body ---------------------------
    def _get_verified(self, path: str, digest: str, name: str, headers: dict | None = None) -> bytes:
        with self.client.get(path, headers=headers or {}, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{name}: status {r.status_code} X-Cache={r.headers.get('X-Cache')} {str(r.text)[:200]}")
                raise Pull(name)
            body = r.content or b""
            actual = _sha(body)
            if actual != digest:
                r.failure(f"{name}: digest mismatch: want {digest} got {actual} ({len(body)} bytes)")
                raise Pull(name)
            r.success()
            return body

    def _get_resumed(self, path: str, digest: str, size: int) -> None:
        """A download cut after N bytes and resumed with ``Range: bytes=N-``; the join must hash right."""
        n = self.rng.randint(1, size - 1)
        parts = []
        for name, rng, want_range in (("layer range head", f"bytes=0-{n - 1}", f"bytes 0-{n - 1}/{size}"),
                                      ("layer range resume", f"bytes={n}-", f"bytes {n}-{size - 1}/{size}")):
            with self.client.get(path, headers={"Range": rng}, name=name, catch_response=True) as r:
                if r.status_code != 206:
                    r.failure(f"{name}: Range {rng}: status {r.status_code} (want 206)")
                    raise Pull(name)
                if r.headers.get("Content-Range") != want_range:
                    r.failure(f"{name}: Range {rng}: Content-Range {r.headers.get('Content-Range')!r} want {want_range!r}")
                    raise Pull(name)
                parts.append(r.content or b"")
                r.success()
        joined = b"".join(parts)
        if _sha(joined) != digest:
            events.request.fire(request_type="GET", name="layer resumed join", response_time=0, response_length=len(joined),
                                exception=AssertionError(f"resumed join of {digest} at {n}: digest mismatch "
                                                         f"({len(joined)} bytes)"), context={})
            raise Pull("join")

    def pull(self, image: dict) -> None:
        repo, tag_ = image["repo"], image["tag"]
        base = self._base(repo)
        with self.client.head(f"{base}/manifests/{tag_}", headers={"Accept": CONTAINERD_ACCEPT},
                              name="manifest HEAD tag", catch_response=True) as r:
            digest = r.headers.get("Docker-Content-Digest")
            if r.status_code != 200 or not digest:
                r.failure(f"HEAD tag {repo}:{tag_}: status {r.status_code} digest {digest!r}")
                raise Pull("head")
            valid = image.get("valid")
            if valid and digest not in valid:
                r.failure(f"HEAD tag {repo}:{tag_}: digest {digest} was never pushed for this tag")
                raise Pull("head")
            r.success()
        index = json.loads(self._get_verified(f"{base}/manifests/{digest}", digest, "index by digest",
                                              {"Accept": CONTAINERD_ACCEPT}))
        if index.get("mediaType") in INDEX_TYPES:
            entry = self.rng.choice(index["manifests"])
            mdigest = entry["digest"]
            manifest = json.loads(self._get_verified(f"{base}/manifests/{mdigest}", mdigest, "platform manifest",
                                                     {"Accept": entry["mediaType"]}))
        else:
            manifest = index
        cfg = manifest["config"]
        self._get_verified(f"{base}/blobs/{cfg['digest']}", cfg["digest"], "config")
        for layer in manifest["layers"]:
            path = f"{base}/blobs/{layer['digest']}"
            if layer["size"] > 1 and self.rng.random() < RANGE_FRACTION:
                self._get_resumed(path, layer["digest"], layer["size"])
            else:
                self._get_verified(path, layer["digest"], "layer")

    def _next_image(self) -> dict | None:
        images = PLAN["images"]
        if not images:
            return None
        if SCENARIO == "cold" and self.order < len(images):
            self.order += 1
            return images[self.order - 1]
        return self.rng.choice(images)

    def _run(self) -> None:
        image = self._next_image()
        if image is None:
            return
        try:
            self.pull(image)
        except Pull:
            pass

    @tag("cold", "warm", "churn", "mixed", "soak")
    @task
    def pull_image(self) -> None:
        self._run()
