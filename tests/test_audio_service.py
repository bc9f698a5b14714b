"""Audio on air, end to end: signed commands over a real mosquitto to a real agent process
playing through real libvlc into a WAV file (``--aout=afile``), media from a local http.server.

libvlc's afile output rewrites its file at every new play, so the WAV holds the last source
aired; assertions about earlier items use acks and play records.
"""

from __future__ import annotations

import array
import hashlib
import http.server
import math
import shutil
import socket
import subprocess
import threading
import time
import unicodedata
import wave
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.audio.commands import (
    validate_live,
    validate_play,
    validate_say,
    validate_stop,
    validate_test,
    validate_volume,
)
from agent.audio.records import merge_levels
from agent.audio.tone import write_tone
from agent.core.clock import FakeClock
from tests.conftest import Watcher, agent_config, free_port, wait_online, wait_until

pytest.importorskip("vlc")
pytestmark = pytest.mark.skipif(not ((shutil.which("espeak-ng") and shutil.which("mosquitto"))
                                     or Path("/usr/sbin/mosquitto").exists()),
                                reason="espeak-ng and mosquitto needed")

DEV = "krongpa-phutuc-c03"
CMD = f"ttcs/dev/{DEV}/cmd"
TEXT = ("Thông báo của Ủy ban nhân dân xã Phú Túc: bà con chú ý theo dõi thông tin về cơn "
        "bão số năm, chuẩn bị lương thực và gia cố nhà cửa.")


# --- media and an http server ------------------------------------------------------------

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    subprocess.run(["espeak-ng", "-v", "vi", "-w", str(folder / "speech.wav"), TEXT], check=True)
    write_tone(str(folder / "tone.wav"), hz=880, seconds=1.5, dbfs=-10)
    write_tone(str(folder / "short.wav"), hz=660, seconds=1.0, dbfs=-10)
    for name in ("big-a", "big-b"):  # ~620 KB each: two do not fit a 1 MB quota
        write_tone(str(folder / f"{name}.wav"), hz=440 if name == "big-a" else 550,
                   seconds=14, dbfs=-14)
    return folder


class Server:
    """Serves ``folder``; ``/cut/NAME`` sends half of NAME then drops the connection for the
    first ``cuts`` requests; ``/redirect?to=URL`` redirects; ``/stream`` is an endless WAV;
    ``/stall`` streams 1.5 s of it, then holds the connection open sending nothing (dead air);
    ``/flaky`` answers 503 while ``flaky_down`` is set, else streams."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.requests: list[str] = []
        self.cuts = 1
        self.flaky_down = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                elif self.path.startswith("/stream"):
                    server.stream(self)
                elif self.path.startswith("/stall"):
                    server.stream(self, blocks=15, then_hold_s=30)
                elif self.path.startswith("/flaky"):
                    if server.flaky_down:
                        self.send_error(503)
                    else:
                        server.stream(self)
                else:
                    server.file(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def file(self, h) -> None:
        cut = h.path.startswith("/cut/")
        path = self.folder / h.path.rsplit("/", 1)[-1]
        if not path.is_file():
            h.send_error(404)
            return
        data = path.read_bytes()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if cut and self.cuts > 0:
            self.cuts -= 1
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    def stream(self, h, blocks: int = 300, then_hold_s: float = 0) -> None:
        """A WAV header claiming a huge length, then a tone in real time (``blocks`` of
        0.1 s), then ``then_hold_s`` of silence on the wire with the connection open."""
        rate = 16000
        h.send_response(200)
        h.send_header("Content-Type", "audio/wav")
        h.end_headers()
        header = (b"RIFF" + (0x7FFFFFF0).to_bytes(4, "little") + b"WAVEfmt " +
                  (16).to_bytes(4, "little") + (1).to_bytes(2, "little") +
                  (1).to_bytes(2, "little") + rate.to_bytes(4, "little") +
                  (rate * 2).to_bytes(4, "little") + (2).to_bytes(2, "little") +
                  (16).to_bytes(2, "little") + b"data" + (0x7FFFFFD0).to_bytes(4, "little"))
        block = array.array("h", (int(8000 * math.sin(2 * math.pi * 500 * i / rate))
                                  for i in range(rate // 10))).tobytes()
        try:
            h.wfile.write(header)
            for _ in range(blocks):
                h.wfile.write(block)
                h.wfile.flush()
                time.sleep(0.1)
            time.sleep(then_hold_s)
        except OSError:
            pass

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def server(media):
    s = Server(media)
    yield s
    s.close()


# --- the agent ----------------------------------------------------------------------------

@pytest.fixture
def watcher(broker):
    w = Watcher(broker.port, ["ttcs/#"])
    yield w
    w.close()


class Rig:
    def __init__(self, tmp_path: Path, broker, keys, watcher, agent_factory, **overrides) -> None:
        self.tmp = tmp_path
        self.out = tmp_path / "out.wav"
        self.keys, self.watcher = keys, watcher
        languages = overrides.pop("languages", None)
        audio = {"backend": "vlc", "vlc_args": ["--aout=afile", f"--audiofile-file={self.out}"],
                 "resume_rewind_ms": 500, **overrides.pop("audio", {})}
        sections = {
            "audio": audio,
            "amplifier": {"warm_up_s": 0, "idle_hold_s": 0},
            "security": {"trusted_keys": {keys.kid: keys.public_b64},
                         "media_hosts": ["127.0.0.1"]},
            "media": {"retries": 2, "backoff_s": 0},
            "verification": {"backend": "sim"},
            "alerts": {"raise_after_s": 0, "clear_after_s": 0},
        }
        for k, v in overrides.items():
            sections.setdefault(k, {}).update(v)
        self.config = agent_config(tmp_path, broker.port, keys, **sections)
        if languages:
            cfg = yaml.safe_load(self.config.read_text())
            cfg["device"]["languages"] = languages
            self.config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        self.cache = tmp_path / DEV / "cache" / "media"
        self.proc = agent_factory(self.config)
        wait_online(watcher, DEV)

    def send(self, typ: str, args: dict | None = None, **kw) -> str:
        env = self.keys.command(f"dev/{DEV}", typ, args, **kw)
        self.watcher.publish(CMD, env)
        return env["id"]

    def stages(self, cmd_id: str) -> list[str]:
        return [a["stage"] for a in self.watcher.acks(cmd_id)]

    def wait(self, cmd_id: str, stage: str, timeout: float = 30) -> dict:
        return self.watcher.wait_ack(cmd_id, stage, timeout)

    def final(self, cmd_id: str, timeout: float = 40) -> dict:
        return wait_until(lambda: next((a for a in self.watcher.acks(cmd_id) if a["stage"] in
                                        ("done", "failed", "stopped", "expired", "rejected")),
                                       None), timeout, what=f"{cmd_id} final ack")

    def records(self, cmd_id: str | None = None) -> list[dict]:
        return [e for e in self.watcher.json(f"dev/{DEV}/event") if e.get("type") == "play"
                and (cmd_id is None or e.get("id") == cmd_id)]

    def record(self, cmd_id: str) -> dict:
        return wait_until(lambda: next(iter(self.records(cmd_id)), None), 10,
                          what=f"play record {cmd_id}")

    def alerts(self, code: str) -> list[dict]:
        return [e for e in self.watcher.json(f"dev/{DEV}/event")
                if e.get("type") == "alert" and e.get("code") == code]

    def state(self) -> dict:
        return self.watcher.json(f"dev/{DEV}/state")[-1]


@pytest.fixture
def make_rig(tmp_path, broker, keys, watcher, agent_factory):
    return lambda **overrides: Rig(tmp_path, broker, keys, watcher, agent_factory, **overrides)


def media_arg(server: Server, media: Path, name: str, **extra) -> dict:
    return {"url": server.url(name), "sha256": sha(media / name), **extra}


def wav_stats(path: Path) -> tuple[int, float]:
    """(duration ms, RMS dBFS) of a 16-bit WAV."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        frames = w.readframes(w.getnframes())
        ms = int(w.getnframes() * 1000 / w.getframerate())
    samples = array.array("h", frames)
    rms = math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))
    return ms, 20 * math.log10(max(rms, 1e-9) / 32768)


