"""Downloading one media file over HTTP(S), bounded in time whatever the server does.

- **Deadline**: ``timeout_s`` holds for the whole download — every attempt, redirect and wait
  between attempts. A watchdog thread checks the attempts under way four times a second and
  shuts down the socket of one past it, so no server can outlast it: not one trickling its
  body, nor its headers, nor a TLS handshake (checks made only after a chunk arrives are not
  enough: a chunk may never complete).
- **Minimum rate**: from ``slow_grace_s`` into an attempt on, an attempt averaging less than
  ``min_bytes_per_s`` is stopped as too slow. Deadline and too slow are final
  (``media_unavailable``): the attempt ran as long as it was worth.
- **Socket timeouts**: ``read_timeout_s`` without a byte (connect: at most 10 s) drops the
  connection; like a cut or an HTTP 5xx it is retried, with backoff, up to ``retries`` times.
- **Where it connects**: each connection's peer address is checked against the host rules
  (:meth:`agent.audio.hosts.HostRules.check_peer`), as are redirects, followed by hand.
- **Resume**: what arrived stays in the destination file (the cache's ``.<sha256>.part``);
  the next attempt asks for the rest (``Range: bytes=N-``, with ``If-Range`` when the first
  response gave a strong ETag or a Last-Modified). A 206 from the right offset appends; a 200
  (Range ignored, or the file changed) starts the file afresh; a wrong offset or a 416 drops
  it. The sha256 is always of the whole file; a mismatch after a resume drops the file and
  starts once afresh. An attempt that made the file longer is not counted against
  ``retries``. The file is kept when the download runs out of retries or time (a later fetch
  resumes it), and removed on any other failure.

The watchdog and the peer check see the sockets through a thread-local "current attempt"
that the session's connections (urllib3 subclasses, :func:`watched_session`) report to.
requests is imported at the first download: most days nothing is downloaded, and it costs
~15 MB of memory on a 512 MB board.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from agent.audio.hosts import HostRules, MediaError, redact
from agent.core.clock import Clock

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 10.0
WATCH_TICK_S = 0.25
MAX_BACKOFF_S = 60.0
CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?P<start>\d+)-\d+/(?P<total>\d+|\*)\s*$", re.I)


@dataclass(frozen=True)
class Limits:
    """The ``media.*`` bounds of a download (config/agent.example.yaml)."""

    timeout_s: float = 300.0
    read_timeout_s: float = 15.0
    min_bytes_per_s: float = 1024.0  # 0: no minimum
    slow_grace_s: float = 30.0
    retries: int = 3
    backoff_s: float = 2.0
    max_bytes: int = 200 * 1024 * 1024


class _Retry(Exception):
    """A transient failure: worth another attempt."""


class _Stopped(MediaError):
    """Out of time (deadline, too slow, shutdown): final, but what arrived is kept."""


class _Mismatch(MediaError):
    """The whole file does not hash to its sha256; ``resumed``: it was put together from
    more than one response."""

    def __init__(self, message: str, resumed: bool) -> None:
        super().__init__("media_checksum", message)
        self.resumed = resumed


class Attempt:
    """One request and its response, as the watchdog and the connections see it."""

    def __init__(self, limits: Limits, clock: Clock, deadline: float,
                 hosts: Callable[[], HostRules]) -> None:
        self.limits, self.clock, self.deadline, self.hosts = limits, clock, deadline, hosts
        self.started = clock.monotonic()
        self.received = 0  # body bytes of this attempt
        self.why: str | None = None  # why it was stopped
        self.refused: MediaError | None = None  # a connection to a refused address
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def verdict(self) -> str | None:
        """Why the attempt must stop now, or None."""
        now = self.clock.monotonic()
        if now >= self.deadline:
            return f"deadline: not complete within {self.limits.timeout_s:g} s"
        elapsed, rate = now - self.started, self.limits.min_bytes_per_s
        if rate and elapsed >= self.limits.slow_grace_s and self.received < rate * elapsed:
            return (f"too slow: {self.received} bytes in {elapsed:.0f} s "
                    f"(minimum {rate:g} bytes/s)")
        return None

    def stop(self, why: str) -> None:
        """Any thread: end the attempt; a blocked read returns at once."""
        with self._lock:
            if self.why is None:
                self.why = why
            socks = list(self._socks)
        for sock in socks:
            _shutdown(sock)

    def connected(self, sock: socket.socket, host: str, proxied: bool) -> None:
        """A connection of this attempt (new or reused): watch it, check where it leads."""
        with self._lock:
            if all(s is not sock for s in self._socks):
                self._socks.append(sock)
            why = self.why
        try:
            if why is not None:
                raise OSError(why)
            if not proxied:  # else the peer is the proxy the administrator set
                self.hosts().check_peer(host, sock.getpeername()[0])
        except MediaError as e:
            self.refused = e
            sock.close()
            raise OSError(e.message) from None
        except OSError:
            sock.close()
            raise


def _shutdown(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also under TLS: wakes a read blocked on another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_current = threading.local()  # .attempt: the attempt this worker thread is making


def _report(conn: Any, sock: socket.socket | None) -> None:
    attempt = getattr(_current, "attempt", None)
    if attempt is not None and sock is not None:
        attempt.connected(sock, conn.host, proxied=bool(getattr(conn, "proxy", None)))


class Watchdog:
    """Stops attempts past their deadline or too slow. Its thread runs only while there are
    attempts to watch."""

    def __init__(self, tick_s: float = WATCH_TICK_S) -> None:
        self.tick_s = tick_s
        self._attempts: set[Attempt] = set()
        self._lock = threading.Lock()
        self._running = False

    def add(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.add(attempt)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="media-watchdog", daemon=True).start()

    def discard(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.discard(attempt)

    def stop_all(self, why: str) -> None:
        with self._lock:
            attempts = list(self._attempts)
        for attempt in attempts:
            attempt.stop(why)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._attempts:
                    self._running = False
                    return
                attempts = list(self._attempts)
            for attempt in attempts:
                why = attempt.verdict()
                if why is not None:
                    attempt.stop(why)
            time.sleep(self.tick_s)


def watched_session() -> requests.Session:
    """A requests session whose connections report their sockets to the current attempt
    (before the TLS handshake and before any byte of the request)."""
    requests = _requests()
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Watched:
        def _new_conn(self):
            sock = super()._new_conn()  # type: ignore[misc]
            _report(self, sock)
            return sock

        def request(self, *args, **kw):  # a kept-alive connection used again
            _report(self, getattr(self, "sock", None))
            return super().request(*args, **kw)  # type: ignore[misc]

    class Conn(Watched, HTTPConnection):
        pass

    class TlsConn(Watched, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = TlsConn

    pools = {"http": Pool, "https": TlsPool}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kw):
            super().init_poolmanager(*args, **kw)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, *args, **kw):
            manager = super().proxy_manager_for(*args, **kw)
            manager.pool_classes_by_scheme = pools
            return manager

    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, Adapter())
    return session


class Downloader:
    """Fetches a URL into a file, verified against its sha256 (thread-safe; the caller keeps
    one download per file at a time)."""

    def __init__(self, limits: Limits, *, hosts: Callable[[], HostRules], clock: Clock,
                 sleep: Callable[[float], None] = time.sleep,
                 session: requests.Session | None = None) -> None:
        self.limits = limits
        self._hosts = hosts
        self._clock = clock
        self._sleep = sleep
        self._session_obj = session
        self._session_lock = threading.Lock()
        self.watchdog = Watchdog()
        self._validators: dict[str, str] = {}  # partial file -> its If-Range value

    @property
    def _session(self) -> requests.Session:
        with self._session_lock:
            if self._session_obj is None:
                self._session_obj = watched_session()
            return self._session_obj

    def close(self) -> None:
        """Stop the downloads under way (they fail at once) and close the connections."""
        self.watchdog.stop_all("the agent is stopping")
        if self._session_obj is not None:
            self._session_obj.close()

    def download(self, url: str, sha: str, dest: Path) -> int:
        """Write the file at ``url`` to ``dest`` (resuming what ``dest`` holds), fsynced,
        after checking it hashes to ``sha``; return its size. Raise :class:`MediaError`."""
        lim = self.limits
        deadline = self._clock.monotonic() + lim.timeout_s
        failures, last, afresh = 0, "", False
        while True:
            before = _size(dest)
            try:
                return self._attempt(url, sha, dest, deadline)
            except _Retry as e:
                last = str(e)
            except _Stopped:
                raise  # what arrived is kept for a later fetch
            except MediaError as e:
                self._drop(dest)
                if isinstance(e, _Mismatch) and e.resumed and not afresh:
                    afresh = True  # the part kept may be of an older version of the file
                    log.info("%s: %s after resuming; starting afresh", redact(url), e)
                    continue
                raise
            failures = 0 if _size(dest) > before else failures + 1
            log.info("download of %s failed (%s): %s", redact(url),
                     f"{failures} in a row" if failures else "resumable", last)
            if failures > lim.retries:
                raise MediaError("media_unavailable", f"{redact(url)}: {last}")
            wait = min(lim.backoff_s * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)
            if self._clock.monotonic() + wait >= deadline:
                raise MediaError("media_unavailable", f"{redact(url)}: deadline: not complete "
                                 f"within {lim.timeout_s:g} s (last attempt: {last})")
            self._sleep(wait)

    def _drop(self, dest: Path) -> None:
        _unlink(dest)
        self._validators.pop(str(dest), None)

    def _attempt(self, url: str, sha: str, dest: Path, deadline: float) -> int:
        attempt = Attempt(self.limits, self._clock, deadline, self._hosts)
        _current.attempt = attempt
        self.watchdog.add(attempt)
        try:
            have = _size(dest)
            resp = self._open(url, attempt, self._range_headers(dest, have))
            try:
                return self._receive(resp, sha, dest, attempt, self._start_at(resp, dest, have))
            finally:
                resp.close()
        except (OSError, _urllib3_error()) as e:  # requests' errors are OSErrors
            self._raise_stopped(url, attempt)
            raise _Retry(f"{type(e).__name__}: {e}") from None
        finally:
            self.watchdog.discard(attempt)
            _current.attempt = None

    def _range_headers(self, dest: Path, have: int) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}  # Range counts the bytes we hash
        if have:
            headers["Range"] = f"bytes={have}-"
            validator = self._validators.get(str(dest))
            if validator is not None:
                headers["If-Range"] = validator
        return headers

    def _start_at(self, resp: requests.Response, dest: Path, have: int) -> int:
        """Where the body goes in ``dest``: at ``have`` when the server resumes there, at 0
        when it sends the whole file. A resume from elsewhere drops the partial file."""
        code = resp.status_code
        if code == 206:
            m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if have and m and int(m["start"]) == have:
                self._check_size(m["total"], resp)
                return have
            self._drop(dest)
            raise _Retry(f"asked for bytes from {have}, got {resp.headers.get('Content-Range')}"
                         ": starting afresh")
        if code == 416 and have:
            self._drop(dest)
            raise _Retry(f"bytes from {have} not satisfiable: starting afresh")
        self._check_status(resp)
        etag = resp.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else \
            resp.headers.get("Last-Modified")
        if validator:
            self._validators[str(dest)] = validator
        else:
            self._validators.pop(str(dest), None)
        return 0

    def _raise_stopped(self, url: str, attempt: Attempt) -> None:
        """The attempt's end, when the watchdog or a connection check caused it."""
        if attempt.refused is not None:
            raise attempt.refused
        if attempt.why is not None:
            raise _Stopped("media_unavailable", f"{redact(url)}: {attempt.why}")

    def _open(self, url: str, attempt: Attempt, headers: dict[str, str]) -> requests.Response:
        """GET with redirects followed by hand, each hop checked against the host rules."""
        lim = self.limits
        for _ in range(MAX_REDIRECTS + 1):
            timeout = (min(CONNECT_TIMEOUT_S, lim.read_timeout_s), lim.read_timeout_s)
            resp = self._session.get(url, stream=True, timeout=timeout, allow_redirects=False,
                                     headers=headers)
            if resp.is_redirect:
                resp.close()
                url = urljoin(url, resp.headers.get("Location", ""))
                self._hosts().check_url(url)
                continue
            return resp
        raise MediaError("media_unavailable", f"more than {MAX_REDIRECTS} redirects")

    def _check_status(self, resp: requests.Response) -> None:
        code = resp.status_code
        if code == 200:
            self._check_size(resp.headers.get("Content-Length"), resp)
            return
        resp.close()
        if code >= 500 or code in (408, 429):
            raise _Retry(f"HTTP {code}")
        raise MediaError("media_unavailable", f"HTTP {code} from {redact(resp.url)}")

    def _check_size(self, length: str | None, resp: requests.Response) -> None:
        if length and length.isdigit() and int(length) > self.limits.max_bytes:
            resp.close()
            raise MediaError("media_unavailable", f"media is {length} bytes, more than the "
                             f"limit {self.limits.max_bytes}")

    def _receive(self, resp: requests.Response, sha: str, dest: Path, attempt: Attempt,
                 offset: int) -> int:
        """Append the body to ``dest`` from ``offset`` on; check the whole file's sha256."""
        raw = resp.raw
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if encoded and offset:
            self._drop(dest)
            raise _Retry("a compressed response cannot resume: starting afresh")
        read = partial(getattr(raw, "read1", None) or raw.read, decode_content=encoded)
        with _disk():
            digest = hash_file(dest) if offset else hashlib.sha256()
            f = open(dest, "ab" if offset else "wb")  # noqa: SIM115 - closed below
        size = offset
        try:
            with f:
                while chunk := read(CHUNK):
                    size += len(chunk)
                    if size > self.limits.max_bytes:
                        raise MediaError("media_unavailable", "media exceeds the limit of "
                                         f"{self.limits.max_bytes} bytes")
                    attempt.received += len(chunk)
                    why = attempt.verdict()  # the watchdog's check, at once
                    if why is not None:
                        attempt.stop(why)
                        break
                    digest.update(chunk)
                    with _disk():
                        f.write(chunk)
                with _disk():
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            if encoded:  # decoded bytes: no offset to resume from
                self._drop(dest)
            raise
        self._raise_stopped(resp.url, attempt)
        length = resp.headers.get("Content-Length")
        if not encoded and length and length.isdigit() and offset + int(length) != size:
            raise _Retry(f"connection closed after {size} of {offset + int(length)} bytes")
        if digest.hexdigest() != sha:
            raise _Mismatch(f"sha256 is {digest.hexdigest()}, expected {sha}", offset > 0)
        return size


def hash_file(path: Path) -> Any:
    """A sha256 object fed with the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextmanager
def _disk() -> Iterator[None]:
    """File errors are the cache's (final), not the network's (retried)."""
    try:
        yield
    except OSError as e:
        raise MediaError("media_unavailable", f"cannot write the cache: {e}") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _requests():
    import requests

    return requests


def _urllib3_error() -> type[Exception]:
    import urllib3.exceptions

    return urllib3.exceptions.HTTPError
