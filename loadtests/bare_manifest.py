#!/usr/bin/env python3
"""The reference for the manifest benchmark (section c): a bare aiohttp handler answering a constant
manifest with the same headers edgecache sends, in one process. It is the ceiling of any aiohttp
server on this machine, measured in the same run (the machine's speed varies from hour to hour).

    python loadtests/bare_manifest.py PORT MANIFEST_FILE
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from aiohttp import web


def main() -> None:
    port, body = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {"X-Cache": "HIT", "Docker-Distribution-API-Version": "registry/2.0", "OCI-Namespace": "127.0.0.1:5000",
               "Docker-Content-Digest": digest, "Content-Type": "application/vnd.oci.image.manifest.v1+json",
               "ETag": f'"{digest}"', "X-Request-Id": "0123456789abcdef"}

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/{tail:.*}", manifest)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