def wav_ms(path: Path) -> int:
    with wave.open(str(path), "rb") as w:
        return int(w.getnframes() * 1000 / w.getframerate())


# --- end to end ----------------------------------------------------------------------------

def test_play_airs_the_whole_file_and_records_it(make_rig, server, media):
    rig = make_rig()
    speech = media / "speech.wav"
    cid = rig.send("play", {"media": media_arg(server, media, "speech.wav", lang="vi")})
    assert rig.final(cid)["stage"] == "done"
    assert rig.stages(cid) == ["received", "queued", "started", "done"]
    rig.proc.stop()  # closes libvlc: the WAV header is complete
    out_ms, out_db = wav_stats(rig.out)
    assert abs(out_ms - wav_ms(speech)) < 400
    assert out_db > -40, "the output WAV is silent"
    rec = rig.record(cid)
    assert rec["origin"] == "command" and rec["kind"] == "file" and rec["result"] == "done"
    assert rec["media"] == [{"url": server.url("speech.wav"), "sha256": sha(speech),
                             "lang": "vi"}]
    assert rec["priority"] == "normal" and rec["repeat"] == 1 and rec["preemptions"] == 0
    assert rec["requested_ms"] == wav_ms(speech)
    assert rec["started"] < rec["ended"] and rec["played_ms"] > 0.7 * rec["requested_ms"]
    assert rec["verification"]["rms_dbfs"] > -50 and rec["verification"]["silent"] is False
    assert isinstance(rec["seq"], int) and rec["volume"] == 80
    assert (rig.cache / sha(speech)).is_file()


def test_emergency_preempts_and_the_file_resumes_where_it_stopped(make_rig, server, media):
    rig = make_rig()
    speech = media / "speech.wav"
    normal = rig.send("play", {"media": media_arg(server, media, "speech.wav")})
    rig.wait(normal, "started")
    time.sleep(2.5)
    emergency = rig.send("play", {"media": media_arg(server, media, "tone.wav"),
                                  "priority": "emergency"})
    assert rig.final(emergency)["stage"] == "done"
    assert rig.final(normal)["stage"] == "done"
    assert rig.stages(normal) == ["received", "queued", "started", "preempted", "resumed", "done"]
    assert rig.stages(emergency) == ["received", "queued", "started", "done"]
    acks = rig.watcher.acks()
    order = [(a["id"], a["stage"]) for a in acks if a["stage"] != "received"]
    assert order.index((normal, "preempted")) < order.index((emergency, "started"))
    assert order.index((emergency, "done")) < order.index((normal, "resumed"))
    resumed = rig.wait(normal, "resumed")
    pos = resumed["detail"]["position_ms"]
    assert 1000 <= pos <= 4000
    rig.proc.stop()
    # the WAV holds the resumed part: from the position reached, to the end
    assert abs(wav_ms(rig.out) - (wav_ms(speech) - pos)) < 500
    rec = rig.record(normal)
    assert rec["result"] == "done" and rec["preemptions"] == 1
    assert [s["result"] for s in rec["segments"]] == ["preempted", "done"]
    assert rig.record(emergency)["priority"] == "emergency"


def test_queue_is_first_in_first_out_within_a_priority(make_rig, server, media):
    rig = make_rig()
    ids = [rig.send("play", {"media": media_arg(server, media, "short.wav")}) for _ in range(3)]
    for cid in ids:
        assert rig.final(cid)["stage"] == "done"
    started = [rig.wait(cid, "started")["ts"] for cid in ids]
    done = [rig.wait(cid, "done")["ts"] for cid in ids]
    assert started == sorted(started)
    assert started[1] >= done[0] and started[2] >= done[1]
    assert all(rig.stages(cid) == ["received", "queued", "started", "done"] for cid in ids)
    assert len({r["id"] for r in rig.records()}) == 3


