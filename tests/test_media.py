"""The media cache against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.audio.media import MediaCache, MediaError

BODY = os.urandom(50_000)
SHA = hashlib.sha256(BODY).hexdigest()
STOP = threading.Event()  # set at the end: slow handlers give up
TRICKLE_S = 2.0  # the slow handlers send one byte this often


def blob(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 256 for i in range(n))


@dataclass
class Served:
    """A file served with Range support (unless ``honor_range`` is off); ``cuts``: for the
    next requests, how many bytes of the response go out before the connection drops."""

    data: bytes
    etag: str | None = None
    honor_range: bool = True
    cuts: list[int] = field(default_factory=list)
    seen: list[tuple[str | None, str | None]] = field(default_factory=list)  # Range, If-Range
    sent: int = 0  # body bytes sent, all requests


SERVED: dict[str, Served] = {}


class Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()
    files: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # http.server names it so
        path = urlsplit(self.path).path
        n = Handler.hits[path] = Handler.hits[path] + 1
        if self.path.startswith("http://"):  # as a proxy: the same files
            Handler.hits[self.path] += 1
        if path == "/good" or path.startswith("/f/"):
            self._send(Handler.files.get(path, BODY))
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(urlsplit(self.path).query)["to"][0])
            self.end_headers()
        elif path == "/cut-once" and n > 1:
            self._send(BODY)
        elif path in ("/cut-once", "/cut-always"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif path == "/flaky" and n <= 2:
            self.send_error(503)
        elif path == "/flaky":
            self._send(BODY)
        elif path == "/no-length":  # streamed without Content-Length, closed at the end
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        elif path in SERVED:
            self._ranged(SERVED[path])
        elif path == "/trickle":  # a whole response, one byte every TRICKLE_S
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self._trickle(BODY)
        elif path == "/trickle-headers":  # even the headers come a byte at a time
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"X-Padding: " + b"a" * 1000)
        elif path == "/stall-once" and n == 1:  # some bytes, then silence with the link open
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:1000])
            self.wfile.flush()
            STOP.wait(8)
            self.close_connection = True
        elif path == "/stall-once":
            self._send(BODY)
        else:
            self.send_error(404)

    def _ranged(self, f: Served) -> None:
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        f.seen.append((rng, if_range))
        start = 0
        if rng and f.honor_range and if_range in (None, f.etag):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        body = f.data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}")
        if f.etag:
            self.send_header("ETag", f.etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = f.cuts.pop(0) if f.cuts else None
        body = body if cut is None else body[:cut]
        self.wfile.write(body)
        f.sent += len(body)
        if cut is not None:  # the link drops
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _trickle(self, data: bytes) -> None:
        self.close_connection = True
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if STOP.wait(TRICKLE_S):
                    return
        except OSError:  # the client hung up
            pass

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    STOP.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def reset_hits():
    Handler.hits.clear()
    SERVED.clear()


def make_cache(tmp_path: Path, **kw) -> MediaCache:
    kw.setdefault("allowed_hosts", ["127.0.0.1"])
    kw.setdefault("retries", 2)
    kw.setdefault("timeout_s", 10)
    return MediaCache(tmp_path / "media", sleep=lambda s: None, **kw)


def timed_failure(cache: MediaCache, url: str) -> tuple[MediaError, float]:
    """The error fetching ``url`` ends with, and how long it took (s)."""
    start = time.monotonic()
    with pytest.raises(MediaError) as e:
        cache.fetch(url, SHA)
    return e.value, time.monotonic() - start


def leftovers(cache: MediaCache) -> list[str]:
    return sorted(p.name for p in cache.dir.iterdir())


def test_good_fetch_then_cached(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    path = cache.fetch(f"{server}/good", SHA.upper())
    assert Path(path).read_bytes() == BODY and Path(path).name == SHA
    assert cache.fetch(f"{server}/good", SHA) == path and Handler.hits["/good"] == 1
    assert cache.path_for(SHA) == path and leftovers(cache) == [SHA]


def test_checksum_mismatch_is_never_kept(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    wrong = "0" * 64
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}/good", wrong)
    assert e.value.reason == "media_checksum"
    assert leftovers(cache) == [] and cache.path_for(wrong) is None
    assert Handler.hits["/good"] == 1  # a wrong checksum is not retried


def test_download_cut_midway_is_retried_without_partial_file(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    path = cache.fetch(f"{server}/cut-once", SHA)
    assert Path(path).read_bytes() == BODY and Handler.hits["/cut-once"] == 2
    assert leftovers(cache) == [SHA]


def test_download_always_cut_gives_unavailable_and_only_a_partial_file(tmp_path,
                                                                         server) -> None:
    cache = make_cache(tmp_path, retries=2)
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}/cut-always", SHA)
    # the first cut brought bytes (free); the server ignores Range: 3 more without progress
    assert e.value.reason == "media_unavailable" and Handler.hits["/cut-always"] == 4
    assert leftovers(cache) == [f".{SHA}.part"] and cache.path_for(SHA) is None


def test_server_errors_are_retried_with_backoff(tmp_path, server) -> None:
    waits: list[float] = []
    cache = MediaCache(tmp_path / "m", allowed_hosts=["127.0.0.1"], retries=3, backoff_s=1,
                       sleep=waits.append)
    assert Path(cache.fetch(f"{server}/flaky", SHA)).read_bytes() == BODY
    assert waits == [1, 2]


def test_not_found_is_unavailable_at_once(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}/missing", SHA)
    assert e.value.reason == "media_unavailable" and Handler.hits["/missing"] == 1


@pytest.mark.parametrize("path", ["/good", "/no-length"])
def test_size_limit(tmp_path, server, path) -> None:
    cache = make_cache(tmp_path, max_bytes=len(BODY) - 1)
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}{path}", SHA)
    assert e.value.reason == "media_unavailable" and "limit" in e.value.message
    assert leftovers(cache) == []


def test_redirect_to_allowed_host_is_followed(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    assert cache.fetch(f"{server}/redirect?to=/good", SHA)
    assert Handler.hits["/good"] == 1


def test_redirect_to_other_host_is_refused(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    port = urlsplit(server).port
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}/redirect?to=http://localhost:{port}/good", SHA)
    assert e.value.reason == "media_host" and Handler.hits["/good"] == 0


def test_unlisted_host_is_refused_before_any_request(tmp_path, server) -> None:
    cache = make_cache(tmp_path, allowed_hosts=["media.example.vn"])
    with pytest.raises(MediaError) as e:
        cache.fetch(f"{server}/good", SHA)
    assert e.value.reason == "media_host" and Handler.hits["/good"] == 0


ALLOWED = ["media.example.vn"]


@pytest.mark.parametrize("url", [
    "http://media.example.vn/a.mp3",
    "HTTPS://Media.Example.VN:8443/a.mp3",
    "https://media.example.vn./a.mp3",
])
def test_allowed_urls(tmp_path, url) -> None:
    make_cache(tmp_path, allowed_hosts=ALLOWED).check_url(url)


LOCAL = [  # this device and its link, in the spellings a resolver accepts
    "http://127.0.0.1/x.mp3",
    "http://127.1/x.mp3",
    "http://2130706433/x.mp3",
    "http://0x7f.0.0.1/x.mp3",
    "http://[::1]/x.mp3",
    "http://[::ffff:127.0.0.1]/x.mp3",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/x.mp3",
    "http://0.0.0.0/x.mp3",
    "http://224.0.0.1/x.mp3",
    "http://localhost:8080/x.mp3",
    "http://LocalHost./x.mp3",
    "http://a.localhost/x.mp3",
]


@pytest.mark.parametrize("hosts,url", [(ALLOWED, u) for u in [
    "ftp://media.example.vn/a.mp3",
    "file:///etc/passwd",
    "media.example.vn/a.mp3",
    "http://evil.vn/a.mp3",
    "http://media.example.vn.evil.vn/a.mp3",
    "http://evilmedia.example.vn/a.mp3",
    "http://media.example.vn@evil.vn/a.mp3",
    "http://user:pw@media.example.vn/a.mp3",
    "http://evil.vn\\@media.example.vn/a.mp3",
    "http://media.example.vn /a.mp3",
    "http://media.example.vn:99999/a.mp3",
    "http://10.0.0.1/a.mp3",
    "http:///a.mp3",
    *LOCAL,
]] + [([], u) for u in LOCAL])  # an empty list: any host but this device and its link
def test_refused_urls(tmp_path, hosts, url) -> None:
    with pytest.raises(MediaError) as e:
        make_cache(tmp_path, allowed_hosts=hosts).check_url(url)
    assert e.value.reason == "media_host"


@pytest.mark.parametrize("url", [
    "https://cdn.anywhere.vn/x.mp3",
    "http://10.0.0.1/x.mp3",  # a district server on the VPN
    "http://203.113.131.1:8080/x.mp3",
    "http://[2001:db8::1]/x.mp3",
])
def test_empty_list_allows_any_host_by_name_or_address(tmp_path, url) -> None:
    make_cache(tmp_path, allowed_hosts=[]).check_url(url)


def test_listed_loopback_and_ipv6_entries_are_allowed(tmp_path) -> None:
    cache = make_cache(tmp_path, allowed_hosts=["127.0.0.1", "[::1]", "LocalHost"])
    for url in ("http://127.0.0.1:8080/x", "http://[::1]:8080/x", "http://localhost/x"):
        cache.check_url(url)


def test_set_hosts_replaces_the_allow_list_at_run_time(tmp_path) -> None:
    cache = make_cache(tmp_path, allowed_hosts=["media.example.vn"])
    cache.check_url("http://media.example.vn/a.mp3")  # remembered as passed
    cache.set_hosts(["cdn.example.vn"])
    cache.check_url("http://cdn.example.vn/a.mp3")
    with pytest.raises(MediaError):
        cache.check_url("http://media.example.vn/a.mp3")
    cache.set_hosts([])
    cache.check_url("http://media.example.vn/a.mp3")
    with pytest.raises(MediaError):
        cache.check_url("http://127.0.0.1/a.mp3")


def test_listed_ip_must_match_exactly(tmp_path) -> None:
    cache = make_cache(tmp_path, allowed_hosts=["127.0.0.1"])
    cache.check_url("http://127.0.0.1:8080/x")
    with pytest.raises(MediaError):
        cache.check_url("http://127.1:8080/x")


def test_quota_evicts_least_recently_used_but_never_pinned(tmp_path, server) -> None:
    bodies = {name: blob(1000, i) for i, name in enumerate("abcd")}
    shas = {name: hashlib.sha256(b).hexdigest() for name, b in bodies.items()}
    Handler.files.update({f"/f/{n}": b for n, b in bodies.items()})
    cache = make_cache(tmp_path, quota_mb=3000 / (1024 * 1024))
    for name in "abc":
        cache.fetch(f"{server}/f/{name}", shas[name])
    assert cache.path_for(shas["a"])  # a is now the most recently used
    cache.set_pinned([shas["b"]])  # b is the oldest but a schedule needs it
    cache.fetch(f"{server}/f/d", shas["d"])
    assert sorted(leftovers(cache)) == sorted(shas[n] for n in "abd")
    assert cache.path_for(shas["c"]) is None
    assert cache.usage()["bytes"] == 3000


def test_start_removes_stale_partial_files_and_corrupt_media(tmp_path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / f".{SHA}.1234.part").write_bytes(BODY[:100])  # an older version's temp name
    other = hashlib.sha256(b"other").hexdigest()
    (media / f".{other}.part").write_bytes(b"ot")  # not resumed for two days
    os.utime(media / f".{other}.part", (time.time() - 2 * 86400,) * 2)
    (media / f".{'1' * 64}.part").write_bytes(b"12")  # recent: kept to be resumed
    (media / SHA).write_bytes(BODY[:-1] + b"x")  # bit rot on the SD card
    cache = make_cache(tmp_path)
    assert leftovers(cache) == [f".{'1' * 64}.part", SHA]
    assert cache.path_for(SHA) is None and leftovers(cache) == [f".{'1' * 64}.part"]


def test_verified_file_changed_later_is_rechecked(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    path = Path(cache.fetch(f"{server}/good", SHA))
    path.write_bytes(b"tampered")
    assert cache.path_for(SHA) is None and not path.exists()


def test_submit_shares_one_download(tmp_path, server) -> None:
    cache = make_cache(tmp_path)
    futures = [cache.submit(f"{server}/good", SHA) for _ in range(3)]
    assert {f.result(timeout=10) for f in futures} == {str(cache.dir / SHA)}
    assert Handler.hits["/good"] == 1
    cache.close()


# --- resuming (HTTP Range) -----------------------------------------------------------------

BIG = blob(300_000, 7)
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def serve(path: str, data: bytes, **kw) -> tuple[str, Served]:
    SERVED[path] = Served(data, **kw)
    return path, SERVED[path]


def test_a_download_cut_three_times_resumes_to_the_right_file(tmp_path, server) -> None:
    path, f = serve("/big", BIG, cuts=[70_000, 80_000, 90_000])
    cache = make_cache(tmp_path, retries=2)  # fewer than the cuts: each brought bytes
    got = Path(cache.fetch(f"{server}{path}", BIG_SHA))
    assert got.read_bytes() == BIG and got.name == BIG_SHA
    assert f.seen == [(None, None), ("bytes=70000-", None), ("bytes=150000-", None),
                      ("bytes=240000-", None)]
    assert f.sent == len(BIG)  # no byte sent twice
    assert leftovers(cache) == [BIG_SHA]


def test_a_server_ignoring_range_restarts_cleanly(tmp_path, server) -> None:
    path, f = serve("/plain", BODY, honor_range=False, cuts=[20_000])
    cache = make_cache(tmp_path)
    assert Path(cache.fetch(f"{server}{path}", SHA)).read_bytes() == BODY
    assert f.seen == [(None, None), ("bytes=20000-", None)]  # asked, answered 200: from 0
    assert f.sent == 20_000 + len(BODY)


def test_a_partial_download_resumes_after_a_restart(tmp_path, server) -> None:
    path, f = serve("/big", BIG, cuts=[100_000, 0])  # then a cut that brings nothing
    with pytest.raises(MediaError) as e:
        make_cache(tmp_path, retries=0).fetch(f"{server}{path}", BIG_SHA)
    assert e.value.reason == "media_unavailable"
    again = make_cache(tmp_path)  # the agent restarted
    assert Path(again.fetch(f"{server}{path}", BIG_SHA)).read_bytes() == BIG
    assert f.seen[-1] == ("bytes=100000-", None) and f.sent == len(BIG)


@pytest.mark.parametrize("etag", ['"v1"', None])
def test_a_partial_of_an_older_version_is_not_kept(tmp_path, server, etag) -> None:
    """The URL's file changed between attempts: with an ETag, If-Range makes the server send
    the new file whole; without, the whole file's sha256 fails once and it starts afresh."""
    new = blob(50_000, 99)
    path, f = serve("/news", BODY, etag=etag, cuts=[20_000, 0])
    cache = make_cache(tmp_path, retries=0)
    with pytest.raises(MediaError):
        cache.fetch(f"{server}{path}", hashlib.sha256(new).hexdigest())
    f.data, f.etag = new, etag and '"v2"'
    assert Path(cache.fetch(f"{server}{path}", hashlib.sha256(new).hexdigest())).read_bytes() \
        == new
    if etag:
        assert f.seen[2:] == [("bytes=20000-", '"v1"')]
    else:
        assert f.seen[2:] == [("bytes=20000-", None), (None, None)]


