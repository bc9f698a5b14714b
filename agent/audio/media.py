"""The media cache: downloads from allowed hosts only, verified by sha256, kept under a quota.

Files are stored as ``<cache_dir>/<sha256>`` (lower-case hex), so a name is its own checksum.
A download (:mod:`agent.audio.download`: deadline, minimum rate, retries, resume) streams into
``.<sha256>.part`` in the same folder and is renamed into place only after the whole file's
hash matched and it was fsynced: a power cut leaves a partial file or a complete, verified one,
never a wrong file under a sha256 name. A partial file is resumed by the next download of its
sha256 (also after a restart) and deleted after ``PART_KEEP_S`` unused; it is never aired and
not counted in the quota. Hosts: :mod:`agent.audio.hosts`.

Threads: :meth:`MediaCache.fetch` blocks and is thread-safe. :meth:`MediaCache.submit` runs it in
the cache's own small pool and returns a ``Future``; the core adds a done callback that only
enqueues the result for its event loop. The pool has lanes (:mod:`agent.audio.lanes`: ``workers``
shared threads, one kept for emergency downloads and one for priority ones): an urgent download
never waits behind normal ones. Concurrent requests for one sha256 share one download; a more
urgent request for one still waiting for a worker is queued again in its own lane.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.audio.download import Downloader, Limits, hash_file
from agent.audio.hosts import HostRules, MediaError
from agent.audio.lanes import Lanes
from agent.core.clock import Clock, SystemClock
from agent.protocol import Priority
from drivers.fsutil import fsync_dir

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PART_RE = re.compile(r"^\.[0-9a-f]{64}\.part$")  # a download's partial file: .<sha256>.part
PART_KEEP_S = 86_400  # a partial file not resumed within this is deleted
# A cached file's mtime is its last use (the LRU order kept across restarts). Refreshing it at
# most hourly keeps two syscalls off the path of a cached bulletin that is aired again.
TOUCH_EVERY_S = 3600


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    last_used: float
    verified: bool  # hashed since the cache opened


class MediaCache:
    """The verified cache. ``limits``: the fields of :class:`~agent.audio.download.Limits`
    (``timeout_s``, ``read_timeout_s``, ``min_bytes_per_s``, ``slow_grace_s``, ``retries``,
    ``backoff_s``, ``max_bytes``)."""

    def __init__(self, cache_dir: str | os.PathLike, *, allowed_hosts: list[str],
                 quota_mb: float = 1024, workers: int = 2, clock: Clock | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 session: requests.Session | None = None, **limits: Any) -> None:
        self.dir = Path(cache_dir)
        self._dir_str = str(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = HostRules(allowed_hosts)
        self.quota_bytes = int(quota_mb * 1024 * 1024)
        self._downloader = Downloader(Limits(**limits), hosts=lambda: self.hosts,
                                      clock=clock or SystemClock(), sleep=sleep, session=session)
        self._lock = threading.Lock()
        # per sha: _sha_locks guard the index entry and hashing (short); _dl_locks serialise
        # downloads (long), so path_for never waits for a download in flight.
        self._sha_locks: dict[str, threading.Lock] = {}
        self._dl_locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, tuple[Future, Priority]] = {}
        self._entries: dict[str, _Entry] = {}
        self._pinned: frozenset[str] = frozenset()
        self._pool = Lanes(workers, name="media")
        self._scan()

    # --- public API -----------------------------------------------------------------------

    def check_url(self, url: str) -> None:
        """Raise :class:`MediaError` (``media_host``) unless ``url`` may be downloaded."""
        self.hosts.check_url(url)

    def set_hosts(self, hosts: list[str]) -> None:
        """Replace the allow-list (``security.media_hosts`` reloaded); downloads under way
        check their next redirect and connection against the new one."""
        self.hosts = HostRules(hosts)

    def path_for(self, sha256: str) -> str | None:
        """The cached file for ``sha256``, verified, or None (a bad file is deleted)."""
        sha = sha256.lower()
        with self._lock_for(sha, self._sha_locks):
            return self._verified_path(sha)

    def ready_path(self, sha256: str) -> str | None:
        """The cached file if it was verified since start and is unchanged, without hashing
        or waiting (for the core thread: a cached bulletin starts with no thread hop); None
        when it would take work — then use :meth:`path_for` or :meth:`submit` in a worker."""
        # On the path of every cached bulletin: plain strings and os.stat, no pathlib.
        sha = str(sha256).lower()
        lock = self._lock_for(sha, self._sha_locks)
        if not lock.acquire(blocking=False):
            return None
        try:
            entry = self._entries.get(sha)  # a dict read is atomic; entries are replaced whole
            if entry is None or not entry.verified:
                return None
            path = os.path.join(self._dir_str, sha)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
                return None
            now = time.time()
            if 0 <= now - st.st_mtime_ns / 1e9 < TOUCH_EVERY_S:
                entry.last_used = now  # recently touched: the LRU order on disk is close enough
            else:
                self._touch(sha, Path(path))
            return path
        finally:
            lock.release()

    def has(self, sha256: str) -> bool:
        """Whether ``sha256`` is in the cache (not re-hashed: :meth:`path_for` does that)."""
        with self._lock:
            return str(sha256).lower() in self._entries

    def fetch(self, url: str, sha256: str) -> str:
        """Return a local verified path for ``sha256``, downloading ``url`` if needed."""
        sha = _check_sha(sha256)
        with self._lock_for(sha, self._dl_locks):  # one download per sha at a time
            path = self.path_for(sha)
            if path is not None:
                return path
            self.check_url(url)
            self._download(url, sha)
            self._evict(keep=sha)
            return str(self.dir / sha)

    def submit(self, url: str, sha256: str, lane: Priority = Priority.NORMAL) -> Future:
        """:meth:`fetch` in the cache's pool, in ``lane`` (the item's priority); one shared
        Future per sha256 in flight, unless this request is more urgent and that one still
        waits for a worker."""
        sha = sha256.lower()
        with self._lock:
            fut, its_lane = self._inflight.get(sha, (None, lane))
            if fut is not None and (lane <= its_lane or fut.running() or fut.done()):
                return fut
            fut = self._pool.submit(self.fetch, url, sha, lane=lane)
            self._inflight[sha] = (fut, lane)
        fut.add_done_callback(lambda f: self._done(sha, f))  # at once if done: not under the lock
        return fut

    def _done(self, sha: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(sha, (None,))[0] is fut:
                del self._inflight[sha]

    def set_pinned(self, shas: Iterable[str]) -> None:
        """Media a schedule or the queue still needs: never evicted. Replaces the old set."""
        with self._lock:
            self._pinned = frozenset(s.lower() for s in shas)

    def verify_all(self) -> list[str]:
        """Hash every not-yet-verified file (run once in the background after start);
        return the shas deleted as corrupt."""
        with self._lock:
            shas = [s for s, e in self._entries.items() if not e.verified]
        return [s for s in shas if self.path_for(s) is None]

    def usage(self) -> dict:
        """For health: files, bytes, quota and how much of it is pinned."""
        with self._lock:
            used = sum(e.size for e in self._entries.values())
            pinned = sum(e.size for s, e in self._entries.items() if s in self._pinned)
            return {"files": len(self._entries), "bytes": used, "quota_bytes": self.quota_bytes,
                    "pinned_bytes": pinned}

    def close(self) -> None:
        """Stop accepting downloads; those under way fail at once. Idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._downloader.close()

    # --- index ----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index existing media; partial downloads stay to be resumed unless stale."""
        self._prune_parts()
        for p in self.dir.iterdir():
            if SHA_RE.match(p.name) and p.is_file():
                st = p.stat()
                self._entries[p.name] = _Entry(st.st_size, st.st_mtime_ns, st.st_mtime, False)

    def _prune_parts(self) -> None:
        """Delete partial files older than ``PART_KEEP_S`` or not of this version's form."""
        now = time.time()
        for p in self.dir.glob(".*.part"):
            try:
                if not PART_RE.match(p.name) or now - p.stat().st_mtime > PART_KEEP_S:
                    _unlink(p)
            except FileNotFoundError:
                pass

    def _lock_for(self, sha: str, locks: dict[str, threading.Lock]) -> threading.Lock:
        lock = locks.get(sha)
        if lock is not None:
            return lock
        with self._lock:
            return locks.setdefault(sha, threading.Lock())

    def _verified_path(self, sha: str) -> str | None:
        """Caller holds the sha lock. Hash on first use after start, then size+mtime."""
        path = self.dir / sha
        with self._lock:
            entry = self._entries.get(sha)
        if entry is None:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            self._forget(sha)
            return None
        same = st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns
        if not (entry.verified and same) and hash_file(path).hexdigest() != sha:
            log.warning("cached media %s is corrupt; deleted", sha)
            _unlink(path)
            self._forget(sha)
            return None
        self._touch(sha, path)
        return str(path)

    def _touch(self, sha: str, path: Path) -> None:
        """Mark used now; the mtime carries the LRU order across restarts."""
        try:
            os.utime(path)
            st = path.stat()
        except OSError:
            return
        with self._lock:
            self._entries[sha] = _Entry(st.st_size, st.st_mtime_ns, time.time(), True)

    def _forget(self, sha: str) -> None:
        with self._lock:
            self._entries.pop(sha, None)

    def _evict(self, keep: str) -> list[str]:
        with self._lock:
            used = sum(e.size for e in self._entries.values())
            victims = sorted((e.last_used, s) for s, e in self._entries.items()
                             if s != keep and s not in self._pinned)
            evicted = []
            for _, sha in victims:
                if used <= self.quota_bytes:
                    break
                used -= self._entries.pop(sha).size
                evicted.append(sha)
        for sha in evicted:
            _unlink(self.dir / sha)
            log.info("media %s evicted (least recently used)", sha)
        if used > self.quota_bytes:
            log.warning("media cache over quota (%d > %d bytes): the rest is pinned or in use",
                        used, self.quota_bytes)
        return evicted

    # --- download -------------------------------------------------------------------------

    def _download(self, url: str, sha: str) -> int:
        """Caller holds the sha's download lock (the partial file is its alone)."""
        self._prune_parts()
        part = self.dir / f".{sha}.part"
        size = self._downloader.download(url, sha, part)
        with self._lock_for(sha, self._sha_locks):
            os.replace(part, self.dir / sha)
            fsync_dir(self.dir)
            self._touch(sha, self.dir / sha)
        return size


def _check_sha(sha256: str) -> str:
    sha = str(sha256).lower()
    if not SHA_RE.match(sha):
        raise MediaError("media_checksum", "sha256 must be 64 hexadecimal digits")
    return sha


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