def test_repeat_and_language_variants_in_device_order(make_rig, server, media):
    rig = make_rig(languages=["vi", "en"])
    variants = [media_arg(server, media, "short.wav", lang="en"),
                media_arg(server, media, "tone.wav", lang="vi"),
                media_arg(server, media, "tone.wav", lang="jra")]
    cid = rig.send("play", {"media": variants, "repeat": 2})
    assert rig.final(cid)["stage"] == "done"
    rec = rig.record(cid)
    assert [m["lang"] for m in rec["media"]] == ["vi", "en"]  # jra is not aired here
    assert rec["requested_ms"] == 2 * (wav_ms(media / "tone.wav") + wav_ms(media / "short.wav"))
    assert rig.wait(cid, "started")["detail"]["lang"] == "vi"


def test_stop_current_one_and_all(make_rig, server, media):
    rig = make_rig()
    a = rig.send("play", {"media": media_arg(server, media, "speech.wav")})
    rig.wait(a, "started")
    b = rig.send("play", {"media": media_arg(server, media, "tone.wav")})
    c = rig.send("play", {"media": media_arg(server, media, "short.wav")})
    rig.wait(c, "queued")
    s1 = rig.send("stop", {"id": b})
    assert rig.wait(s1, "done")["detail"]["stopped"] == [b]
    assert rig.final(b)["stage"] == "stopped" and "started" not in rig.stages(b)
    s2 = rig.send("stop", {})
    assert rig.wait(s2, "done")["detail"]["stopped"] == [a]
    assert rig.wait(a, "stopped")["detail"]["by"] == s2
    rig.wait(c, "started")
    s3 = rig.send("stop", {"all": True})
    assert rig.wait(s3, "done")["detail"]["stopped"] == [c]
    assert rig.record(a)["result"] == "stopped" and rig.record(c)["result"] == "stopped"
    assert rig.record(a)["played_ms"] > 0
    s4 = rig.send("stop", {"id": "nothing-like-this"})
    assert rig.wait(s4, "done")["detail"]["stopped"] == []


def test_volume_is_applied_reported_and_kept_across_restart(make_rig, server, media,
                                                             agent_factory):
    rig = make_rig()
    v = rig.send("volume", {"level": 35})
    assert rig.wait(v, "done")["detail"] == {"volume": 35}
    wait_until(lambda: rig.state().get("volume") == 35, 5, what="state volume")
    cid = rig.send("play", {"media": media_arg(server, media, "short.wav")})
    rig.final(cid)
    assert rig.record(cid)["volume"] == 35
    own = rig.send("play", {"media": media_arg(server, media, "short.wav"), "volume": 90})
    rig.final(own)
    assert rig.record(own)["volume"] == 90
    rig.proc.stop()
    rig.watcher.clear()
    agent_factory(rig.config)
    wait_online(rig.watcher, DEV)
    wait_until(lambda: rig.watcher.json(f"dev/{DEV}/state")
               and rig.state().get("volume") == 35, 10, what="volume after restart")


def test_say_speaks_vietnamese_and_caches_the_rendering(make_rig):
    rig = make_rig()
    first = rig.send("say", {"text": TEXT, "priority": "priority"})
    assert rig.final(first)["stage"] == "done"
    assert rig.stages(first) == ["received", "queued", "started", "done"]
    rig.proc.stop()
    out_ms, out_db = wav_stats(rig.out)
    assert out_ms > 3000 and out_db > -40
    rec = rig.record(first)
    assert rec["kind"] == "tts" and rec["media"] == [{"text": TEXT, "lang": "vi"}]
    tts_dir = rig.tmp / DEV / "cache" / "tts"
    assert len(list(tts_dir.glob("*.wav"))) == 1


def test_checksum_mismatch_never_airs(make_rig, server, media):
    rig = make_rig()
    bad = {"url": server.url("speech.wav"), "sha256": sha(media / "tone.wav")}
    cid = rig.send("play", {"media": bad, "priority": "emergency"})
    ack = rig.final(cid)
    assert ack["stage"] == "failed" and ack["reason"] == "media_checksum"
    assert rig.stages(cid) == ["received", "failed"]
    assert not rig.out.exists() and rig.records(cid) == []
    assert list(rig.cache.iterdir()) == []  # neither the file nor a partial download


def test_host_allow_list_and_redirects(make_rig, server, media):
    rig = make_rig()
    other = {"url": f"http://localhost:{server.port}/tone.wav", "sha256": sha(media / "tone.wav")}
    cid = rig.send("play", {"media": other})
    assert rig.final(cid)["reason"] == "media_host"
    hop = {"url": server.url(f"redirect?to=http://localhost:{server.port}/tone.wav"),
           "sha256": sha(media / "tone.wav")}
    cid2 = rig.send("play", {"media": hop})
    assert rig.final(cid2)["reason"] == "media_host"
    live = rig.send("live", {"url": f"http://10.0.0.1:{server.port}/stream"})
    assert rig.final(live)["reason"] == "media_host"
    assert not any(p.startswith("/tone.wav") for p in server.requests)
    assert not rig.out.exists()


def test_download_cut_midway_is_retried_and_no_partial_file_is_used(make_rig, server, media):
    rig = make_rig()
    server.cuts = 1
    cid = rig.send("play", {"media": {"url": server.url("cut/tone.wav"),
                                      "sha256": sha(media / "tone.wav")}})
    assert rig.final(cid)["stage"] == "done"
    assert server.requests.count("/cut/tone.wav") == 2
    assert sorted(p.name for p in rig.cache.iterdir()) == [sha(media / "tone.wav")]
    assert (rig.cache / sha(media / "tone.wav")).read_bytes() == (media / "tone.wav").read_bytes()


def test_cached_media_airs_without_the_server(make_rig, server, media):
    rig = make_rig()
    first = rig.send("play", {"media": media_arg(server, media, "short.wav")})
    assert rig.final(first)["stage"] == "done"
    url = server.url("short.wav")
    server.close()
    again = rig.send("play", {"media": {"url": url, "sha256": sha(media / "short.wav")}})
    assert rig.final(again)["stage"] == "done"


