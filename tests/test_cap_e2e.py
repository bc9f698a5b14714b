"""CAP 1.2 ingest end to end: a real mosquitto, two real agents (sim audio with espeak-ng TTS,
image boards), the relay as a process (its store gives the groups' members and the play
records for ``cap status``), a webhook stand-in for staff notices, and a static web server
hosting the controller's media and an agency's recording. One rig for the module (agents
take seconds to start); each test stops what it aired.

Devices: krongpa-phutuc-c03 (groups gialai, krongpa; inside the typhoon polygon) and
krongpa-iarsai-c01 (gialai, krongpa, thunghiem: the test group; outside it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import re
import struct
import threading
import time
import wave
from datetime import datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ctl.main import main as ctl_main
from tests.conftest import (
    AgentProcess,
    Broker,
    Keys,
    Watcher,
    agent_config,
    wait_online,
    wait_until,
)
from tests.relay_support import HttpStandIn, RelayProcess
from tests.test_cap_rules import CAP_DIR, VN, cap_time, fill

C03, C01 = "krongpa-phutuc-c03", "krongpa-iarsai-c01"
SENDER = "canhbao@kttv-gialai.gov.vn"


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = Broker(tmp / "broker").start()
        self.keys = Keys()
        self.www = tmp / "www"
        (self.www / "media").mkdir(parents=True)
        (self.www / "agency").mkdir()
        handler = functools.partial(_Quiet, directory=str(self.www))
        self.web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.web.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.web.server_port}"
        self.hook = HttpStandIn()
        self.agents = []
        for device, groups in ((C03, ["gialai", "krongpa"]),
                               (C01, ["gialai", "krongpa", "thunghiem"])):
            path = agent_config(tmp, self.broker.port, self.keys, device=device,
                                board={"driver": "image",
                                       "image_path": str(tmp / f"{device}.png")})
            cfg = yaml.safe_load(path.read_text())
            cfg["device"]["groups"] = groups
            cfg["security"]["media_hosts"] = ["127.0.0.1"]
            path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
            self.agents.append(AgentProcess(path, tmp / f"{device}.log").start())
        key_file = tmp / "ctl.key"
        from cryptography.hazmat.primitives import serialization

        key_file.write_bytes(self.keys.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_file.chmod(0o600)
        self.cfg = tmp / "ctl.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port},
            "signing": {"kid": self.keys.kid, "key_file": str(key_file)},
            "relay": {"db_path": str(tmp / "relay.db"), "tick_s": 0.2,
                      "groups": {"krongpa": ["krongpa-*"], "gialai": ["*"],
                                 "thunghiem": [C01]}},
            "alerts": {"webhook_url": self.hook.url},
            "media": {"dir": str(self.www / "media"), "base_url": f"{self.base}/media"},
            "locations": {C03: [13.20, 108.68], C01: [13.05, 108.85]},
            "cap": {"geocodes": {"VN-DISTRICT=0640": ["krongpa"],
                                 "SAME=006037": ["thunghiem"]},  # for an OASIS example
                    "area_names": {"Huyện Krông Pa, tỉnh Gia Lai": ["krongpa"]},
                    "languages": {"krongpa": ["vi", "en"]}, "test_group": "thunghiem",
                    "wait_s": 15},
        }, allow_unicode=True))
        self.w = Watcher(self.broker.port, ["ttcs/#"])
        self.relay = RelayProcess(self.cfg, tmp / "relay.log").start().wait_connected()
        for device in (C03, C01):
            wait_online(self.w, device, 30)
        # the relay knows both devices (their groups' members) before the first ingest
        wait_until(lambda: "known" if _relay_devices(tmp / "relay.db") >= {C03, C01} else None,
                   20, what="the relay's store lists both devices")

    def ingest(self, data: bytes, *args: str, name: str = "alert.xml") -> tuple[int, str]:
        path = self.tmp / name
        path.write_bytes(data)
        return self.ctl("cap", "ingest", str(path), *args)

    def ctl(self, *args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ctl_main(["--config", str(self.cfg), *args])
        return code, out.getvalue() + err.getvalue()

    def stop_all(self) -> None:
        for device in (C03, C01):
            cmd = self.keys.command(f"dev/{device}", "stop", {"all": True})
            self.w.publish(f"ttcs/dev/{device}/cmd", cmd)
            self.w.wait_ack(cmd["id"], "done", device=device)

    def close(self) -> None:
        self.relay.stop()
        for a in self.agents:
            a.stop()
        self.w.close()
        self.web.shutdown()
        self.hook.close()
        self.broker.stop()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def _relay_devices(db: Path) -> set[str]:
    from ctl.store import read_devices

    return set(read_devices(str(db)) or {})


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("cap"))
    yield r
    r.close()


@pytest.fixture
def clean(rig):
    rig.w.clear()
    yield rig
    rig.stop_all()


def ids(out: str, kind: str, target: str | None = None) -> list[str]:
    """Command ids of ``kind`` the ingest printed (``sent say cap-… -> grp/krongpa vi``)."""
    pat = rf"sent {kind}\s+(\S+) -> (\S+)"
    return list(dict.fromkeys(i for i, t in re.findall(pat, out) if target in (None, t)))


def board_text(w: Watcher, device: str) -> str | None:
    states = w.json(f"dev/{device}/state")
    showing = ((states[-1].get("board") or {}).get("showing") or {}) if states else {}
    return showing.get("text")


# --- Actual alerts ---------------------------------------------------------------------

def test_typhoon_polygon_airs_and_shows_only_on_the_device_inside(clean):
    rig = clean
    started = time.monotonic()
    sent = cap_time(datetime.now(VN))
    message = fill("typhoon-krongpa.xml", SENT=sent)
    code, out = rig.ingest(message)
    assert code == 0, out
    assert f"dev/{C03} (inside the polygon)" in out
    [say] = ids(out, "say")
    [board] = ids(out, "board")
    rig.w.wait_ack(say, "started", 20, device=C03)
    assert time.monotonic() - started < 15
    rig.w.wait_ack(board, "started", 10, device=C03)
    wait_until(lambda: "Cảnh báo bão số 9" in (board_text(rig.w, C03) or ""), 10,
               what="the headline on the board")
    cmd = next(c for c in rig.w.json(f"dev/{C03}/cmd") if c["id"] == say)
    assert cmd["args"]["priority"] == "emergency" and cmd["args"]["lang"] == "vi"
    assert cmd["args"]["text"].startswith("Cảnh báo bão số 9 đổ bộ vào Krông Pa.")
    assert cmd["exp"] > time.time() * 1000 + 3500_000  # expires (an hour) is the exp
    assert not rig.w.acks(say, device=C01)  # outside the polygon
    notices = [r for r in rig.hook.received if r.get("kind") == "cap"]
    assert notices and notices[-1]["identifier"] == "VN-KTTV-GL-2026-BAO9-001"
    assert C03 in notices[-1]["received"] and "ĐÃ PHÁT" in notices[-1]["text"]
    # the same message again (sender, identifier, sent): handled once
    rig.w.clear()
    code, again = rig.ingest(message)
    assert code == 0 and "already handled" in again and "sent" not in again.split(":", 1)[0]
    time.sleep(0.3)
    assert not [t for t, _, _ in rig.w.messages if t.endswith("/cmd")]
    # its Cancel: stopped on the device it went to, the board text withdrawn
    code, out = rig.ingest(fill("typhoon-krongpa-cancel.xml", REF_SENT=sent))
    assert code == 0, out
    assert [c["args"] for c in rig.w.json(f"dev/{C03}/cmd")] == [{"id": say}, {"id": board}]
    rig.w.wait_ack(say, "stopped", 10, device=C03)
    rig.w.wait_ack(board, "stopped", 10, device=C03)
    wait_until(lambda: "bão số 9" not in (board_text(rig.w, C03) or ""), 10,
               what="the board cleared")
    assert not rig.w.json(f"dev/{C01}/cmd") and not rig.w.json("grp/krongpa/cmd")


def test_flood_by_geocode_then_update_then_cancel_and_status(clean):
    rig = clean
    now = datetime.now(VN)
    sent = cap_time(now)
    code, out = rig.ingest(fill("flood-ba-river.xml", SENT=sent))
    assert code == 0, out
    assert "grp/krongpa (geocode VN-DISTRICT=0640; areaDesc 'Huyện Krông Pa, tỉnh Gia Lai')" \
        in out
    vi_say, en_say = ids(out, "say")
    [board] = ids(out, "board")
    for device in (C03, C01):
        assert f"ack {device} {vi_say} received" in out
        rig.w.wait_ack(vi_say, "started", 20, device=device)
        rig.w.wait_ack(board, "started", 10, device=device)
    langs = [c["args"]["lang"] for c in rig.w.json("grp/krongpa/cmd") if c["type"] == "say"]
    assert langs == ["vi", "en"]  # the group's language order

    # Update: the old content stops, the new airs
    upd_sent = cap_time(now + timedelta(seconds=1))
    code, out2 = rig.ingest(fill("flood-ba-river-update.xml", SENT=upd_sent, REF_SENT=sent))
    assert code == 0, out2
    assert "stopping 3 command(s) of the referenced message(s)" in out2
    [new_say] = ids(out2, "say")
    [new_board] = ids(out2, "board")
    for device in (C03, C01):
        stopped = rig.w.wait_ack(vi_say, "stopped", 10, device=device)
        assert stopped["detail"]["by"].startswith("cap-")
        rig.w.wait_ack(board, "stopped", 10, device=device)
        rig.w.wait_ack(en_say, "stopped", 10, device=device)  # it was waiting its turn
        rig.w.wait_ack(new_say, "started", 20, device=device)
    wait_until(lambda: "vượt đỉnh lũ năm 2009" in (board_text(rig.w, C01) or ""), 10,
               what="the updated headline")

    # Cancel of the update: audio stops everywhere, the board text is withdrawn
    refs = f"{SENDER},VN-KTTV-GL-2026-LU-SONGBA-015,{upd_sent}"
    code, out3 = rig.ingest(fill("flood-ba-river-cancel.xml", REFERENCES=refs))
    assert code == 0, out3
    assert not ids(out3, "say") and ids(out3, "stop")
    for device in (C03, C01):
        rig.w.wait_ack(new_say, "stopped", 10, device=device)
        rig.w.wait_ack(new_board, "stopped", 10, device=device)
        wait_until(lambda d=device: "sông Ba" not in (board_text(rig.w, d) or ""), 10,
                   what="the board cleared")

    # proof of dissemination: the play records the relay stored
    def status():
        code, text = rig.ctl("cap", "status", "VN-KTTV-GL-2026-LU-SONGBA-014")
        return text if code == 0 and "aired on 2 of 2 device(s)" in text else None

    text = wait_until(status, 15, what="cap status from the play records")
    assert re.search(rf"{C03}\s+AIRED\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d for [\d.]+ s "
                     r"\(stopped\)", text), text
    code, text = rig.ctl("cap", "status", "nope")
    assert code == 1 and "no CAP message" in text


def test_a_test_message_goes_only_to_the_test_group_marked(clean):
    rig = clean
    code, out = rig.ingest(fill("typhoon-test.xml"))
    assert code == 0, out
    assert "grp/thunghiem (cap.test_group)" in out
    [say] = ids(out, "say")
    rig.w.wait_ack(say, "started", 20, device=C01)
    cmd = rig.w.json("grp/thunghiem/cmd")[0]
    assert cmd["args"]["priority"] == "normal"  # never sounds like a real alert
    assert cmd["args"]["text"].startswith("Tin thử nghiệm.")
    assert not rig.w.json("grp/krongpa/cmd") and not rig.w.acks(say, device=C03)


# --- refused: nothing is sent ------------------------------------------------------------

def test_refused_and_invalid_messages_send_nothing(clean):
    rig = clean
    code, out = rig.ingest((CAP_DIR / "vn" / "expired.xml").read_bytes())
    assert code == 1 and "expired" in out
    code, out = rig.ingest((CAP_DIR / "vn" / "malformed.xml").read_bytes())
    assert code == 65 and re.search(r"alert\.xml: line 6: Element 'status'", out), out
    code, out = rig.ingest((CAP_DIR / "vn" / "billion-laughs.xml").read_bytes())
    assert code == 65 and "line 2: a DTD or entity declaration is not allowed" in out
    far = fill("flood-ba-river.xml").replace(b"<value>0640", b"<value>0641").replace(
        "Huyện Krông Pa".encode(), b"Huyen Khac")
    code, out = rig.ingest(far)
    assert code == 3 and "no device in the alert's areas" in out
    sneaky = fill("flood-ba-river.xml").replace(b"LU-SONGBA-014", "LU\u009b2J\u202e-X".encode())
    code, out = rig.ingest(sneaky.replace(b"<value>0640", b"<value>0641").replace(
        "Huyện Krông Pa".encode(), "Huyện\u009b31m".encode()))
    assert code == 3 and "\u009b" not in out and "\u202e" not in out  # shown as plain text
    assert "VN-KTTV-GL-2026-LU2J-X" in out
    code, out = rig.ctl("cap", "ingest", str(rig.tmp / "missing.xml"))
    assert code == 1 and "cannot read" in out
    (rig.www / "agency" / "old.xml").write_bytes((CAP_DIR / "vn" / "expired.xml").read_bytes())
    code, out = rig.ctl("cap", "ingest", f"{rig.base}/agency/old.xml")  # a URL
    assert code == 1 and "expired" in out
    time.sleep(0.5)
    assert not [t for t, _, _ in rig.w.messages if t.endswith("/cmd")]


# --- time and audio ----------------------------------------------------------------------

def test_a_future_onset_airs_then_not_now(clean):
    rig = clean
    now = datetime.now(VN).replace(microsecond=0)
    onset = now + timedelta(seconds=5)
    text = fill("typhoon-krongpa.xml", ONSET=cap_time(onset)).replace(
        b"BAO9-001", b"BAO9-002")
    code, out = rig.ingest(text)
    assert code == 0, out
    [say] = ids(out, "say")
    cmd = next(c for c in rig.w.json(f"dev/{C03}/cmd") if c["id"] == say)
    assert cmd["args"]["at"] == int(onset.timestamp() * 1000)
    at = rig.w.arrival(f"dev/{C03}/ack", lambda a: a.get("id") == say
                       and a.get("stage") == "started", 20)
    sent_at = rig.w.arrival(f"dev/{C03}/cmd", lambda c: c.get("id") == say)
    assert at - sent_at > 2.5  # waited for the onset


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 8)))
                               for i in range(int(16000 * seconds))))
    return buf.getvalue()


def test_an_audio_resource_is_verified_hosted_by_sha256_and_played(clean):
    rig = clean
    wav = _wav()
    (rig.www / "agency" / "canh-bao.wav").write_bytes(wav)
    resource = (f"<resource><resourceDesc>Bản ghi cảnh báo</resourceDesc>"
                f"<mimeType>audio/x-wav</mimeType><size>{len(wav)}</size>"
                f"<uri>{rig.base}/agency/canh-bao.wav</uri>"
                f"<digest>{hashlib.sha1(wav).hexdigest()}</digest></resource>").encode()
    text = fill("typhoon-krongpa.xml").replace(b"BAO9-001", b"BAO9-003").replace(
        b"<area>", resource + b"\n    <area>", 1)
    code, out = rig.ingest(text)
    assert code == 0, out
    [play] = ids(out, "play")
    sha = hashlib.sha256(wav).hexdigest()
    assert (rig.www / "media" / f"{sha}.wav").read_bytes() == wav
    cmd = next(c for c in rig.w.json(f"dev/{C03}/cmd") if c["id"] == play)
    assert cmd["args"]["media"] == {"url": f"{rig.base}/media/{sha}.wav", "sha256": sha,
                                    "lang": "vi"}
    rig.w.wait_ack(play, "started", 20, device=C03)
    # a recording that does not match its digest is not used: the text is spoken instead
    bad = text.replace(b"BAO9-003", b"BAO9-004").replace(hashlib.sha1(wav).hexdigest().encode(),
                                                         b"0" * 40)
    code, out = rig.ingest(bad)
    assert code == 0 and "does not match its SHA-1 digest" in out and ids(out, "say")
    assert not ids(out, "play")


# --- watch -------------------------------------------------------------------------------

def test_watch_a_folder_and_a_feed_each_alert_once_across_restarts(clean):
    rig = clean
    drop = rig.tmp / "drop"
    drop.mkdir()
    (drop / "test.xml").write_bytes(fill("typhoon-test.xml").replace(b"THU-007", b"THU-008"))
    (drop / "bad.xml").write_bytes((CAP_DIR / "vn" / "malformed.xml").read_bytes())
    (rig.www / "agency" / "thu-009.xml").write_bytes(
        fill("typhoon-test.xml").replace(b"THU-007", b"THU-009"))
    (rig.www / "agency" / "feed.atom").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<feed xmlns="http://www.w3.org/2005/Atom"><title>KTTV Gia Lai</title>'
        '<entry><title>Thử</title><link type="application/cap+xml" href="thu-009.xml"/>'
        '</entry></feed>', encoding="utf-8")
    down = "http://127.0.0.1:9/feed.atom"  # nothing listens: retried later, the rest goes on
    code, _ = rig.ctl("cap", "watch", str(drop), f"{rig.base}/agency/feed.atom", down,
                      "--once")
    assert code == 0
    tests = [c for c in rig.w.json("grp/thunghiem/cmd") if c["type"] == "say"]
    assert len(tests) == 2
    rig.w.clear()
    code, _ = rig.ctl("cap", "watch", str(drop), f"{rig.base}/agency/feed.atom", "--once")
    assert code == 0
    time.sleep(0.5)
    assert not [t for t, _, _ in rig.w.messages if t.endswith("/cmd")]  # handled once


# --- the OASIS specification's own examples ----------------------------------------------

def test_the_oasis_examples_end_to_end(clean):
    rig = clean
    oasis = CAP_DIR / "oasis"
    # A.4, the multilingual Amber alert (no expires: cap.default_ttl_s), by SAME geocode
    code, out = rig.ingest((oasis / "a4-amber-multilingual.xml").read_bytes())
    assert code == 0, out
    assert "grp/thunghiem (geocode SAME=006037)" in out
    [say] = ids(out, "say")  # thunghiem has no language list: vi; no vi block: the first
    cmd = rig.w.json("grp/thunghiem/cmd")[0]
    assert cmd["args"]["lang"] == "en" and cmd["args"]["priority"] == "emergency"
    assert cmd["args"]["text"].startswith("Amber Alert in Los Angeles County.")
    rig.w.wait_ack(say, "started", 20, device=C01)
    # A.2, the thunderstorm warning: expired in 2003
    code, out = rig.ingest((oasis / "a2-thunderstorm.xml").read_bytes())
    assert code == 1 and "expired" in out
    # A.1, Homeland Security: an area this district does not map
    code, out = rig.ingest((oasis / "a1-homeland-security.xml").read_bytes())
    assert code == 3 and "U.S. nationwide and interests worldwide" in out
    # A.3, an Update of a message never sent here (and a circle far from every device)
    code, out = rig.ingest((oasis / "a3-earthquake-update.xml").read_bytes())
    assert code == 3 and "referenced TRI13970876.1: nothing of it was sent here" in out
    assert len([c for c in rig.w.json("/cmd") if c["type"] != "stop"]) == 2  # A.4's only
