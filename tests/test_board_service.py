"""The board service wired into the core.

In process (FakeClock, FakeLink): commands, documents, rotation, overrides, frames, link loss,
the public API. As a process against a real mosquitto: the same seen from outside, persistence
across a restart with the broker absent, and the ``board-preview`` CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

from agent import protocol
from agent.board import service as board_service
from agent.board.render import RenderConfig, TextRender
from agent.board.service import IMAGE_FPS, BoardService
from agent.core.clock import FakeClock
from tests.conftest import ROOT, Keys, Watcher, agent_config, wait_online, wait_until
from tests.fakes import make_core
from tests.test_board_drivers import FakeAlphaSign

TZ = "Asia/Ho_Chi_Minh"
DEV = "dev/dev-1"
CMD = "ttcs/dev/dev-1/cmd"
DOC = "ttcs/dev/dev-1/desired/board"
BULLETIN = "THÔNG BÁO KHẨN: Bão số 3 đổ bộ, đề nghị người dân ở trong nhà"


def wednesday(hhmm: str) -> int:
    local = datetime.fromisoformat(f"2025-11-26T{hhmm}:00").replace(tzinfo=ZoneInfo(TZ))
    return int(local.timestamp() * 1000)


def expected(text: str, effect: str = "auto", width: int = 64, height: int = 16) -> bytes:
    """The frame of a message that stands still (a scroll starts blank: useless to compare)."""
    render = TextRender(text, RenderConfig(width, height), effect)
    assert not render.scrolling, f"{text!r} does not fit {width}x{height}"
    return render.frame_at(0).tobytes()


def scroll_frames(text: str, width: int = 64, height: int = 16) -> set[bytes]:
    """Every frame of one scroll loop of ``text``, blank ones left out."""
    render = TextRender(text, RenderConfig(width, height), "scroll")
    frames = {render._window(offset).tobytes() for offset in range(render.period_px)}
    return frames - {Image.new("1", (width, height)).tobytes()}


def signed_doc(keys: Keys, target: str, rev: int, messages: list[dict], rotate_s: int = 10,
               ts: int | None = None) -> dict:
    """A signed ``desired/board`` document (no id: documents are replay-checked by rev)."""
    env = {"v": 1, "type": "board", "target": target, "rev": rev,
           "ts": ts if ts is not None else int(time.time() * 1000),
           "args": {"messages": messages, "rotate_s": rotate_s}}
    return protocol.sign(env, keys.private, keys.kid)


def png(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("1").tobytes()


# --- in process ----------------------------------------------------------------------------


class Rig:
    """A core on a FakeClock with the board service installed; drives time and the driver
    thread deterministically (no sleeping: the driver thread is drained, not waited for)."""

    def __init__(self, tmp_path: Path, board: dict, *, now_ms: int | None = None,
                 alerts: dict | None = None, keys: Keys | None = None) -> None:
        self.keys = keys or Keys()
        self.clock = FakeClock(now_ms=now_ms or wednesday("16:40"))
        self.image = tmp_path / "out" / "board.png"
        extra = {"board": {"driver": "image", "image_path": str(self.image), **board},
                 "alerts": alerts or {"raise_after_s": 2, "clear_after_s": 2}}
        self.core = make_core(tmp_path, trusted_keys={self.keys.kid: self.keys.public_b64},
                              clock=self.clock, extra=extra)
        self.core.link.connect()
        self.svc: BoardService = board_service.install(self.core, self.core.cfg)
        self.pump()

    def pump(self) -> None:
        for _ in range(4):
            self.svc.io.drain()
            self.core.run_pending()

    def advance(self, seconds: float, step: float = 0.25) -> None:
        left = seconds
        while left > 1e-9:
            dt = min(step, left)
            self.clock.advance(dt)
            left -= dt
            self.pump()

    def command(self, args: dict, cmd_id: str | None = None) -> str:
        env = self.keys.command(DEV, "board", args, cmd_id=cmd_id, ts=self.clock.now_ms())
        self.core.on_message(CMD, protocol.canonical(env), False)
        self.pump()
        return env["id"]

    def document(self, rev: int, messages: list[dict], rotate_s: int = 10,
                 target: str = DEV) -> None:
        env = signed_doc(self.keys, target, rev, messages, rotate_s, ts=self.clock.now_ms())
        self.core.on_message(f"ttcs/{target}/desired/board", protocol.canonical(env), True)
        self.pump()

    def stages(self, cmd_id: str) -> list[str]:
        return [a["stage"] for a in self.core.link.json("/ack") if a["id"] == cmd_id]

    def events(self, typ: str = "board") -> list[dict]:
        """Events of ``typ``; for "board", the show records (document events carry a rev)."""
        return [e for e in self.core.link.json("/event")
                if e.get("type") == typ and (typ != "board" or "started" in e)]

    def doc_events(self) -> list[dict]:
        return [e for e in self.core.link.json("/event") if e.get("type") == "board"
                and "rev" in e]

    def state(self) -> dict:
        return self.core.snapshot()["board"]

    def close(self) -> None:
        self.svc.stop()
        self.core.store.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, {})
    yield r
    r.close()


def test_command_shows_text_then_done_with_event(rig: Rig) -> None:
    cmd = rig.command({"text": "Họp 19h", "effect": "static", "duration_s": 30})
    assert rig.stages(cmd) == ["received", "queued", "started"]
    assert png(rig.image) == expected("Họp 19h", "static")
    assert rig.state()["showing"]["id"] == cmd and rig.state()["link"] is True
    started = rig.clock.now_ms()
    rig.advance(29)
    assert rig.stages(cmd)[-1] == "started" and not rig.events()
    rig.advance(1.5)
    assert rig.stages(cmd)[-1] == "done"
    [event] = rig.events()
    assert event["id"] == cmd and event["text"] == "Họp 19h" and event["result"] == "done"
    assert event["started"] == started and event["ended"] - started == 30_000
    assert event["driver"] == "image" and "link_lost" not in event
    assert png(rig.image) == Image.new("1", (64, 16)).tobytes(), "blank after the message"


def test_bad_args_rejected_and_nothing_shown(rig: Rig) -> None:
    cmd = rig.command({"text": "", "priority": "urgent", "colour": "red"})
    acks = [a for a in rig.core.link.json("/ack") if a["id"] == cmd]
    assert [(a["stage"], a["reason"]) for a in acks] == [("rejected", "bad_args")]
    assert len(acks[0]["detail"]["errors"]) == 3
    assert rig.state()["showing"] is None


def test_scroll_frames_follow_the_clock_and_the_rate_is_capped(rig: Rig) -> None:
    rig.command({"text": BULLETIN, "effect": "scroll", "duration_s": 600})
    render = TextRender(BULLETIN, RenderConfig(64, 16), "scroll")
    assert png(rig.image) == render.frame_at(0).tobytes()
    seen = set()
    for k in range(1, 9):
        rig.advance(0.5, step=0.5)
        assert png(rig.image) == render.frame_at(0.5 * k).tobytes()
        seen.add(png(rig.image))
    assert len(seen) == 8, "the text moves"
    driver = rig.svc.driver
    before = driver.frames
    rig.advance(10, step=0.01)  # timers get every chance to fire
    assert 10 * IMAGE_FPS * 0.9 <= driver.frames - before <= 10 * IMAGE_FPS + 1


def test_unchanged_frames_are_not_written_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"scroll_gap_px": 400})  # a long blank stretch between loops
    try:
        rig.command({"text": "Họp", "effect": "scroll", "duration_s": 600})
        render = TextRender("Họp", RenderConfig(64, 16, scroll_gap_px=400), "scroll")
        visible_s = (64 + render.text_width) / render.cfg.scroll_speed_px_s
        before = rig.svc.driver.frames
        rig.advance(render.period_s, step=0.05)
        written = rig.svc.driver.frames - before
        assert written <= visible_s * IMAGE_FPS + 3, "blank frames are written once"
        assert written >= visible_s * IMAGE_FPS * 0.8
    finally:
        rig.close()


def test_standing_rotation_emergency_override_and_return(rig: Rig) -> None:
    rig.document(3, [{"id": "m1", "text": "Tin một"}, {"id": "m2", "text": "Tin hai"}],
                 rotate_s=10)
    [doc_event] = rig.doc_events()
    assert doc_event["result"] == "applied" and doc_event["topic"] == "dev/dev-1/desired/board"
    assert png(rig.image) == expected("Tin một")
    rig.advance(9.75)
    assert png(rig.image) == expected("Tin một")
    rig.advance(0.5)
    assert png(rig.image) == expected("Tin hai")
    rig.advance(2)
    emergency = rig.command({"text": "SƠ TÁN", "priority": "emergency", "duration_s": 5,
                             "effect": "static"})
    assert png(rig.image) == expected("SƠ TÁN", "static")
    normal = rig.command({"text": "Họp", "duration_s": 5, "effect": "static"})
    assert rig.stages(normal) == ["received", "queued"], "waits behind the emergency"
    rig.advance(5.25)
    assert rig.stages(emergency)[-1] == "done"
    assert png(rig.image) == expected("Họp", "static")
    rig.advance(5.25)
    assert png(rig.image) == expected("Tin hai"), "standing content returns where it was"
    records = [(e["id"], e["result"]) for e in rig.events()]
    assert records == [("m1", "rotated"), ("m2", "preempted"), (emergency, "done"),
                       (normal, "done")]
    assert all(e["ended"] > e["started"] for e in rig.events())


def test_documents_revs_persistence_and_restore(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {})
    rig.document(5, [{"id": "a", "text": "Họp tổ 5"}])
    rig.document(5, [{"id": "a", "text": "Họp tổ 5"}])  # re-delivered at reconnect
    rig.document(4, [{"id": "old", "text": "Tin cũ"}])
    rig.document(6, [{"id": "b", "text": "Tin nhóm"}], target="grp/g1")
    assert [(e["rev"], e["result"], e.get("reason")) for e in rig.doc_events()] == [
        (5, "applied", None), (4, "refused", "stale_rev"), (6, "applied", None)]
    stored = sorted(p.name for p in (tmp_path / "state" / "board-docs").iterdir())
    assert stored == ["doc-dev%2Fdev-1.json", "doc-grp%2Fg1.json"]
    # a stored document for a group the device left is dropped; a tampered one ignored
    rig.svc.store.save("grp/gone", 1, b"{}")
    rig.close()
    record = json.loads((tmp_path / "state" / "board-docs" / "doc-grp%2Fg1.json").read_text())
    raw = json.loads(protocol.base64.b64decode(record["envelope_b64"]))
    raw["args"]["messages"][0]["text"] = "giả mạo"
    record["envelope_b64"] = protocol.base64.b64encode(protocol.canonical(raw)).decode()
    (tmp_path / "state" / "board-docs" / "doc-grp%2Fg1.json").write_text(json.dumps(record))
    (tmp_path / "out" / "board.png").unlink()

    again = Rig(tmp_path, {}, keys=rig.keys)  # the link never connects: no broker
    try:
        assert png(again.image) == expected("Họp tổ 5")
        assert again.state()["documents"] == {"dev/dev-1": {"rev": 5, "messages": 1}}
        assert not (tmp_path / "state" / "board-docs" / "doc-grp%2Fgone.json").exists()
        again.document(5, [{"id": "x", "text": "Khác"}])
        again.document(4, [{"id": "x", "text": "Khác"}])
        assert png(again.image) == expected("Họp tổ 5"), "no rollback after restart"
    finally:
        again.close()


def test_bad_document_is_rejected_not_applied(rig: Rig) -> None:
    rig.document(1, [{"id": "a", "text": ""}, {"id": "a", "text": "x", "days": ["xyz"]}])
    [event] = rig.doc_events()
    assert (event["result"], event["reason"]) == ("rejected", "bad_args")
    assert rig.state()["documents"] == {}


def test_image_link_loss_raises_board_link_and_recovers(rig: Rig) -> None:
    rig.command({"text": BULLETIN, "effect": "scroll", "duration_s": 600})
    folder = rig.image.parent
    shutil.rmtree(folder)
    folder.write_text("a file where the folder was")  # even root cannot write below a file
    rig.advance(1)
    assert rig.state()["link"] is False and "board.png" in rig.state()["error"]
    assert rig.core.health_extra()["board_link"] is False
    rig.advance(3)
    alerts = rig.events("alert")
    assert [(a["code"], a["state"]) for a in alerts] == [("board_link", "raised")]
    frames = rig.svc.driver.frames
    rig.advance(5)
    assert rig.svc.driver.frames == frames, "no frames while the link is down"
    folder.unlink()
    rig.advance(1.5)
    assert rig.state()["link"] is True and rig.image.is_file()
    rig.advance(3)
    assert [(a["code"], a["state"]) for a in rig.events("alert")][-1] == ("board_link", "cleared")
    assert rig.svc.driver.frames > frames + 4, "scrolling resumed"
    rig.svc.stop_all()
    rig.pump()
    [event] = rig.events()
    assert event["link_lost"] is True and event["result"] == "stopped"


def test_public_api_stop_and_emergency_text(rig: Rig) -> None:
    a = rig.command({"text": "Một", "duration_s": 100, "effect": "static"})
    b = rig.command({"text": "Hai", "duration_s": 100, "effect": "static"})
    assert rig.svc.stop_id(b) is True and rig.svc.stop_id("nope") is False
    rig.pump()
    assert rig.stages(b) == ["received", "queued", "stopped"]
    assert rig.svc.show_audio_text("play-9", "Lũ quét", "emergency", 20) is True
    assert rig.svc.show_audio_text("play-bad", "", "emergency", 20) is False
    rig.advance(1)
    assert png(rig.image) in scroll_frames("Lũ quét"), "an emergency scrolls"
    assert rig.stages("play-9") == [], "the audio service acks its own command"
    assert rig.stages(a)[-1] == "preempted"
    rig.advance(19.25)
    assert rig.stages(a)[-1] == "resumed" and png(rig.image) == expected("Một", "static")
    [emergency] = [e for e in rig.events() if e["id"] == "play-9"]
    assert emergency["origin"] == "audio" and emergency["priority"] == "emergency"
    assert rig.svc.stop_all() == [a]
    rig.pump()
    assert rig.stages(a)[-1] == "stopped"


def test_audio_text_at_any_priority_ahead_of_its_own_and_nothing_after_stop(rig: Rig) -> None:
    a = rig.command({"text": "Một", "duration_s": 100, "effect": "static"})
    assert rig.svc.show_audio_text("play-1", "Hai", "normal", 50) is True
    rig.pump()
    assert rig.state()["showing"]["id"] == "play-1", "what airs goes ahead of its priority"
    assert rig.stages(a)[-1] == "preempted"
    later = rig.command({"text": "Năm", "duration_s": 100})
    assert rig.state()["showing"]["id"] == "play-1", "also ahead of a newer normal message"
    assert rig.svc.show_audio_text("play-2", "Ba", "priority", 50) is True
    rig.pump()
    assert rig.state()["showing"]["id"] == "play-2"
    assert rig.svc.stop_id("play-2") and rig.svc.stop_id("play-1")
    rig.pump()
    assert rig.state()["showing"]["id"] == a and rig.stages(a)[-1] == "resumed"
    assert rig.stages(later) == ["received", "queued"]
    assert rig.svc.show_audio_text("play-3", "Bốn", "loud", 50) is False
    assert rig.stages("play-1") == rig.stages("play-2") == []
    rig.svc.stop()  # shutdown: the audio service's late withdrawals are no-ops
    assert rig.svc.show_audio_text("play-4", "Năm") is False
    assert rig.svc.stop_id("play-2") is False and rig.svc.stop_all() == []


def test_brightness_by_time_of_day(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"brightness_schedule": {"06:00": 200, "18:00": 40}},
              now_ms=wednesday("17:58"))
    try:
        assert rig.svc.driver.brightness == 200 and rig.state()["brightness"] == 200
        rig.advance(125, step=5)
        assert rig.svc.driver.brightness == 40 and rig.state()["brightness"] == 40
    finally:
        rig.close()


def test_shutdown_records_what_was_shown_and_keeps_commands_for_the_restart(rig: Rig) -> None:
    cmd = rig.command({"text": "Một", "duration_s": 100})
    rig.advance(3)
    rig.svc.stop()
    assert rig.stages(cmd) == ["received", "queued", "started"], "no final ack: it shows on"
    [event] = rig.events()
    assert event["result"] == "shutdown" and event["ended"] - event["started"] == 3000
    [kept] = rig.core.store.board_messages()
    assert (kept["id"], kept["remaining_s"]) == (cmd, 97.0)


def restart(tmp_path: Path, old: Rig, after_s: float) -> Rig:
    """A new agent on the same state folder ``after_s`` later; the core answers what is still
    open (Core.run does it before anything else)."""
    again = Rig(tmp_path, {}, now_ms=old.clock.now_ms() + round(after_s * 1000), keys=old.keys)
    again.core._fail_interrupted()
    again.pump()
    return again


def test_ad_hoc_messages_show_on_after_a_crash_until_their_end(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {})
    normal = rig.command({"text": "Một", "duration_s": 100, "effect": "static"})
    rig.advance(30)
    urgent = rig.command({"text": "Hai", "priority": "priority", "duration_s": 50,
                          "effect": "static"})
    short = rig.command({"text": "Ba", "duration_s": 20})
    rig.advance(10)
    rig.core.store.close()  # SIGKILL or a power cut: no stop hook
    again = restart(tmp_path, rig, after_s=15)
    try:
        assert again.state()["showing"]["id"] == urgent, "the order is kept"
        assert [q["id"] for q in again.state()["queue"]] == [urgent, normal, short]
        assert again.stages(urgent) == ["resumed"] and again.stages(normal) == []
        assert png(again.image) == expected("Hai", "static")
        again.advance(25)  # urgent had 40 s left, less the 15 s off: its end
        assert again.stages(urgent) == ["resumed", "done"]
        assert again.stages(normal) == ["resumed"], "70 s left, not counted while covered"
        again.advance(70)
        assert again.stages(normal) == ["resumed", "done"]
        assert again.stages(short) == ["started"]  # 20 s: never shown before the cut
        again.advance(20)
        assert again.stages(short) == ["started", "done"] and again.state()["showing"] is None
        assert not [a for a in again.core.link.json("/ack") if a["stage"] == "failed"]
    finally:
        again.close()


def test_ad_hoc_messages_ended_while_the_agent_was_off_are_dropped(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {})
    cmd = rig.command({"text": "Một", "duration_s": 60})
    rig.advance(10)
    rig.svc.stop()
    rig.core.store.close()
    again = restart(tmp_path, rig, after_s=51)  # its end passed a second ago
    try:
        assert again.state()["showing"] is None and again.state()["queue"] == []
        [ack] = again.core.link.json("/ack")
        assert (ack["id"], ack["stage"], ack["reason"]) == (cmd, "failed", "interrupted")
        assert again.core.store.board_messages() == []
    finally:
        again.close()


def test_audio_texts_are_not_kept(rig: Rig) -> None:
    rig.svc.show_audio_text("play-1", "Bản tin", "normal", 600)
    rig.pump()
    assert rig.state()["showing"]["id"] == "play-1"
    assert rig.core.store.board_messages() == []


def test_driver_none_accepts_and_records(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"driver": "none"})
    try:
        cmd = rig.command({"text": "Một", "duration_s": 2})
        rig.advance(2.5)
        assert rig.stages(cmd) == ["received", "queued", "started", "done"]
        assert rig.events()[0]["driver"] == "none"
        assert rig.core.health_extra()["board_link"] is None and not rig.image.exists()
    finally:
        rig.close()


def test_unusable_driver_is_an_alert_not_a_crash(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"driver": "serial"})  # no serial_port configured
    try:
        rig.advance(3)
        assert [(a["code"], a["state"]) for a in rig.events("alert")] == [
            ("board_link", "raised")]
        cmd = rig.command({"text": "Một", "duration_s": 2})
        assert rig.stages(cmd)[-1] == "started"
        assert rig.state()["link"] is False and "serial_port" in rig.state()["error"]
    finally:
        rig.close()


def test_serial_sign_text_once_per_message_and_pty_loss(tmp_path: Path) -> None:
    port = tmp_path / "ttyUSB0"
    first = FakeAlphaSign()
    port.symlink_to(first.slave_name)
    rig = Rig(tmp_path, {"driver": "serial", "serial_port": str(port),
                         "reconnect_interval_s": 0, "sign_columns": 12})
    try:
        assert first.read_packet()["text"] == "", "blank at start"
        rig.document(1, [{"id": "m1", "text": "Họp xóm"},
                         {"id": "m2", "text": "Đề nghị người dân ở trong nhà"}], rotate_s=10)
        packet = first.read_packet()
        assert (packet["text"], packet["mode"]) == ("Hop xom", "b"), "fits 12 columns: hold"
        rig.advance(10.25)
        packet = first.read_packet()
        assert (packet["text"], packet["mode"]) == ("De nghi nguoi dan o trong nha", "a")
        assert rig.svc.driver.packets == 3, "one packet per message, none per frame"
        first.close()
        rig.advance(10.25)  # the turn of m1 again: the write fails
        assert rig.state()["link"] is False
        port.unlink()
        second = FakeAlphaSign()
        port.symlink_to(second.slave_name)
        try:
            rig.advance(1.5)
            assert rig.state()["link"] is True
            assert second.read_packet()["text"] == "Hop xom", "the message on show, again"
            rig.advance(10)
            assert second.read_packet()["text"].startswith("De nghi")
            events = rig.events()
            assert events[0]["sign_text"] == "Hop xom" and events[0]["text"] == "Họp xóm"
            assert events[2]["link_lost"] is True
        finally:
            second.close()
    finally:
        rig.close()


# --- a real agent process against a real mosquitto ------------------------------------------

PDEV = "krongpa-phutuc-c03"
PCMD = f"ttcs/dev/{PDEV}/cmd"
PDOC = f"ttcs/dev/{PDEV}/desired/board"


def process_config(tmp_path: Path, port: int, keys: Keys, **board) -> Path:
    return agent_config(
        tmp_path, port, keys,
        board={"driver": "image", "image_path": str(tmp_path / "out" / "board.png"),
               "reconnect_interval_s": 1, **board},
        alerts={"raise_after_s": 0, "clear_after_s": 0},
    )


def png_or_none(path: Path) -> bytes | None:
    try:
        return png(path)
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def wait_png(path: Path, frame: bytes, what: str, timeout: float = 15) -> None:
    wait_until(lambda: png_or_none(path) == frame, timeout, what=what)


def board_events(watcher: Watcher) -> list[dict]:
    return [e for e in watcher.json(f"dev/{PDEV}/event") if e.get("type") == "board"]


@pytest.fixture
def watcher(broker):
    w = Watcher(broker.port, ["ttcs/#"])
    yield w
    w.close()


def test_process_command_document_and_emergency(broker, keys, tmp_path, agent_factory, watcher):
    image = tmp_path / "out" / "board.png"
    agent = agent_factory(process_config(tmp_path, broker.port, keys))
    wait_online(watcher, PDEV)
    watcher.publish(PDOC, signed_doc(keys, f"dev/{PDEV}", 1, [{"id": "m1", "text": "Họp tổ 5"}]),
                    retain=True)
    wait_png(image, expected("Họp tổ 5"), "standing content on the board")
    cmd = keys.command(f"dev/{PDEV}", "board",
                       {"text": "Họp 19h", "effect": "static", "duration_s": 2})
    watcher.publish(PCMD, cmd)
    watcher.wait_ack(cmd["id"], "started")
    wait_png(image, expected("Họp 19h", "static"), "the command's text")
    emergency = keys.command(f"dev/{PDEV}", "board", {"text": "SƠ TÁN", "effect": "static",
                                                      "priority": "emergency", "duration_s": 2})
    watcher.publish(PCMD, emergency)
    watcher.wait_ack(cmd["id"], "preempted")
    wait_png(image, expected("SƠ TÁN", "static"), "the emergency overrides")
    watcher.wait_ack(emergency["id"], "done", timeout=15)
    watcher.wait_ack(cmd["id"], "resumed")
    watcher.wait_ack(cmd["id"], "done", timeout=15)
    wait_png(image, expected("Họp tổ 5"), "standing content returns")
    stages = [a["stage"] for a in watcher.acks(cmd["id"])]
    assert stages == ["received", "queued", "started", "preempted", "resumed", "done"]
    records = wait_until(lambda: [e for e in board_events(watcher) if "started" in e][:4]
                         if len([e for e in board_events(watcher) if "started" in e]) >= 4
                         else None, what="four show records")
    assert [(e["id"], e["result"]) for e in records] == [
        ("m1", "preempted"), (cmd["id"], "preempted"), (emergency["id"], "done"),
        (cmd["id"], "done")]
    shown = sum(e["ended"] - e["started"] for e in records if e["id"] == cmd["id"])
    assert 1900 <= shown <= 3500, "2 s of display time, paused while the emergency showed"
    assert all(isinstance(e["seq"], int) and e["text"] for e in records)
    [doc] = [e for e in board_events(watcher) if "rev" in e]
    assert (doc["rev"], doc["result"], doc["topic"]) == (1, "applied", f"dev/{PDEV}/desired/board")
    state = wait_until(lambda: watcher.json(f"dev/{PDEV}/state")[-1].get("board"), what="state")
    assert state["driver"] == "image" and state["documents"] == {
        f"dev/{PDEV}": {"rev": 1, "messages": 1}}
    assert agent.alive()


def test_process_document_survives_restart_without_broker(broker, keys, tmp_path,
                                                          agent_factory, watcher):
    image = tmp_path / "out" / "board.png"
    config = process_config(tmp_path, broker.port, keys)
    agent = agent_factory(config)
    wait_online(watcher, PDEV)
    watcher.publish(PDOC, signed_doc(keys, f"dev/{PDEV}", 7, [{"id": "a", "text": "Họp tổ 5"}]),
                    retain=True)
    wait_png(image, expected("Họp tổ 5"), "the document applied")
    assert agent.stop() == 0
    watcher.close()
    broker.stop()
    image.unlink()
    again = agent_factory(config)  # no broker: the stored document must show anyway
    wait_png(image, expected("Họp tổ 5"), "standing content restored offline")
    assert again.alive() and "board document dev/" in again.log()
    broker.start()  # same port; the retained document is gone with the old broker
    fresh = Watcher(broker.port, ["ttcs/#"])
    try:
        wait_online(fresh, PDEV, timeout=30)
        fresh.publish(PDOC, signed_doc(keys, f"dev/{PDEV}", 6, [{"id": "b", "text": "Cũ"}]),
                      retain=True)
        event = wait_until(lambda: next((e for e in board_events(fresh) if e.get("rev") == 6),
                                        None), what="the stale document's event")
        assert (event["result"], event["reason"]) == ("refused", "stale_rev")
        assert png_or_none(image) == expected("Họp tổ 5"), "no rollback"
    finally:
        fresh.close()


def test_process_ad_hoc_message_survives_a_sigkill(broker, keys, tmp_path, agent_factory,
                                                    watcher):
    image = tmp_path / "out" / "board.png"
    config = process_config(tmp_path, broker.port, keys)
    agent = agent_factory(config)
    wait_online(watcher, PDEV)
    cmd = keys.command(f"dev/{PDEV}", "board",
                       {"text": "Cúp điện", "effect": "static", "duration_s": 12})
    watcher.publish(PCMD, cmd)
    watcher.wait_ack(cmd["id"], "started")
    wait_png(image, expected("Cúp điện", "static"), "the message")
    agent.kill()
    image.unlink()
    agent_factory(config)
    wait_png(image, expected("Cúp điện", "static"), "the message again after the restart")
    watcher.wait_ack(cmd["id"], "resumed")
    watcher.wait_ack(cmd["id"], "done", timeout=20)
    wait_png(image, png_blank(), "a blank board after its end")
    stages = [a["stage"] for a in watcher.acks(cmd["id"])]
    assert stages == ["received", "queued", "started", "resumed", "done"], stages


def png_blank(width: int = 64, height: int = 16) -> bytes:
    return Image.new("1", (width, height)).tobytes()


def test_process_link_loss_raises_and_clears_board_link(broker, keys, tmp_path, agent_factory,
                                                        watcher):
    image = tmp_path / "out" / "board.png"
    agent_factory(process_config(tmp_path, broker.port, keys))
    wait_online(watcher, PDEV)
    cmd = keys.command(f"dev/{PDEV}", "board",
                       {"text": BULLETIN, "effect": "scroll", "duration_s": 600})
    watcher.publish(PCMD, cmd)
    wait_until(lambda: png_or_none(image) in scroll_frames(BULLETIN), what="scrolling frames")

    def alerts() -> list[tuple[str, str]]:
        return [(e["code"], e["state"]) for e in watcher.json(f"dev/{PDEV}/event")
                if e.get("type") == "alert" and e.get("code") == "board_link"]

    shutil.rmtree(image.parent)
    image.parent.write_text("the SD card's folder is gone")
    wait_until(lambda: alerts() == [("board_link", "raised")], 20, what="board_link raised")
    image.parent.unlink()
    wait_until(lambda: alerts()[-1:] == [("board_link", "cleared")], 20,
               what="board_link cleared")
    wait_until(lambda: png_or_none(image) in scroll_frames(BULLETIN), what="frames again")


def test_board_preview_cli_png_and_gif(broker, keys, tmp_path):
    config = process_config(tmp_path, broker.port, keys, width=128, height=32)

    def preview(text: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent", "board-preview", text,
                               "--config", str(config), "--out", str(out), "--scale", "2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = preview("Họp 19h", tmp_path / "short.png")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "short.png") as image:
        assert image.format == "PNG" and image.size == (256, 64)
        lit = image.convert("L").resize((128, 32), Image.Resampling.NEAREST)
        assert lit.point(lambda v: 255 if v else 0).convert("1").tobytes() == expected(
            "Họp 19h", width=128, height=32)
    done = preview(BULLETIN, tmp_path / "long.gif")
    assert done.returncode == 0, done.stderr
    assert "long.gif: animated GIF" in done.stdout and "128x32" in done.stdout
    with Image.open(tmp_path / "long.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames > 10 and gif.size == (256, 64)
    bad = subprocess.run([sys.executable, "-m", "agent", "board-preview", "x", "--config",
                          str(tmp_path / "missing.yaml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1


def test_process_audio_board_text_and_stop_all(broker, keys, tmp_path, agent_factory, watcher):
    """A live relay carrying board text over a real agent (sim audio, image board): the text
    shows while it airs, and ``stop {"all": true}`` clears audio and board messages alike."""
    config = agent_config(
        tmp_path, broker.port, keys, security={"media_hosts": ["127.0.0.1"]},
        board={"driver": "image", "image_path": str(tmp_path / "out" / "board.png")})
    agent = agent_factory(config)
    wait_online(watcher, PDEV)

    def showing():
        states = watcher.json(f"dev/{PDEV}/state")
        shown = (states[-1].get("board") or {}).get("showing") if states else None
        return shown["text"] if shown else None

    notice = keys.command(f"dev/{PDEV}", "board", {"text": "Họp tổ 5", "duration_s": 120})
    watcher.publish(PCMD, notice)
    watcher.wait_ack(notice["id"], "started")
    live = keys.command(f"dev/{PDEV}", "live", {
        "url": "http://127.0.0.1:9/vov1", "priority": "priority", "duration_s": 60,
        "board_text": "Tiếp sóng VOV1"})
    watcher.publish(PCMD, live)
    assert watcher.wait_ack(live["id"], "started")["detail"]["board"] is True
    watcher.wait_ack(notice["id"], "preempted")
    wait_until(lambda: showing() == "Tiếp sóng VOV1", 10, what="the live item's board text")
    stop = keys.command(f"dev/{PDEV}", "stop", {"all": True})
    watcher.publish(PCMD, stop)
    assert watcher.wait_ack(stop["id"], "done")["detail"]["stopped"] == [live["id"],
                                                                         notice["id"]]
    watcher.wait_ack(live["id"], "stopped")
    watcher.wait_ack(notice["id"], "stopped")
    wait_until(lambda: showing() is None, 10, what="a clear board")
    shows = wait_until(lambda: [e for e in board_events(watcher) if e.get("id") == live["id"]],
                       10, what="the board record of the live item")
    assert shows[0]["origin"] == "audio" and shows[0]["text"] == "Tiếp sóng VOV1"
    assert shows[0]["result"] == "stopped" and shows[0]["priority"] == "priority"
    stages = [a["stage"] for a in watcher.acks(live["id"])]
    assert stages == ["received", "queued", "started", "stopped"]  # none from the board
    assert agent.alive()