def test_quota_evicts_the_least_recently_used(make_rig, server, media):
    rig = make_rig(media={"quota_mb": 1})
    for name in ("big-a.wav", "big-b.wav"):
        cid = rig.send("play", {"media": media_arg(server, media, name)})
        rig.wait(cid, "started")
        rig.wait(rig.send("stop", {}), "done")
    names = {p.name for p in rig.cache.iterdir()}
    assert names == {sha(media / "big-b.wav")}


def test_at_waits_for_its_instant(make_rig, server, media):
    rig = make_rig()
    warm = rig.send("play", {"media": media_arg(server, media, "short.wav")})
    rig.final(warm)  # cached now
    at = int(time.time() * 1000) + 2500
    cid = rig.send("play", {"media": media_arg(server, media, "short.wav"), "at": at})
    rig.wait(cid, "queued")
    assert "started" not in rig.stages(cid)
    started = rig.wait(cid, "started")
    rec = rig.record(cid)
    # never early; the precision figure (|start - at|) is measured by scripts/bench
    assert rec["started"] >= at - 5 and started["ts"] >= at - 5
    assert rec["started"] - at < 1000


def test_bad_input_is_rejected_and_airing_goes_on(make_rig, server, media):
    rig = make_rig()
    cid = rig.send("play", {"media": media_arg(server, media, "speech.wav")})
    rig.wait(cid, "started")
    bad = [("play", {"media": media_arg(server, media, "tone.wav"), "colour": "red"}),
           ("play", {"media": {"url": "ftp://127.0.0.1/x", "sha256": "zz"}}),
           ("play", {"media": []}), ("volume", {"level": 101}), ("volume", {"level": True}),
           ("stop", {"id": "x", "all": True}), ("say", {"text": ""}),
           ("live", {"url": "file:///etc/passwd"}), ("test", {"duration_s": 60})]
    ids = [rig.send(t, a) for t, a in bad]
    for i in ids:
        ack = rig.final(i)
        assert ack["stage"] == "rejected" and ack["reason"] == "bad_args"
    assert rig.final(cid)["stage"] == "done"
    assert rig.stages(cid) == ["received", "queued", "started", "done"]
    assert rig.proc.alive()


def test_live_fails_over_from_a_dead_primary_to_a_backup(make_rig, server):
    rig = make_rig(audio={"network_caching_ms": 300})
    dead = f"http://127.0.0.1:{free_port()}/stream"
    cid = rig.send("live", {"url": dead, "backups": [server.url("stream")], "duration_s": 4})
    assert rig.final(cid)["stage"] == "done"
    assert rig.stages(cid) == ["received", "queued", "started", "done"]
    rec = rig.record(cid)
    assert rec["kind"] == "stream" and rec["result"] == "done"
    assert rec["live"]["source"] == server.url("stream")
    assert [s["reason"] for s in rec["live"]["switches"]] == ["rejoin", "error"]
    rig.proc.stop()
    out_ms, out_db = wav_stats(rig.out)
    assert out_ms > 1000 and out_db > -40


def test_live_falls_back_to_the_local_file(make_rig, server, media):
    rig = make_rig(audio={"network_caching_ms": 300})
    dead = f"http://127.0.0.1:{free_port()}/stream"
    cid = rig.send("live", {"url": dead, "fallback": media_arg(server, media, "tone.wav"),
                            "duration_s": 4})
    assert rig.final(cid)["stage"] == "done"
    rec = rig.record(cid)
    assert rec["live"]["source"] == str(rig.cache / sha(media / "tone.wav"))
    assert rec["media"][0]["fallback"]["sha256"] == sha(media / "tone.wav")


def test_live_dead_air_on_the_primary_fails_over_to_a_backup(make_rig, server):
    """A primary that connects, airs, then goes quiet with its connection open: libvlc raises
    no error, only the position stops; the relay calls it dead air and airs the backup."""
    rig = make_rig(audio={"network_caching_ms": 300,
                          "live": {"dead_air_s": 2, "start_grace_s": 5}})
    cid = rig.send("live", {"url": server.url("stall"), "backups": [server.url("stream")],
                            "duration_s": 9})
    assert rig.final(cid)["stage"] == "done"
    rec = rig.record(cid)
    assert rec["result"] == "done" and rec["live"]["source"] == server.url("stream")
    switches = rec["live"]["switches"]
    assert [(s["source"], s["reason"]) for s in switches] == [
        (server.url("stall"), "rejoin"), (server.url("stream"), "dead_air")]
    # ~1.5 s of audio, then ≥ 2 s without progress: the switch comes 3.5-6 s in
    assert 3000 <= switches[1]["at"] - switches[0]["at"] <= 6500
    rig.proc.stop()
    out_ms, out_db = wav_stats(rig.out)
    assert out_ms > 300 and out_db > -40  # the backup aired (afile keeps the last source)


def test_live_switches_back_to_the_primary_when_a_probe_finds_it_again(make_rig, server):
    server.flaky_down = True
    rig = make_rig(audio={"network_caching_ms": 300,
                          "live": {"probe_min_s": 2, "probe_max_s": 8, "probe_timeout_s": 2}})
    cid = rig.send("live", {"url": server.url("flaky"), "backups": [server.url("stream")],
                            "duration_s": 10})
    rig.wait(cid, "started")
    wait_until(lambda: any(p.startswith("/stream") for p in server.requests), 10,
               what="the backup airing")
    time.sleep(1)
    server.flaky_down = False  # the studio is back
    assert rig.final(cid)["stage"] == "done"
    rec = rig.record(cid)
    flaky, backup = server.url("flaky"), server.url("stream")
    assert [(s["source"], s["reason"]) for s in rec["live"]["switches"]] == [
        (flaky, "rejoin"), (backup, "error"), (flaky, "primary_back")]
    assert rec["live"]["source"] == flaky
    # probed (a plain GET, not libvlc) before switching: one refused at the start, then
    # at least one probe and libvlc's own request once it was back
    assert sum(p.startswith("/flaky") for p in server.requests) >= 3
    rig.proc.stop()
    assert wav_stats(rig.out)[1] > -40


