"""Live relay logic on a fake clock: failover chain, fallback loop, dead air, primary re-probe."""

from __future__ import annotations

import http.server
import threading

import pytest

from agent.audio.live import (
    STABLE_S,
    LiveOptions,
    LiveRelay,
    as_http,
    probe_url,
)
from agent.core.clock import FakeClock
from tests.conftest import free_port

P, B1, B2, F = "http://p/s", "http://b1/s", "rtsp://b2/s", "/cache/fallback"


def relay(clock: FakeClock, backups=(B1, B2), fallback=F, **opts) -> LiveRelay:
    r = LiveRelay(P, list(backups), fallback, clock, LiveOptions(**opts))
    r.rejoin()
    return r


def test_chain_goes_primary_backups_fallback_then_exhausted():
    clock = FakeClock()
    r = relay(clock)
    assert r.current() == P
    assert r.failed("error") == B1
    assert r.failed("error") == B2
    assert r.failed("stream_ended") == F and r.on_fallback()
    assert r.ended() == F  # the fallback file loops
    assert r.failed("error") is None and r.current() is None
    assert [s.reason for s in r.switches] == ["rejoin", "error", "error", "stream_ended"]


def test_a_stream_that_ends_is_left_for_the_next():
    r = relay(FakeClock(), backups=(B1,), fallback=None)
    assert r.ended() == B1
    assert r.ended() is None


def test_rejoin_starts_from_the_primary():
    r = relay(FakeClock())
    r.failed("error")
    r.failed("error")
    assert r.rejoin() == P and r.current() == P and not r.probe_due()


def test_no_progress_after_the_start_grace_is_dead_air():
    clock = FakeClock()
    r = relay(clock, start_grace_s=10, dead_air_s=5)
    for _ in range(9):
        clock.advance(1)
        assert not r.observe(0)
    clock.advance(1)
    assert r.observe(0)


def test_position_stall_is_dead_air_after_dead_air_s():
    clock = FakeClock()
    r = relay(clock, dead_air_s=5)
    pos = 0
    for _ in range(30):  # flowing: never dead
        clock.advance(1)
        pos += 1000
        assert not r.observe(pos)
    for _ in range(4):
        clock.advance(1)
        assert not r.observe(pos)
    clock.advance(1)
    assert r.observe(pos)
    assert r.failed("dead_air") == B1
    assert not r.observe(0)  # the next source gets a fresh start grace


def test_silence_on_a_stream_is_dead_air_but_not_on_the_fallback():
    clock = FakeClock()
    r = relay(clock, dead_air_s=3, silence_dbfs=-50)
    pos = 0
    results = []
    for _ in range(4):
        clock.advance(1)
        pos += 1000
        results.append(r.observe(pos, -80.0))
    assert results == [False, False, False, True]  # silent since the first sample, 3 s ago
    r.failed("dead_air")
    r.failed("dead_air")
    r.failed("dead_air")
    assert r.on_fallback()
    for _ in range(10):
        clock.advance(1)
        pos += 1000
        assert not r.observe(pos, -90.0)


def test_a_level_blip_resets_the_silence_timer():
    clock = FakeClock()
    r = relay(clock, dead_air_s=3)
    pos = 0
    for level in (-80, -80, -20, -80, -80, -20, -80, -80):
        clock.advance(1)
        pos += 1000
        assert not r.observe(pos, float(level))


def until_probe_due(r: LiveRelay, clock: FakeClock) -> float:
    """Advance the clock a second at a time until a probe is due; return the wait."""
    start = clock.monotonic()
    while not r.probe_due():
        clock.advance(1)
    return clock.monotonic() - start


def test_primary_reprobe_backs_off_and_switches_back():
    clock = FakeClock()
    r = relay(clock, probe_min_s=10, probe_max_s=40)
    r.failed("error")
    assert not r.probe_due() and r.next_deadline() == pytest.approx(clock.monotonic() + 10)
    delays = []
    for _ in range(4):
        delays.append(until_probe_due(r, clock))
        assert r.probe_started() == P and not r.probe_due() and r.next_deadline() is None
        assert r.probe_result(False) is None and r.current() == B1
    assert delays == [10, 20, 40, 40]
    until_probe_due(r, clock)
    r.probe_started()
    assert r.probe_result(True) == P and r.current() == P
    assert r.switches[-1].reason == "primary_back"
    pos = 0
    for _ in range(int(STABLE_S) + 1):  # the primary airs well for a minute ...
        clock.advance(1)
        pos += 1000
        assert not r.observe(pos)
    r.failed("error")  # ... so the backoff starts again from the minimum
    assert r.next_deadline() == pytest.approx(clock.monotonic() + 10)


def test_a_primary_that_answers_probes_but_keeps_dying_is_retried_less_often():
    clock = FakeClock()
    r = relay(clock, probe_min_s=10, probe_max_s=80, dead_air_s=5, start_grace_s=5)
    r.failed("dead_air")
    waits = []
    for _ in range(4):
        waits.append(until_probe_due(r, clock))
        r.probe_started()
        assert r.probe_result(True) == P  # the probe gets bytes ...
        pos = 0
        while not r.observe(pos):  # ... but the stream stalls again
            clock.advance(1)
        assert r.failed("dead_air") == B1
    assert waits == [10, 20, 40, 80]


def test_report_lists_switches():
    clock = FakeClock()
    r = relay(clock)
    r.failed("error")
    rep = r.report()
    assert rep["source"] == B1
    assert [(s["source"], s["reason"]) for s in rep["switches"]] == [(P, "rejoin"), (B1, "error")]


def test_as_http_keeps_host_and_port():
    assert as_http("rtsp://cam.example.vn:8554/a") == "http://cam.example.vn:8554/a"
    assert as_http("https://x/y") == "https://x/y"


def test_probe_url_against_a_real_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/ok":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 8192)
            elif self.path == "/short":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 10)
            else:
                self.send_error(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert probe_url(f"{base}/ok", 2)
        assert not probe_url(f"{base}/short", 2)
        assert not probe_url(f"{base}/missing", 2)
        assert not probe_url(f"http://127.0.0.1:{free_port()}/x", 2)
        assert not probe_url(f"rtsp://127.0.0.1:{free_port()}/x", 2)
    finally:
        httpd.shutdown()
