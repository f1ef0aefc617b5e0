"""Smoke load test: loadtests/run.py (real registry, real edgecache, locust) must pass with zero failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("docker-registry") is None and not Path("/usr/bin/docker-registry").exists(),
                       reason="docker-registry (Debian package) is not installed"),
]


@pytest.mark.timeout(240)
def test_warm_pull_storm_has_no_failures_and_hits_the_cache() -> None:
    cmd = [sys.executable, str(ROOT / "loadtests" / "run.py"), "--scenario", "warm", "--seconds", "20",
           "--users", "8", "--layer-mib", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT)
    out = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY_JSON ")]
    assert lines, f"no summary printed:\n{out[-4000:]}"
    summary = json.loads(lines[-1].removeprefix("SUMMARY_JSON "))
    assert proc.returncode == 0, out[-4000:]
    assert summary["failures"] == 0, out[-4000:]
    assert summary["requests"] > 100, out[-4000:]
    # The cache worked: every blob was fetched from upstream at most once, none while under load.
    assert summary["upstream_blob_gets_total"] <= summary["distinct_blobs"], out[-4000:]
    assert summary["upstream_blob_gets_during_load"] == 0, out[-4000:]
