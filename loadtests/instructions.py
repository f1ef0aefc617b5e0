#!/usr/bin/env python3
"""CPU instructions per request, counted by valgrind's callgrind: a figure that does not move with the
machine's speed (which varies by 2x from hour to hour here), for comparing two versions of a hot path.

Starts a registry with one manifest, one edgecache worker under callgrind, fills its cache, then for
each target: drops the counts so far, runs ``wrk -t1`` for a while, and divides the instructions of
that window by the requests wrk completed. The same for ``bare_manifest.py`` (a bare aiohttp handler
answering the same manifest on the same path), the reference. Python runs ~50x slower under
valgrind, so periodic work (metrics flush every 0.5 s, index touches every 2 s) weighs about 50x more
per request than in a real run: a difference of a few thousand instructions is noise.

    python loadtests/instructions.py [--targets digest,tag,healthz] [--seconds 8] [--conns 16]

Needs the Debian package ``valgrind`` (callgrind_control) besides the benchmark's own tools.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import harness
from harness import Edge, Registry

OCI = "application/vnd.oci.image.manifest.v1+json"
HERE = Path(__file__).resolve().parent


def measure(work: Path, label: str, argv: list[str], port: int, urls: list[tuple[str, str]],
            seconds: int, conns: int) -> list[tuple[str, int, float]]:
    out = work / f"callgrind.{label}"
    log = (work / f"valgrind.{label}.log").open("w")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"] + argv,
                            stdout=subprocess.DEVNULL, stderr=log)
    rows = []
    try:
        harness.wait_http(f"http://127.0.0.1:{port}/v2/", deadline=180, proc=proc)
        for name, url in urls:
            for _ in range(20):  # fill the cache and the answer memo, warm every path
                subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", f"Accept: {OCI}", url], check=True)
            subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
            for f in work.glob(f"{out.name}.*"):
                f.unlink()  # what came before the window
            wrk = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-H", f"Accept: {OCI}", url],
                                 capture_output=True, text=True, check=True).stdout
            subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True)
            found = re.search(r"(\d+) requests in", wrk)
            assert found, wrk
            requests = int(found.group(1))
            total = 0
            for f in work.glob(f"{out.name}.*"):
                m = re.search(r"^(?:summary|totals):\s+(\d+)", f.read_text(), re.M)
                total += int(m.group(1)) if m else 0
            rows.append((f"{label} {name}", requests, total / requests))
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="digest,tag", help="comma list of digest, tag, healthz")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--no-bare", action="store_true", help="skip the bare aiohttp reference")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk", "curl"):
        if shutil.which(tool) is None:
            print(f"instructions: {tool} is missing (apt-get install valgrind wrk curl)", file=sys.stderr)
            return 2
    work = harness.tempdir("edgecache-instructions-")
    registry = Registry(work, "up").start()
    try:
        img = harness.seed_image(registry.url, "bench/man", "multi", [4096, 4096])
        _, body = img.manifests["linux/amd64"]
        digest = harness.push_manifest(registry.url, "bench/man", "single", body, OCI)
        (work / "manifest.json").write_bytes(body)
        edge = Edge(work, registry, name="edge", workers=1, cache_dir=work / "cache")
        edge.start()
        edge.stop()  # its config and filled cache, served again below under callgrind
        port = harness.free_port()
        config = work / "callgrind.toml"
        config.write_text(re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', edge.config_path.read_text()))
        base = f"http://127.0.0.1:{port}"
        paths = {"digest": f"{base}/v2/up/bench/man/manifests/{digest}", "tag": f"{base}/v2/up/bench/man/manifests/single",
                 "healthz": f"{base}/healthz"}
        rows = measure(work, "edgecache", [harness.PYTHON, "-m", "edgecache", "serve", "--config", str(config)], port,
                       [(t, paths[t]) for t in args.targets.split(",")], args.seconds, args.conns)
        if not args.no_bare:
            rows += measure(work, "bare-aiohttp", [harness.PYTHON, str(HERE / "bare_manifest.py"), str(port),
                                                   str(work / "manifest.json")], port,
                            [("same path", paths["digest"])], args.seconds, args.conns)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("| what | requests | instructions per request |\n|---|---|---|")
    for name, requests, per in rows:
        print(f"| {name} | {requests} | {per / 1000:.1f} k |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
