"""The local blob store: content-addressed files under the cache directory.

Layout (DESIGN §2 Store)::

    blobs/sha256/ab/<hex>          committed, verified content (blobs and manifests)
    tmp/sha256-<hex>.partial       a fill in progress (one per digest, shared by readers)
    tmp/sha256-<hex>.json          the fill's size and media type, for readers in other processes
    locks/sha256-<hex>.lock        flock held by the one process downloading that digest

Every method here is synchronous and must be called through an executor;
:class:`edgecache.pullthrough` does that. Paths are built only from validated
:class:`~edgecache.oci.Digest` values.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from .oci import Digest, DIGEST_RE

log = logging.getLogger("edgecache.storage")


@dataclass(frozen=True, slots=True)
class FillInfo:
    size: int
    media_type: str


class DigestLock:
    """An exclusive, non-blocking flock on a digest's lock file (cross-process leader election)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class BlobStore:
    """Content-addressed files; all calls are blocking (run them in an executor)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"

    def create_dirs(self) -> None:
        for d in (self.blobs, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def partial_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.partial"

    def info_path(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.algorithm}-{digest.hex}.json"

    def lock(self, digest: Digest) -> DigestLock:
        return DigestLock(self.locks / f"{digest.algorithm}-{digest.hex}.lock")

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a committed file for reading: (fd, size), or None when it is gone (evicted, purged)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return fd, os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise

    def read(self, digest: Digest) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def write_verified(self, digest: Digest, data: bytes) -> int:
        """Store small verified content (a manifest) atomically; returns its size."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest.algorithm}-{digest.hex}.{os.getpid()}.{uuid.uuid4().hex[:12]}.small"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return len(data)

    def begin_fill(self, digest: Digest, info: FillInfo) -> int:
        """Create the partial file (truncating any stale one) and publish its info; returns an fd."""
        self.info_path(digest).with_suffix(".json.tmp").write_bytes(
            orjson.dumps({"size": info.size, "media_type": info.media_type}))
        os.replace(self.info_path(digest).with_suffix(".json.tmp"), self.info_path(digest))
        return os.open(self.partial_path(digest), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def commit_fill(self, digest: Digest) -> None:
        """Atomically move a verified partial into place (readers keep their open fd)."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial_path(digest), final)
        self.info_path(digest).unlink(missing_ok=True)

    def abort_fill(self, digest: Digest) -> None:
        """Delete a failed fill; readers see nlink == 0 on their fd and fail."""
        self.partial_path(digest).unlink(missing_ok=True)
        self.info_path(digest).unlink(missing_ok=True)

    def fill_info(self, digest: Digest) -> FillInfo | None:
        try:
            doc = orjson.loads(self.info_path(digest).read_bytes())
            return FillInfo(int(doc["size"]), str(doc["media_type"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def open_partial(self, digest: Digest) -> int | None:
        try:
            return os.open(self.partial_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def remove(self, digest: Digest) -> int:
        """Unlink a committed blob (an open reader keeps its inode); returns bytes freed."""
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    def clean_tmp(self) -> int:
        """Remove partial fills that no live process is writing (startup); returns how many."""
        removed = 0
        for p in self.tmp.iterdir():
            stem = p.name.split(".")[0]
            lock = DigestLock(self.locks / f"{stem}.lock")
            if not lock.try_acquire():
                continue  # another worker is filling it right now
            try:
                p.unlink(missing_ok=True)
                removed += 1
            finally:
                lock.release()
        return removed

    def walk(self) -> Iterator[tuple[Digest, int]]:
        """Every committed file with its size (for reconciliation)."""
        for algo_dir in self.blobs.iterdir():
            for shard in algo_dir.iterdir():
                for f in shard.iterdir():
                    text = f"{algo_dir.name}:{f.name}"
                    if DIGEST_RE.fullmatch(text) is None:
                        f.unlink(missing_ok=True)  # a stray file that cannot be content
                        continue
                    yield Digest.parse(text), f.stat().st_size

    def usage(self) -> int:
        return sum(size for _, size in self.walk())


class HotFiles:
    """Open descriptors of recently served small blobs, like nginx's ``open_file_cache``.

    A hit on a cached descriptor needs no open() and so no executor round trip, which costs more
    than sending a small blob. Content is immutable, so a descriptor stays right for as long as it
    is open, even after another process unlinks the file (it then reads the old, verified inode);
    :meth:`sweep` closes such descriptors so their disk space is returned. Each request gets its
    own ``dup`` of the descriptor: closing or evicting an entry never breaks a send in progress.
    Only small files are kept (a big one's open is nothing next to its transfer, and an unlinked
    big file must not hold its space for long). Non-blocking calls only: dup, close, fstat.
    """

    def __init__(self, capacity: int = 1024, max_file_size: int = 16 << 20) -> None:
        self.capacity = capacity
        self.max_file_size = max_file_size
        self._fds: OrderedDict[str, tuple[int, int]] = OrderedDict()  # digest -> (fd, size)

    def __len__(self) -> int:
        return len(self._fds)

    def dup(self, key: str) -> tuple[int, int] | None:
        """A new descriptor (the caller closes it) and the size, or None when not kept here."""
        found = self._fds.get(key)
        if found is None:
            return None
        self._fds.move_to_end(key)
        return os.dup(found[0]), found[1]

    def offer(self, key: str, fd: int, size: int) -> int:
        """Keep ``fd`` (which this object then owns) if it is small enough; returns the caller's fd."""
        if size > self.max_file_size or self.capacity <= 0:
            return fd
        old = self._fds.pop(key, None)
        if old is not None:
            os.close(old[0])
        self._fds[key] = (fd, size)
        while len(self._fds) > self.capacity:
            _, (old_fd, _size) = self._fds.popitem(last=False)
            os.close(old_fd)
        return os.dup(fd)

    def forget(self, key: str) -> None:
        found = self._fds.pop(key, None)
        if found is not None:
            os.close(found[0])

    def sweep(self) -> int:
        """Close descriptors whose file was unlinked (evicted or purged by any process); returns how many."""
        gone = []
        for key, (fd, _size) in self._fds.items():
            try:
                if os.fstat(fd).st_nlink == 0:
                    gone.append(key)
            except OSError:
                gone.append(key)
        for key in gone:
            self.forget(key)
        return len(gone)

    def close(self) -> None:
        while self._fds:
            _, (fd, _size) = self._fds.popitem()
            os.close(fd)