def test_a_preempted_stream_rejoins_after_the_emergency(make_rig, server, media):
    rig = make_rig(audio={"network_caching_ms": 300})
    live = rig.send("live", {"url": server.url("stream"), "duration_s": 8})
    rig.wait(live, "started")
    time.sleep(1)
    emergency = rig.send("play", {"media": media_arg(server, media, "short.wav"),
                                  "priority": "emergency"})
    assert rig.final(emergency)["stage"] == "done"
    assert rig.final(live)["stage"] == "done"
    assert rig.stages(live) == ["received", "queued", "started", "preempted", "resumed", "done"]
    rec = rig.record(live)
    assert rec["preemptions"] == 1 and [s["result"] for s in rec["segments"]] == [
        "preempted", "done"]
    assert [s["reason"] for s in rec["live"]["switches"]] == ["rejoin", "rejoin"]
    assert sum(p.startswith("/stream") for p in server.requests) == 2  # connected again


def test_live_with_every_source_dead_fails(make_rig):
    rig = make_rig(audio={"network_caching_ms": 300})
    cid = rig.send("live", {"url": f"http://127.0.0.1:{free_port()}/a",
                            "backups": [f"http://127.0.0.1:{free_port()}/b"]})
    ack = rig.final(cid)
    assert ack["stage"] == "failed" and ack["reason"] == "media_unavailable"


def test_self_test_reports_output_and_verification(make_rig):
    rig = make_rig()
    cid = rig.send("test", {"duration_s": 1})
    done = rig.final(cid)
    assert done["stage"] == "done"
    d = done["detail"]
    assert d["output"] == "vlc" and d["audio_ok"] is True and d["verdict"] == "pass"
    assert d["verification"]["rms_dbfs"] > -50 and d["played_ms"] > 0
    assert d["amplifier"]["state"] in ("on", "holding", "off")
    rig.proc.stop()
    assert wav_stats(rig.out)[1] > -30


def test_missing_output_device_is_an_audio_fault_not_a_crash(make_rig, server, media):
    rig = make_rig(audio={"device": "plughw:CARD=NoSuchCard,DEV=0"})
    cid = rig.send("play", {"media": media_arg(server, media, "short.wav")})
    ack = rig.final(cid)
    assert ack["stage"] == "failed" and ack["reason"] == "audio_fault"
    wait_until(lambda: any(a["state"] == "raised" for a in rig.alerts("audio_fault")), 15,
               what="audio_fault alert")
    ping = rig.send("ping")
    rig.wait(ping, "done")
    assert rig.proc.alive()


# --- validation (pure) ---------------------------------------------------------------------

SHA = "a" * 64


@pytest.mark.parametrize("fn,args,problem", [
    (validate_play, {"media": {"url": "http://h/x", "sha256": SHA}, "x": 1}, "args.x"),
    (validate_play, {"media": {"url": "http://h/x", "sha256": SHA, "size": 3}}, "media.size"),
    (validate_play, {"media": {"url": "http://h/x", "sha256": "abc"}}, "sha256"),
    (validate_play, {"media": [], "priority": "high"}, "args.media"),
    (validate_play, {"media": {"url": "http://h/x", "sha256": SHA}, "repeat": 11}, "repeat"),
    (validate_play, {"media": {"url": "http://h/x", "sha256": SHA}, "at": "soon"}, "args.at"),
    (validate_play, {}, "args.media: is required"),
    (validate_live, {"url": "rtsp://h/x", "duration_s": -1}, "duration_s"),
    (validate_live, {"url": "http://h/x", "backups": ["ftp://h/y"]}, "backups[0]"),
    (validate_say, {"text": "x", "lang": "not a lang"}, "lang"),
    (validate_stop, {"id": "a b"}, "args.id"),
    (validate_stop, {"all": False}, "args.all"),
    (validate_volume, {}, "args.level"),
    (validate_test, {"tone": 1}, "args.tone"),
])
def test_validation_names_the_bad_key(fn, args, problem):
    errors = fn(args)
    assert errors and any(problem in e for e in errors), errors


def test_valid_args_pass():
    assert validate_play({"media": [{"url": "https://h/x", "sha256": SHA, "lang": "vi"}],
                          "priority": "emergency", "volume": 0, "repeat": 10,
                          "at": 1_764_150_000_000}) == []
    assert validate_live({"url": "rtsp://h/x", "backups": ["http://h/y"], "duration_s": 60,
                          "fallback": {"url": "http://h/f", "sha256": SHA}}) == []
    assert validate_say({"text": "Xin chào", "lang": "vi", "repeat": 2}) == []
    assert validate_stop({}) == [] and validate_stop({"all": True}) == []
    assert validate_volume({"level": 100}) == [] and validate_test({}) == []


def test_merge_levels_weights_by_time():
    parts = [{"rms_dbfs": -20.0, "peak_dbfs": -10.0, "seconds": 3.0, "silent": False},
             {"rms_dbfs": -120.0, "peak_dbfs": -120.0, "seconds": 1.0, "silent": True}]
    merged = merge_levels(parts, -50)
    assert -22 < merged["rms_dbfs"] < -20 and merged["seconds"] == 4.0 and not merged["silent"]
    assert merge_levels([None, {"error": "no input"}], -50) == {"error": "no input"}


# --- the scheduler's API, in process (sim output) ----------------------------------------

def pump(core, pred, timeout: float = 20):
    def step():
        core.run_pending()
        return pred()
    return wait_until(step, timeout, 0.01)


