"""Config loading: shape, precedence, strict keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecache import config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads() -> None:
    cfg = config.load(str(ROOT / "config" / "edgecache.toml"), {}, {})
    names = {u.name: u for u in cfg.upstreams}
    assert set(names) >= {"dockerhub", "ghcr", "quay", "k8s"}
    hub = names["dockerhub"]
    assert hub.default and hub.library_prefix and hub.namespaces == ("docker.io",)
    assert hub.ttl_for("library/alpine", "latest") == 60.0
    assert hub.ttl_for("library/alpine", "3.19") == 300.0
    assert cfg.server.listen == ("127.0.0.1", 5000)


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('version = 1\n[server]\nlisten = "127.0.0.1:1"\n[cache]\ndir = "/a"\nmax_size = "1GiB"\n')
    cfg = config.load(str(f), {"EDGECACHE_SERVER_LISTEN": "127.0.0.1:2", "EDGECACHE_CACHE_DIR": "/b"},
                      {"listen": "127.0.0.1:3"})
    assert cfg.server.listen == ("127.0.0.1", 3)
    assert cfg.cache.dir == "/b"
    assert cfg.cache.max_size == 2**30
    assert cfg.cache.open_files == 1024


def test_upstream_flag() -> None:
    cfg = config.load(None, {}, {"upstream": "http://127.0.0.1:5000"})
    (u,) = cfg.upstreams
    assert (u.default, u.auth, u.namespaces) == (True, "passthrough", ("127.0.0.1:5000",))


@pytest.mark.parametrize("text,key", [
    ('version = 1\n[server]\nlisen = "x"\n', "lisen"),
    ('version = 1\n[cache]\nmax_size = "lots"\n', "cache.max_size"),
    ('version = 1\n[cache]\nopen_files = -1\n', "cache.open_files"),
    ('version = 1\n[cache]\nopen_files = "many"\n', "cache.open_files"),
    ('version = 1\n[upstreams.a]\nurl = "ftp://x"\n', "upstreams.a.url"),
    ('version = 1\n[upstreams.a]\nurl = "https://x"\nauth = "magic"\n', "upstreams.a.auth"),
    ('version = 1\n[upstreams.a]\nurl = "https://x"\nbogus = 1\n', "bogus"),
    ('version = 1\n[upstreams.a]\nurl = "https://x"\ntag_ttl = "soon"\n', "upstreams.a.tag_ttl"),
    ('version = 2\n', "version"),
    ('version = 1\nextra = 1\n', "extra"),
    ('version = 1\n[upstreams.a]\nurl = "https://x"\ndefault = true\n[upstreams.b]\nurl = "https://y"\ndefault = true\n',
     "more than one default"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(str(f), {}, {})


def test_durations_and_sizes() -> None:
    assert config.parse_duration("1h30m", "k") == 5400
    assert config.parse_duration("250ms", "k") == 0.25
    assert config.parse_size("512MiB", "k") == 512 * 2**20
    assert config.parse_size("1GB", "k") == 10**9