# --- a server that trickles or stalls: time bounds (correctness, not speed) ---------------

MARGIN_S = 1.5  # the watchdog's tick, thread wake-ups on a busy machine


def test_trickled_body_fails_at_the_deadline(tmp_path, server) -> None:
    cache = make_cache(tmp_path, timeout_s=4, min_bytes_per_s=0)  # the deadline alone
    err, elapsed = timed_failure(cache, f"{server}/trickle")
    assert err.reason == "media_unavailable" and "deadline" in err.message
    assert elapsed < 4 + MARGIN_S
    assert Handler.hits["/trickle"] == 1
    assert leftovers(cache) == [f".{SHA}.part"]  # what came is kept for a later fetch


def test_trickled_headers_fail_at_the_deadline(tmp_path, server) -> None:
    """No byte of the body ever arrives: only a watchdog on the socket bounds this."""
    cache = make_cache(tmp_path, timeout_s=3, min_bytes_per_s=0)
    err, elapsed = timed_failure(cache, f"{server}/trickle-headers")
    assert err.reason == "media_unavailable" and "deadline" in err.message
    assert elapsed < 3 + MARGIN_S


def test_trickle_below_the_minimum_rate_fails_after_the_grace(tmp_path, server) -> None:
    cache = make_cache(tmp_path, timeout_s=60, min_bytes_per_s=100, slow_grace_s=2)
    err, elapsed = timed_failure(cache, f"{server}/trickle")
    assert err.reason == "media_unavailable" and "too slow" in err.message
    assert elapsed < 2 + MARGIN_S
    assert Handler.hits["/trickle"] == 1  # too slow is final: not retried