def test_submit_scheduled_reports_to_the_scheduler_not_as_acks(tmp_path):
    from agent.audio import service as audio_service
    from tests.fakes import make_core

    core = make_core(tmp_path, extra={"amplifier": {"warm_up_s": 0, "idle_hold_s": 0},
                                      "security": {"media_hosts": ["media.example.vn"]}})
    core.link.connect()
    svc = audio_service.install(core, core.cfg)
    seen: list[tuple[str, str, str | None]] = []
    on_result = lambda sid, stage, reason: seen.append((sid, stage, reason))  # noqa: E731
    fields = {"item": "news", "topic": "grp/krongpa", "slot": "2025-11-26T05:00",
              "due": 1_764_108_000_000}
    svc.submit_scheduled("slot-say", "say", {"text": "Xin chào bà con", "lang": "vi"},
                         on_result=on_result, extra={**fields, "id": "forged", "origin": "x"})
    svc.submit_scheduled("slot-bad", "media",
                         [{"url": "http://evil.example/x.mp3", "sha256": "b" * 64}],
                         on_result=on_result, extra=fields)

    pump(core, lambda: ("slot-say", "done", None) in seen)
    assert [st for sid, st, _ in seen if sid == "slot-say"] == ["queued", "started", "done"]
    assert ("slot-bad", "failed", "media_host") in seen
    assert core.link.json("/ack") == []
    records = {e["id"]: e for e in core.link.json("/event") if e.get("type") == "play"}
    assert records["slot-say"]["origin"] == "schedule" and records["slot-say"]["result"] == "done"
    assert (records["slot-bad"]["result"], records["slot-bad"]["reason"]) == ("failed",
                                                                             "media_host")
    for sid in ("slot-say", "slot-bad"):  # the scheduler's fields, never over the record's own
        assert {k: records[sid][k] for k in fields} == fields
        assert records[sid]["id"] == sid and records[sid]["origin"] == "schedule"

    assert svc.have("b" * 64) is False
    assert svc.cancel("nothing") is False
    svc.close()


# --- in process, deterministic: a FakeClock, sim output, preparation run by the test -------

class ManualPool:
    """The service's preparation pool, driven by the test: a job runs when told to."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable, tuple, Future]] = []

    def submit(self, fn: Callable, *args, lane: Any = None) -> Future:
        fut: Future = Future()
        self.jobs.append((fn, args, fut))
        return fut

    def run(self, index: int) -> None:
        fn, args, fut = self.jobs[index]
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # handed to the service as a worker would
            fut.set_exception(e)

    def run_all(self) -> None:
        for i, (_, _, fut) in enumerate(self.jobs):
            if not fut.done():
                self.run(i)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class FakeTts:
    """Renders nothing: the path names the text (not a WAV, so the sim output airs it until
    the test calls ``finish()``)."""

    def render(self, text: str, lang: str = "vi") -> str:
        return f"/tts/{lang}/{text}"


class InProc:
    """A core on a FakeClock with the real audio service (sim output, no amplifier warm-up)."""

    def __init__(self, tmp_path: Path, clock: FakeClock | None = None,
                 trusted_keys: dict | None = None, **extra) -> None:
        from agent.audio.service import AudioService
        from tests.fakes import make_core

        self.clock = clock or FakeClock()
        sections = {"amplifier": {"warm_up_s": 0, "idle_hold_s": 0}, **extra}
        self.core = make_core(tmp_path, clock=self.clock, extra=sections,
                              trusted_keys=trusted_keys)
        self.core.link.connect()
        self.pool = ManualPool()
        self.board = self.make_board()
        self.svc = AudioService(self.core, self.core.cfg, board=self.board, tts=FakeTts(),
                                pool=self.pool)
        self.svc.output.options["sim_duration_s"] = 3600  # ends when the test says
        self.svc.start()
        self.pool.run_all()  # the cache check at start
        self.core.run_pending()
        self.results: list[tuple[str, str, str | None]] = []

    def make_board(self):
        """The board service the audio service gets (installed before it), or None."""
        return None

    def on_result(self, sid: str, stage: str, reason: str | None) -> None:
        self.results.append((sid, stage, reason))

    def say(self, sid: str, text: str, **kw) -> int:
        """Submit a scheduled ``say``; returns its preparation job's index."""
        self.svc.submit_scheduled(sid, "say", {"text": text}, on_result=self.on_result, **kw)
        return len(self.pool.jobs) - 1

    def prepare(self, job: int) -> None:
        self.pool.run(job)
        self.core.run_pending()

    def advance(self, seconds: float) -> None:
        """Move both clocks, firing every core timer at its (fake) monotonic time."""
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end - 1e-9:
            due = [t.when for t in self.core._timers if not t.cancelled]
            step = min([end - self.clock.monotonic()]
                       + [max(0.001, w - self.clock.monotonic()) for w in due])
            self.clock.advance(step)
            self.core.run_pending()

    def finish(self) -> None:
        """The sim output reaches the end of what airs."""
        self.svc.output.finish()
        self.core.run_pending()

    def aired(self) -> list[str]:
        return [a["source"] for a in self.svc.output.aired]

    def stages(self, sid: str) -> list[str]:
        return [st for s, st, _ in self.results if s == sid]

    def close(self) -> None:
        self.svc.close()
        self.core.store.close()


@pytest.fixture
def inproc(tmp_path):
    made: list[InProc] = []

    def make(**kw) -> InProc:
        made.append(InProc(tmp_path, **kw))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def test_at_items_due_together_air_in_submission_order_whatever_order_they_are_ready(inproc):
    rig = inproc()
    at = rig.clock.now_ms() + 10_000
    jobs = [rig.say(f"s-{n}", n, at_ms=at) for n in "abc"]
    # preparation finishes in reverse order, each beyond the 2 s hold for earlier arrivals
    for job in reversed(jobs):
        rig.prepare(job)
        rig.advance(3)
    assert [q["id"] for q in rig.core.snapshot()["queue"]] == ["s-c", "s-b", "s-a"]  # by at
    assert rig.aired() == []
    rig.advance(1.5)
    assert rig.aired() == ["/tts/vi/a"]
    rig.finish()
    rig.finish()
    assert rig.aired() == ["/tts/vi/a", "/tts/vi/b", "/tts/vi/c"]
    assert rig.stages("s-a") == ["queued", "started", "done"]


