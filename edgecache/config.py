"""Configuration: one frozen, typed object loaded once.

Precedence: command-line flags > ``EDGECACHE_*`` environment > TOML file >
defaults. Unknown keys are errors naming the key. The shape is fixed by
DESIGN.md §5; every field documents its default.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_duration(value: Any, key: str) -> float:
    """``"5m"``, ``"1h30m"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and value and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+", value):
        return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(value))
    raise ConfigError(f"{key}: invalid duration {value!r} (use e.g. '30s', '5m', '24h')")


def parse_size(value: Any, key: str) -> int:
    """``"50GiB"``, ``"512MiB"`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    raise ConfigError(f"{key}: invalid size {value!r} (use e.g. '50GiB')")


def parse_listen(value: Any, key: str) -> tuple[str, int]:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit() and 0 <= int(port) < 65536:
            return host.strip("[]") or "0.0.0.0", int(port)
    raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")


AUTH_MODES = ("anonymous", "credentials", "passthrough")


@dataclass(frozen=True, slots=True)
class TagTTL:
    """A per-pattern tag TTL override; pattern is matched against ``repo:tag``."""

    match: str
    ttl: float


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    namespaces: tuple[str, ...] = ()
    prefix: str | None = None
    default: bool = False
    auth: str = "anonymous"
    username: str | None = None
    password_file: str | None = None  # credentials mode: file holding the password or token
    password_env: str | None = None  # credentials mode: environment variable holding it
    tag_ttl: float = 300.0  # default "5m"
    max_stale: float = 86400.0  # default "24h"
    tag_ttls: tuple[TagTTL, ...] = ()  # first matching pattern wins
    negative_ttl: float = 30.0  # upstream 404s remembered this long
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # between two reads of the body
    max_connections: int = 64
    retries: int = 3  # idempotent requests, before the first byte reaches a client
    library_prefix: bool = False  # Docker Hub: one-segment names get "library/"
    token_realm_hosts: tuple[str, ...] = ()  # extra hosts whose http:// realms may be followed
    access_ttl: float = 60.0  # how long a confirmed private-repo credential is trusted
    visibility_ttl: float = 300.0  # how long a repository's public/private answer is trusted (passthrough)
    allow: tuple[str, ...] = ()  # repository globs that may be pulled (empty: all)
    deny: tuple[str, ...] = ()  # repository globs that may not be pulled
    pinned_tags: tuple[str, ...] = ()  # "repo:tag" globs whose first digest is kept
    upstream_ns: str | None = None  # send ?ns=<this> upstream: the upstream is another edgecache (tiers)
    scanner_url: str | None = None  # scan gate webhook (POST JSON); None: no gate
    scanner_ttl: float = 3600.0  # how long a verdict is cached, per digest
    scanner_timeout: float = 10.0
    scanner_fail_open: bool = False  # scanner unreachable: allow (true) or refuse (false, the default)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def repository(self, name: str) -> str:
        """The repository as this upstream names it: ``nginx`` on Docker Hub is ``library/nginx``."""
        return "library/" + name if self.library_prefix and "/" not in name else name

    def ttl_for(self, repo: str, tag: str) -> float:
        ref = f"{repo}:{tag}"
        for rule in self.tag_ttls:
            if fnmatch.fnmatchcase(ref, rule.match):
                return rule.ttl
        return self.tag_ttl

    def password(self) -> str | None:
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as f:
                return f.read().strip()
        if self.password_env:
            return os.environ.get(self.password_env)
        return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, int] = ("127.0.0.1", 5000)  # default "127.0.0.1:5000"
    workers: int = 1
    event_loop: str = "asyncio"  # asyncio | uvloop; asyncio keeps sendfile zero-copy (DESIGN §3)
    shutdown_timeout: float = 30.0  # graceful drain deadline on SIGTERM
    header_timeout: float = 30.0  # a connection idle or stuck before a complete request head this long is closed
    drain_delay: float = 0.0  # on SIGTERM, keep listening this long with /readyz failing (load balancers notice)
    tls_cert: str | None = None
    tls_key: str | None = None
    htpasswd: str | None = None  # optional bcrypt htpasswd file: Basic auth for clients
    allow_cidrs: tuple[str, ...] = ()  # empty: every client address allowed
    public_url: str | None = None  # base URL clients reach us at (token realm); default from Host
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class CacheConfig:
    dir: str = "/var/cache/edgecache"
    max_size: int = 50 * 2**30  # default "50GiB"
    high_watermark: float = 0.95  # eviction starts above this fraction of max_size
    low_watermark: float = 0.85  # and stops below this one
    open_files: int = 1024  # descriptors of small hot blobs kept open (0: open per request)


@dataclass(frozen=True, slots=True)
class Replication:
    """An image kept warm in the cache, refreshed every ``interval`` (DESIGN §5b)."""

    upstream: str
    image: str  # repository[:tag|@digest] as the upstream names it
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty: every platform
    interval: float = 3600.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    blocklist: str | None = None  # file of blocked digests, re-read when it changes
    replicate: tuple[Replication, ...] = ()
    redis_url: str | None = None  # optional shared tag/token state (aiocache Redis backend)
    log_level: str = "INFO"

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"unknown key {where}{key!r}")


def _typed(value: Any, typ: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
        raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
    return value


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return tuple(value)


def _server(t: Mapping[str, Any]) -> ServerConfig:
    _check_keys(t, {f.name for f in dataclasses.fields(ServerConfig)}, "server.")
    kw: dict[str, Any] = {}
    for k, v in t.items():
        key = f"server.{k}"
        if k == "listen":
            kw[k] = parse_listen(v, key)
        elif k == "workers":
            if _typed(v, int, key) < 1:
                raise ConfigError(f"{key}: must be >= 1")
            kw[k] = v
        elif k in ("shutdown_timeout", "drain_delay", "header_timeout"):
            kw[k] = parse_duration(v, key)
        elif k == "event_loop":
            if v not in ("asyncio", "uvloop"):
                raise ConfigError(f"{key}: expected 'asyncio' or 'uvloop'")
            kw[k] = v
        elif k == "allow_cidrs":
            kw[k] = _str_list(v, key)
        elif k == "access_log":
            kw[k] = _typed(v, bool, key)
        else:
            kw[k] = _typed(v, str, key)
    return ServerConfig(**kw)


def _cache(t: Mapping[str, Any]) -> CacheConfig:
    _check_keys(t, {f.name for f in dataclasses.fields(CacheConfig)}, "cache.")
    kw: dict[str, Any] = {}
    for k, v in t.items():
        key = f"cache.{k}"
        if k == "dir":
            kw[k] = _typed(v, str, key)
        elif k == "max_size":
            kw[k] = parse_size(v, key)
        elif k == "open_files":
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65536:
                raise ConfigError(f"{key}: expected an integer from 0 to 65536")
            kw[k] = v
        else:
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"{key}: expected a fraction in (0, 1]")
            kw[k] = float(v)
    return CacheConfig(**kw)


_UP_DURATIONS = {"tag_ttl", "max_stale", "negative_ttl", "connect_timeout", "read_timeout", "access_ttl",
                 "visibility_ttl", "scanner_ttl", "scanner_timeout"}
_UP_LISTS = {"namespaces", "token_realm_hosts", "allow", "deny", "pinned_tags"}


def _upstream(name: str, t: Mapping[str, Any]) -> UpstreamConfig:
    where = f"upstreams.{name}."
    _check_keys(t, {f.name for f in dataclasses.fields(UpstreamConfig)} - {"name"}, where)
    if "url" not in t:
        raise ConfigError(f"{where}url: required")
    kw: dict[str, Any] = {"name": name}
    for k, v in t.items():
        key = where + k
        if k in _UP_DURATIONS:
            kw[k] = parse_duration(v, key)
        elif k in _UP_LISTS:
            kw[k] = _str_list(v, key)
        elif k in ("default", "library_prefix", "scanner_fail_open"):
            kw[k] = _typed(v, bool, key)
        elif k in ("max_connections", "retries"):
            kw[k] = _typed(v, int, key)
        elif k == "tag_ttls":
            kw[k] = _tag_ttls(v, key)
        else:
            kw[k] = _typed(v, str, key)
    url = urlsplit(kw["url"])
    if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
        raise ConfigError(f"{where}url: expected http(s)://host[:port], got {kw['url']!r}")
    kw["url"] = f"{url.scheme}://{url.netloc}"
    if kw.get("auth", "anonymous") not in AUTH_MODES:
        raise ConfigError(f"{where}auth: expected one of {', '.join(AUTH_MODES)}")
    if kw.get("auth") == "credentials" and not kw.get("username"):
        raise ConfigError(f"{where}username: required with auth = 'credentials'")
    if "prefix" in kw and not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", kw["prefix"]):
        raise ConfigError(f"{where}prefix: must be one lowercase path component")
    if "library_prefix" not in kw and url.netloc in ("registry-1.docker.io", "index.docker.io"):
        kw["library_prefix"] = True
    return UpstreamConfig(**kw)


def _tag_ttls(v: Any, key: str) -> tuple[TagTTL, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of {{match, ttl}} tables")
    out = []
    for i, rule in enumerate(v):
        if not isinstance(rule, dict) or set(rule) != {"match", "ttl"}:
            raise ConfigError(f"{key}[{i}]: expected keys 'match' and 'ttl'")
        out.append(TagTTL(_typed(rule["match"], str, key), parse_duration(rule["ttl"], f"{key}[{i}].ttl")))
    return tuple(out)


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a parsed TOML document."""
    _check_keys(data, {"version", "server", "cache", "upstreams", "redis", "log", "policy", "replicate"}, "")
    if data.get("version") != 1:
        raise ConfigError("version: expected 1")
    ups = data.get("upstreams", {})
    if not isinstance(ups, dict):
        raise ConfigError("upstreams: expected a table of tables")
    upstreams = tuple(_upstream(n, t) for n, t in ups.items())
    redis = data.get("redis", {})
    _check_keys(redis, {"url"}, "redis.")
    log = data.get("log", {})
    _check_keys(log, {"level"}, "log.")
    pol = data.get("policy", {})
    _check_keys(pol, {"blocklist"}, "policy.")
    cfg = Config(
        blocklist=_typed(pol["blocklist"], str, "policy.blocklist") if "blocklist" in pol else None,
        replicate=_replications(data.get("replicate", [])),
        server=_server(data.get("server", {})),
        cache=_cache(data.get("cache", {})),
        upstreams=upstreams,
        redis_url=redis.get("url"),
        log_level=str(log.get("level", "INFO")).upper(),
    )
    validate(cfg)
    return cfg