def test_a_silent_link_is_dropped_after_the_read_timeout_and_retried(tmp_path, server) -> None:
    cache = make_cache(tmp_path, read_timeout_s=1)
    start = time.monotonic()
    assert Path(cache.fetch(f"{server}/stall-once", SHA)).read_bytes() == BODY
    assert time.monotonic() - start < 1 + MARGIN_S + 1  # not the 8 s of silence
    assert Handler.hits["/stall-once"] == 2


def test_close_stops_a_download_under_way(tmp_path, server) -> None:
    cache = make_cache(tmp_path, timeout_s=60, min_bytes_per_s=0)
    fut = cache.submit(f"{server}/trickle", SHA)
    wait_until_hit("/trickle")
    start = time.monotonic()
    cache.close()
    with pytest.raises(MediaError) as e:
        fut.result(timeout=5)
    assert "stopping" in e.value.message and time.monotonic() - start < MARGIN_S


def wait_until_hit(path: str, n: int = 1) -> None:
    end = time.monotonic() + 5
    while Handler.hits[path] < n:
        assert time.monotonic() < end, f"{path} never requested"
        time.sleep(0.02)


@pytest.fixture
def resolve_to_loopback(monkeypatch):
    """``media.test`` resolves to 127.0.0.1 (as a hostile DNS answer would)."""
    real = socket.getaddrinfo

    def fake(host, *args, **kw):
        return real("127.0.0.1" if host == "media.test" else host, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_resolving_to_loopback_is_refused_unless_listed(tmp_path, server,
                                                                resolve_to_loopback) -> None:
    url = f"http://media.test:{urlsplit(server).port}/good"
    with pytest.raises(MediaError) as e:
        make_cache(tmp_path, allowed_hosts=[]).fetch(url, SHA)
    assert e.value.reason == "media_host" and "127.0.0.1" in e.value.message
    assert Handler.hits["/good"] == 0  # refused on the socket, before any request
    listed = make_cache(tmp_path, allowed_hosts=["media.test"])
    assert Path(listed.fetch(url, SHA)).read_bytes() == BODY


def test_through_a_proxy_the_proxy_is_the_peer(tmp_path, server, monkeypatch) -> None:
    """The handler answers absolute-form requests as an HTTP proxy would."""
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server)
    cache = make_cache(tmp_path, allowed_hosts=[])
    assert Path(cache.fetch("http://media.example.vn/good", SHA)).read_bytes() == BODY
    assert Handler.hits["http://media.example.vn/good"] == 1


def test_redact_hides_credentials_and_query_tokens():
    from agent.audio.hosts import redact

    assert redact("https://u:secret@media.example.vn:8443/a/b.mp3?token=abc") == \
        "https://media.example.vn:8443/a/b.mp3?…"
    assert redact("http://media.example.vn/x.wav") == "http://media.example.vn/x.wav"
    assert "secret" not in redact("http://user:secret@[::1/x")