def test_items_queued_behind_airing_audio_keep_their_submission_order(inproc):
    rig = inproc()
    rig.prepare(rig.say("first", "x"))
    assert rig.aired() == ["/tts/vi/x"]
    slow, fast = rig.say("s-a", "a"), rig.say("s-b", "b")
    rig.prepare(fast)
    rig.advance(3)  # the hold for the earlier arrival has run out: s-b queues
    assert [q["id"] for q in rig.core.snapshot()["queue"]] == ["s-b", "s-a"]
    assert rig.stages("s-b") == ["queued"]
    rig.prepare(slow)
    assert [q["id"] for q in rig.core.snapshot()["queue"]][:2] == ["s-a", "s-b"]
    rig.finish()
    rig.finish()
    assert rig.aired() == ["/tts/vi/x", "/tts/vi/a", "/tts/vi/b"]


def test_clock_step_forward_past_an_at_starts_it_at_once(inproc):
    rig = inproc()
    at = rig.clock.now_ms() + 60_000
    rig.prepare(rig.say("sync", "a", at_ms=at))
    rig.advance(10)
    rig.clock.jump(55_000)  # NTP step: 5 s past the instant
    rig.core.run_pending()
    assert rig.aired() == []  # the timer still waits on the old mapping
    rig.svc.on_clock_jump()
    rig.core.run_pending()
    assert rig.aired() == ["/tts/vi/a"] and rig.stages("sync") == ["queued", "started"]


def test_clock_step_back_re_arms_the_warm_up_and_the_at(inproc):
    rig = inproc(amplifier={"warm_up_s": 2, "idle_hold_s": 0})
    at = rig.clock.now_ms() + 20_000
    rig.prepare(rig.say("sync", "a", at_ms=at))
    rig.advance(19)
    assert rig.svc.amp.state != "off"  # warming up for the instant
    rig.clock.jump(-60_000)
    rig.svc.on_clock_jump()
    rig.core.run_pending()
    assert rig.svc.amp.state == "off", "the instant is a minute away again"
    rig.advance(2)  # the old instant passes: nothing airs
    assert rig.aired() == []
    rig.advance(57.5)
    assert rig.aired() == [] and rig.svc.amp.state != "off"  # warming up again, 1.5 s ahead
    rig.advance(1.5)
    assert rig.aired() == ["/tts/vi/a"] and rig.clock.now_ms() == at
    rig.finish()
    [rec] = [e for e in rig.core.link.json("/event") if e.get("type") == "play"]
    assert rec["started"] == at