def _replications(items: Any) -> tuple[Replication, ...]:
    if not isinstance(items, list):
        raise ConfigError("replicate: expected an array of tables ([[replicate]])")
    out = []
    for i, t in enumerate(items):
        where = f"replicate[{i}]."
        if not isinstance(t, dict):
            raise ConfigError(f"replicate[{i}]: expected a table")
        _check_keys(t, {"upstream", "image", "platforms", "interval"}, where)
        for key in ("upstream", "image"):
            if key not in t:
                raise ConfigError(f"{where}{key}: required")
        out.append(Replication(_typed(t["upstream"], str, where + "upstream"), _typed(t["image"], str, where + "image"),
                               _str_list(t.get("platforms", []), where + "platforms"),
                               parse_duration(t.get("interval", "1h"), where + "interval")))
    return tuple(out)


def validate(cfg: Config) -> None:
    """Cross-field rules: unique namespaces and prefixes, at most one default."""
    seen_ns: dict[str, str] = {}
    seen_prefix: dict[str, str] = {}
    defaults = [u.name for u in cfg.upstreams if u.default]
    if len(defaults) > 1:
        raise ConfigError(f"upstreams: more than one default ({', '.join(defaults)})")
    for u in cfg.upstreams:
        for ns in u.namespaces:
            if ns in seen_ns:
                raise ConfigError(f"upstreams.{u.name}.namespaces: {ns!r} already used by {seen_ns[ns]}")
            seen_ns[ns] = u.name
        if u.prefix:
            if u.prefix in seen_prefix:
                raise ConfigError(f"upstreams.{u.name}.prefix: {u.prefix!r} already used by {seen_prefix[u.prefix]}")
            seen_prefix[u.prefix] = u.name
    names = {u.name for u in cfg.upstreams}
    for i, r in enumerate(cfg.replicate):
        if r.upstream not in names:
            raise ConfigError(f"replicate[{i}].upstream: no upstream named {r.upstream!r}")
    if cfg.cache.low_watermark > cfg.cache.high_watermark:
        raise ConfigError("cache.low_watermark: must not exceed cache.high_watermark")


