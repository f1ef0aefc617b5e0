"""Operator commands: names given to ``edgecache purge`` match what the index stores."""

from __future__ import annotations

from edgecache import config
from edgecache.admin import _stored_name


def test_purge_names_follow_the_upstreams_library_prefix() -> None:
    cfg = config.from_mapping({"version": 1, "upstreams": {
        "hub": {"url": "https://registry-1.docker.io", "prefix": "hub"},  # library/ by default for Docker Hub
        "plain": {"url": "https://registry.example", "prefix": "plain"},
    }})
    assert _stored_name(cfg, "hub", "nginx") == "library/nginx"  # as the routes store it
    assert _stored_name(cfg, "hub", "team/app") == "team/app"
    assert _stored_name(cfg, "plain", "nginx") == "nginx"
    assert _stored_name(cfg, "unknown", "nginx") == "nginx"