def test_scheduler_clock_step_re_arms_a_slot_handed_over_ahead(tmp_path, keys):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from agent import protocol
    from agent.schedule import service as schedule_service

    due = int(datetime(2025, 11, 26, 5, 0, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh")).timestamp()
              * 1000)
    rig = InProc(tmp_path, clock=FakeClock(due - 20_000),
                 trusted_keys={keys.kid: keys.public_b64})
    try:
        sched = schedule_service.install(rig.core, rig.core.cfg, audio=rig.svc)
        doc = keys.command("dev/dev-1", "schedule", {"items": [
            {"id": "loa", "say": "Xin chào", "days": ["wed"], "times": ["05:00"],
             "catch_up_s": 600}]}, rev=1)
        rig.core.on_message("ttcs/dev/dev-1/desired/schedule", protocol.canonical(doc), True)
        rig.advance(12)  # handed over ahead (10 s lead), waiting for 05:00
        rig.pool.run_all()
        rig.core.run_pending()
        assert [q["at"] for q in rig.core.snapshot()["queue"]] == [due]
        rig.clock.jump(30_000)  # now 05:00:22: within the slot's catch-up
        rig.advance(5.01)  # the scheduler's watch tick sees the step
        assert sched.jumps == 1
        assert rig.aired() == ["/tts/vi/Xin chào"], "aired at once, not at the old timer"
    finally:
        rig.close()


# --- board text (in process: image board, sim audio) -----------------------------------------

class BoardRig(InProc):
    """InProc plus the board service (image driver) and signed commands."""

    def __init__(self, tmp_path: Path, keys, clock: FakeClock | None = None) -> None:
        super().__init__(tmp_path, clock=clock, trusted_keys={keys.kid: keys.public_b64},
                         security={"media_hosts": ["127.0.0.1"]},
                         board={"driver": "image",
                                "image_path": str(tmp_path / "out" / "board.png")})
        self.keys = keys
        self.pump()

    def make_board(self):
        from agent.board import service as board_service

        return board_service.install(self.core, self.core.cfg)  # board first, then audio

    def pump(self) -> None:
        for _ in range(3):
            self.board.io.drain()
            self.core.run_pending()

    def send(self, typ: str, args: dict) -> str:
        from agent import protocol

        env = self.keys.command("dev/dev-1", typ, args, ts=self.clock.now_ms())
        jobs = len(self.pool.jobs)
        self.core.on_message("ttcs/dev/dev-1/cmd", protocol.canonical(env), False)
        self.pump()
        if len(self.pool.jobs) > jobs:  # prepare it (speech, stream) at once
            self.prepare(jobs)
            self.pump()
        return env["id"]

    def acks(self, cmd_id: str) -> list[dict]:
        return [a for a in self.core.link.json("/ack") if a["id"] == cmd_id]

    def cmd_stages(self, cmd_id: str) -> list[str]:
        return [a["stage"] for a in self.acks(cmd_id)]

    def showing(self) -> str | None:
        shown = self.board.state()["showing"]
        return shown["text"] if shown else None

    def shows(self) -> list[tuple[str, str, str | None]]:
        """Board show records: (id, result, origin)."""
        return [(e["id"], e["result"], e.get("origin")) for e in self.core.link.json("/event")
                if e.get("type") == "board" and "started" in e]

    def close(self) -> None:
        self.board.stop()
        super().close()


def test_board_text_follows_the_audio_item_and_stop_clears_the_board(tmp_path, keys):
    rig = BoardRig(tmp_path, keys)
    try:
        notice = rig.send("board", {"text": "Họp tổ 5", "duration_s": 100})
        assert rig.showing() == "Họp tổ 5"
        decomposed = unicodedata.normalize("NFD", "Cúp điện 8h–11h")
        news = rig.send("say", {"text": "Thông báo cúp điện", "priority": "priority",
                                "board_text": decomposed})
        assert rig.showing() == "Cúp điện 8h–11h"  # NFC, over the normal board message
        started = [a for a in rig.acks(news) if a["stage"] == "started"]
        assert started[0]["detail"]["board"] is True
        flood = rig.send("say", {"text": "Lũ quét ở thôn 3", "priority": "emergency"})
        assert rig.showing() == "Lũ quét ở thôn 3", "an emergency say shows its own text"
        rig.finish()  # the emergency ends: its text goes, the preempted news and its text return
        rig.pump()
        assert rig.cmd_stages(flood)[-1] == "done"
        assert rig.showing() == "Cúp điện 8h–11h"
        assert rig.cmd_stages(news) == ["received", "queued", "started", "preempted", "resumed"]
        # stop {"id"} of a board command
        stop1 = rig.send("stop", {"id": notice})
        assert rig.acks(stop1)[-1]["detail"]["stopped"] == [notice]
        assert rig.cmd_stages(notice)[-1] == "stopped"
        later = rig.send("board", {"text": "Tiêm chủng thứ Bảy", "duration_s": 100})
        stop_all = rig.send("stop", {"all": True})
        assert rig.acks(stop_all)[-1]["detail"]["stopped"] == [news, later]
        assert rig.cmd_stages(news)[-1] == "stopped" and rig.cmd_stages(later)[-1] == "stopped"
        assert rig.showing() is None
        shows = rig.shows()
        # withdrawn when preempted, again when stopped; the emergency's when it ended
        assert [(r, o) for i, r, o in shows if i == news] == [("stopped", "audio")] * 2
        assert [(r, o) for i, r, o in shows if i == flood] == [("stopped", "audio")]
        assert (notice, "preempted", None) in shows
        # the board sends no acks of its own for the audio commands' text
        assert rig.cmd_stages(flood) == ["received", "queued", "started", "done"]
    finally:
        rig.close()


def test_board_text_goes_when_the_item_ends_and_without_a_board_is_reported(tmp_path, keys):
    rig = BoardRig(tmp_path, keys)
    try:
        cid = rig.send("say", {"text": "Họp dân lúc 19 giờ", "board_text": "Họp dân 19h"})
        assert rig.showing() == "Họp dân 19h"
        rig.finish()
        rig.pump()
        assert rig.cmd_stages(cid)[-1] == "done" and rig.showing() is None
        plain = rig.send("say", {"text": "Xin chào"})  # normal, no board_text: board untouched
        [started] = [a for a in rig.acks(plain) if a["stage"] == "started"]
        assert "board" not in started.get("detail", {})
        assert rig.showing() is None
    finally:
        rig.close()
    alone = InProc(tmp_path / "alone", trusted_keys={keys.kid: keys.public_b64})
    try:  # no board service: the audio airs, the started ack says the text was not shown
        from agent import protocol

        env = keys.command("dev/dev-1", "say", {"text": "a", "board_text": "b"},
                           ts=alone.clock.now_ms())
        alone.core.on_message("ttcs/dev/dev-1/cmd", protocol.canonical(env), False)
        alone.prepare(len(alone.pool.jobs) - 1)
        [started] = [a for a in alone.core.link.json("/ack") if a["stage"] == "started"]
        assert started["detail"]["board"] is False
    finally:
        alone.close()


@pytest.mark.parametrize("fn,args", [
    (validate_play, {"media": {"url": "http://h/x", "sha256": SHA}, "board_text": "x" * 501}),
    (validate_say, {"text": "x", "board_text": ""}),
    (validate_live, {"url": "http://h/x", "board_text": 5}),
    (validate_say, {"text": "x", "board_text": "   "}),
])
def test_bad_board_text_is_bad_args(fn, args):
    assert any("args.board_text" in e for e in fn(args))


def test_board_text_length_counts_nfc_characters():
    text = unicodedata.normalize("NFD", "ệ" * 500)  # 1000 code points decomposed
    assert validate_say({"text": "x", "board_text": text}) == []


def test_a_scheduled_items_board_text_shows_while_the_slot_airs(tmp_path, keys):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from agent import protocol
    from agent.schedule import service as schedule_service

    due = int(datetime(2025, 11, 26, 5, 0, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh")).timestamp()
              * 1000)
    rig = BoardRig(tmp_path, keys, clock=FakeClock(due - 30_000))
    try:
        schedule_service.install(rig.core, rig.core.cfg, audio=rig.svc)
        notice = rig.send("board", {"text": "Họp tổ 5", "duration_s": 600})
        doc = keys.command("dev/dev-1", "schedule", {"items": [
            {"id": "news", "say": "Bản tin sáng nay", "days": ["wed"], "times": ["05:00"],
             "board_text": unicodedata.normalize("NFD", "Bản tin sáng")}]}, rev=1)
        rig.core.on_message("ttcs/dev/dev-1/desired/schedule", protocol.canonical(doc), True)
        rig.advance(22)  # handed over ahead (10 s lead)
        rig.pool.run_all()
        rig.pump()
        assert rig.showing() == "Họp tổ 5"
        rig.advance(8)  # 05:00: the slot airs, its text goes ahead of the older message
        rig.pump()
        assert rig.aired() == ["/tts/vi/Bản tin sáng nay"]
        assert rig.showing() == "Bản tin sáng", "NFC, at once, over the normal board command"
        assert rig.cmd_stages(notice)[-1] == "preempted"
        rig.finish()
        rig.pump()
        assert rig.showing() == "Họp tổ 5" and rig.cmd_stages(notice)[-1] == "resumed"
        sid = "dev.dev-1:news:2025-11-26T05:00"
        assert (sid, "stopped", "audio") in rig.shows()
        assert rig.cmd_stages(sid) == [], "no acks for a slot"
    finally:
        rig.close()