_ENV = {
    "EDGECACHE_SERVER_LISTEN": ("server", "listen"),
    "EDGECACHE_SERVER_WORKERS": ("server", "workers"),
    "EDGECACHE_SERVER_EVENT_LOOP": ("server", "event_loop"),
    "EDGECACHE_CACHE_DIR": ("cache", "dir"),
    "EDGECACHE_CACHE_MAX_SIZE": ("cache", "max_size"),
    "EDGECACHE_REDIS_URL": ("redis", "url"),
    "EDGECACHE_LOG_LEVEL": ("log", "level"),
}


def load(path: str | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> Config:
    """Load the file, apply environment overrides, then command-line flags."""
    data: dict[str, Any] = {"version": 1}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    for var, (section, key) in _ENV.items():
        if var in env:
            value: Any = env[var]
            if key == "workers":
                value = int(value) if value.isdigit() else value
            data.setdefault(section, {})[key] = value
    for key in ("listen", "workers"):
        if flags.get(key) is not None:
            data.setdefault("server", {})[key] = flags[key]
    if flags.get("cache_dir") is not None:
        data.setdefault("cache", {})["dir"] = flags["cache_dir"]
    if flags.get("upstream") is not None:
        url = urlsplit(flags["upstream"])
        data["upstreams"] = {"upstream": {
            "url": flags["upstream"], "namespaces": [url.netloc], "default": True, "auth": "passthrough"}}
    return from_mapping(data)


def summary(cfg: Config) -> str:
    """A human-readable table of the upstreams, for ``check-config``."""
    lines = [f"listen {cfg.server.listen[0]}:{cfg.server.listen[1]}, workers {cfg.server.workers}, "
             f"cache {cfg.cache.dir} ({cfg.cache.max_size} bytes)"]
    for u in cfg.upstreams:
        flags = " default" if u.default else ""
        lines.append(f"  {u.name}: {u.url} ns={','.join(u.namespaces) or '-'} prefix={u.prefix or '-'} "
                     f"auth={u.auth} tag_ttl={u.tag_ttl:g}s max_stale={u.max_stale:g}s{flags}")
    return "\n".join(lines)
