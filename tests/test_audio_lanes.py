"""Priority lanes: an emergency (or priority) download or rendering never waits behind normal
ones — the pool itself (:mod:`agent.audio.lanes`), then the audio service with sim output
against a local HTTP server whose normal media trickle a byte every 2 s."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent import protocol
from agent.audio.lanes import Lanes
from agent.audio.tone import write_tone
from agent.core.clock import SystemClock
from agent.protocol import Priority
from tests.fakes import make_core

E, P, N = Priority.EMERGENCY, Priority.PRIORITY, Priority.NORMAL
PROMPT_S = 5.0  # "promptly": the normal downloads below would hold a worker for minutes


# --- the pool -------------------------------------------------------------------------------

def test_jobs_run_most_urgent_first_then_in_arrival_order() -> None:
    lanes = Lanes(1, name="t", reserved=())
    gate, busy, order = threading.Event(), threading.Event(), []
    lanes.submit(lambda: (busy.set(), gate.wait()))  # holds the one worker...
    assert busy.wait(5)  # ...once it runs: before that, it would pick the most urgent of the rest
    done = [lanes.submit(order.append, name, lane=lane)
            for name, lane in [("n1", N), ("p1", P), ("e1", E), ("n2", N), ("p2", P)]]
    gate.set()
    for fut in done:
        fut.result(timeout=5)
    assert order == ["e1", "p1", "p2", "n1", "n2"]
    lanes.shutdown()


def test_kept_workers_run_urgent_jobs_while_normal_ones_hang() -> None:
    lanes = Lanes(2, name="t")
    gate = threading.Event()
    normal = [lanes.submit(gate.wait) for _ in range(4)]  # two hang, two wait
    assert lanes.submit(lambda: "e", lane=E).result(timeout=PROMPT_S) == "e"
    assert lanes.submit(lambda: "p", lane=P).result(timeout=PROMPT_S) == "p"
    hang_p = lanes.submit(gate.wait, lane=P)  # the priority worker now hangs too...
    assert lanes.submit(lambda: "e", lane=E).result(timeout=PROMPT_S) == "e"  # ...not emergency's
    assert not any(f.done() for f in [*normal, hang_p])
    gate.set()
    assert all(f.result(timeout=5) for f in normal)
    lanes.shutdown()


def test_shutdown_cancels_waiting_jobs_and_refuses_new_ones() -> None:
    lanes = Lanes(1, name="t", reserved=())
    gate, busy = threading.Event(), threading.Event()
    running = lanes.submit(lambda: (busy.set(), gate.wait())[1])
    assert busy.wait(5)
    waiting = lanes.submit(lambda: None)
    lanes.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled() and not running.done()
    with pytest.raises(RuntimeError):
        lanes.submit(lambda: None)
    gate.set()
    assert running.result(timeout=5) is True


def test_an_exception_reaches_the_future() -> None:
    lanes = Lanes(1, name="t")
    with pytest.raises(ZeroDivisionError):
        lanes.submit(lambda: 1 / 0).result(timeout=5)
    lanes.shutdown()


# --- the audio service: sim output, a real core on the system clock -------------------------

class Trickler:
    """``/slow/NAME``: a 1 MB response sent a byte every 2 s; ``/good.wav``: a short tone."""

    def __init__(self, wav: bytes) -> None:
        self.hits: Counter = Counter()
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.hits[self.path.rsplit("/", 1)[0]] += 1
                slow = self.path.startswith("/slow/")
                self.send_response(200)
                self.send_header("Content-Length", str(1_000_000 if slow else len(wav)))
                self.end_headers()
                if not slow:
                    self.wfile.write(wav)
                    return
                try:
                    while not server.stop.wait(2.0):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_urgent_request_for_media_still_waiting_is_queued_again_in_its_lane(tmp_path):
    from agent.audio.media import MediaCache

    tone = tmp_path / "tone.wav"
    write_tone(str(tone), hz=880, seconds=1.0, dbfs=-10)
    server = Trickler(tone.read_bytes())
    cache = MediaCache(tmp_path / "media", allowed_hosts=["127.0.0.1"], workers=1,
                       min_bytes_per_s=0)
    try:
        sha, url = hashlib.sha256(tone.read_bytes()).hexdigest(), f"{server.base}/good.wav"
        cache.submit(f"{server.base}/slow/0", os.urandom(32).hex())  # holds the one worker
        normal = cache.submit(url, sha)  # waits behind it
        assert cache.submit(url, sha) is normal  # shared
        urgent = cache.submit(url, sha, E)
        assert urgent is not normal and urgent.result(timeout=PROMPT_S).endswith(sha)
        assert cache.has(sha) and not normal.done()  # the normal job finds it cached, later
    finally:
        cache.close()
        server.close()


class FakeTts:
    def render(self, text: str, lang: str = "vi") -> str:
        return f"/tts/{lang}/{text}"


class Rig:
    """A core on the system clock with the real audio service (sim output, real pools) and
    media settings that leave only the lanes to keep a trickling download from blocking."""

    def __init__(self, tmp_path, keys) -> None:
        from agent.audio.service import AudioService

        tone = tmp_path / "tone.wav"
        write_tone(str(tone), hz=880, seconds=1.0, dbfs=-10)
        self.wav = tone.read_bytes()
        self.server = Trickler(self.wav)
        self.keys = keys
        self.core = make_core(tmp_path, clock=SystemClock(), trusted_keys={
            keys.kid: keys.public_b64}, extra={
            "amplifier": {"warm_up_s": 0, "idle_hold_s": 0},
            "security": {"media_hosts": ["127.0.0.1"]},
            "media": {"timeout_s": 600, "min_bytes_per_s": 0, "workers": 2}})
        self.core.link.connect()
        self.svc = AudioService(self.core, self.core.cfg, tts=FakeTts())
        self.svc.start()

    def send(self, typ: str, args: dict) -> str:
        env = self.keys.command("dev/dev-1", typ, args)
        self.core.on_message("ttcs/dev/dev-1/cmd", protocol.canonical(env), False)
        self.core.run_pending()
        return env["id"]

    def play_slow(self, n: int) -> list[str]:
        """``n`` normal plays whose media trickle; returns once all are being prepared."""
        ids = [self.send("play", {"media": {"url": f"{self.server.base}/slow/{i}.wav",
                                            "sha256": os.urandom(32).hex()}})
               for i in range(n)]
        self.pump(lambda: self.server.hits["/slow"] >= min(n, 2), "the slow downloads")
        return ids

    def stages(self, cmd_id: str) -> list[str]:
        return [a["stage"] for a in self.core.link.json("/ack") if a["id"] == cmd_id]

    def pump(self, pred, what: str, timeout: float = PROMPT_S) -> float:
        start = time.monotonic()
        while not pred():
            assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
            self.core.run_pending()
            time.sleep(0.01)
        return time.monotonic() - start

    def close(self) -> None:
        self.svc.close()
        self.core.store.close()
        self.server.close()


@pytest.fixture
def rig(tmp_path, keys):
    made = Rig(tmp_path, keys)
    yield made
    made.close()


@pytest.mark.parametrize("priority", ["emergency", "priority"])
def test_an_urgent_play_starts_while_two_normal_downloads_trickle(rig, priority) -> None:
    slow = rig.play_slow(2)  # the cache's two shared workers: both held
    urgent = rig.send("play", {"priority": priority, "media": {
        "url": f"{rig.server.base}/good.wav", "sha256": hashlib.sha256(rig.wav).hexdigest()}})
    rig.pump(lambda: "started" in rig.stages(urgent), f"the {priority} play to start")
    assert rig.stages(urgent) == ["received", "queued", "started"]
    assert all(rig.stages(i) == ["received"] for i in slow)  # still trickling


def test_an_emergency_say_starts_while_normal_preparations_fill_the_pool(rig) -> None:
    slow = rig.play_slow(4)  # the service's four shared workers wait on the cache
    say = rig.send("say", {"text": "Lũ quét", "priority": "emergency"})
    rig.pump(lambda: "started" in rig.stages(say), "the emergency say to start")
    assert all(rig.stages(i) == ["received"] for i in slow)
