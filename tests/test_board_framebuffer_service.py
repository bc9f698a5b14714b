"""The board service driving a framebuffer stand-in through the real driver: what lands in the
screen file (golden images), proof-of-display from the screen itself, page images through the
verified media cache from a local HTTP server, hostile images, emergency takeover, the link.

In process on a FakeClock (times stay within one minute so the strip's clock is fixed), as
tests/test_board_service.py does; downloads and decoding run on their real threads.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import threading
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

from agent import protocol
from agent.board import service as board_service
from agent.board.page import PALETTES, Page, PageStyle, render_page
from agent.core.clock import FakeClock
from drivers.board.framebuffer import from_raw, make_standin, to_raw
from tests.conftest import Keys
from tests.fakes import make_core
from tests.test_board_framebuffer import assert_golden, bomb_png, encoded, picture

TZ = "Asia/Ho_Chi_Minh"
DEV = "dev/dev-1"
SCREEN = (400, 240)
REGION = [40, 20, 320, 180]  # the part an LED sending card would show
START = datetime(2025, 11, 26, 16, 40, 0, tzinfo=ZoneInfo(TZ))
WAIT_S = 10.0


class Files:
    """A local HTTP server for page images (``security.media_hosts: [127.0.0.1]``); a name
    starting with ``slow`` is answered after 1 s."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        files = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = files.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if path.name.startswith("slow"):
                    time.sleep(1.0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, name: str, data: bytes, sha256: str | None = None) -> dict:
        (self.folder / name).write_bytes(data)
        return {"url": f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}",
                "sha256": sha256 or hashlib.sha256(data).hexdigest()}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FbRig:
    def __init__(self, tmp_path: Path, bpp: int = 32, *, standin: bool = True) -> None:
        self.keys = Keys()
        self.clock = FakeClock(now_ms=int(START.timestamp() * 1000))
        self.fb_dir = tmp_path / "fb"
        self.fb = {"device": str(self.fb_dir / "fb"), "sysfs": str(self.fb_dir / "sysfs")}
        if standin:
            make_standin(str(self.fb_dir), *SCREEN, bpp, pad=32, fill=0x11)
        self.bpp = bpp
        self.files = Files(tmp_path / "www")
        extra = {"board": {"driver": "framebuffer", "reconnect_interval_s": 1,
                           "framebuffer": {**self.fb, "region": REGION,
                                           "title": "UBND xã Phú Túc"}},
                 "security": {"media_hosts": ["127.0.0.1"]},
                 "media": {"retries": 0, "timeout_s": 20},
                 "alerts": {"raise_after_s": 0, "clear_after_s": 0}}
        self.core = make_core(tmp_path, trusted_keys={self.keys.kid: self.keys.public_b64},
                              clock=self.clock, extra=extra)
        self.core.link.connect()
        self.svc = board_service.install(self.core, self.core.cfg)
        self.pump()

    def pump(self) -> None:
        for _ in range(4):
            self.svc.io.drain()
            self.core.run_pending()

    def wait(self, pred, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            self.pump()
            if pred():
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def advance(self, seconds: float, step: float = 0.5) -> None:
        left = seconds
        while left > 1e-9:
            dt = min(step, left)
            self.clock.advance(dt)
            left -= dt
            self.pump()

    def command(self, args: dict, exp: int | None = None) -> str:
        env = self.keys.command(DEV, "board", args, ts=self.clock.now_ms(), exp=exp)
        self.core.on_message("ttcs/dev/dev-1/cmd", protocol.canonical(env), False)
        self.pump()
        return env["id"]

    def document(self, rev: int, messages: list[dict], rotate_s: int = 10) -> None:
        env = {"v": 1, "type": "board", "target": DEV, "rev": rev, "ts": self.clock.now_ms(),
               "args": {"messages": messages, "rotate_s": rotate_s}}
        env = protocol.sign(env, self.keys.private, self.keys.kid)
        self.core.on_message("ttcs/dev/dev-1/desired/board", protocol.canonical(env), True)
        self.pump()

    def acks(self, cmd_id: str) -> list[dict]:
        return [a for a in self.core.link.json("/ack") if a["id"] == cmd_id]

    def stages(self, cmd_id: str) -> list[str]:
        return [a["stage"] for a in self.acks(cmd_id)]

    def events(self) -> list[dict]:
        return [e for e in self.core.link.json("/event")
                if e.get("type") == "board" and "started" in e]

    def region_bytes(self) -> bytes:
        x, y, w, h = REGION
        bpp = self.bpp // 8
        stride = SCREEN[0] * bpp + 32
        data = Path(self.fb["device"]).read_bytes()
        return b"".join(data[(y + r) * stride + x * bpp:][:w * bpp] for r in range(h))

    def screen(self) -> Image.Image:
        """What the region of the screen file holds now."""
        return from_raw(self.region_bytes(), REGION[2], REGION[3], self.bpp)

    def expected(self, text: str, priority: str = "normal", layout: str = "text",
                 image: Image.Image | None = None) -> Image.Image:
        page = render_page(Page(text, priority, layout, image), (REGION[2], REGION[3]),
                           START, PageStyle(title="UBND xã Phú Túc"))
        return page if self.bpp == 32 else from_raw(_rgb565(page), *page.size, 16)

    def close(self) -> None:
        self.svc.stop()
        self.core.store.close()
        self.files.close()


def _rgb565(page: Image.Image) -> bytes:
    return to_raw(page, 16)


def alerts(rig: FbRig) -> list[str]:
    return [a["code"] for a in rig.core.snapshot()["alerts"]]


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


@pytest.fixture
def rig(tmp_path):
    r = FbRig(tmp_path)
    yield r
    r.close()


TEXT = "Lịch tiêm chủng: thứ Bảy 7:30 tại trạm y tế xã"
ALERT = "KHẨN: Lũ trên sông Ba, sơ tán ngay khỏi vùng trũng"


def test_vietnamese_text_lands_in_the_region_and_the_proof_is_the_screen(rig: FbRig) -> None:
    cmd = rig.command({"text": TEXT, "duration_s": 20})
    assert rig.stages(cmd) == ["received", "queued", "started"]
    assert same(rig.screen(), rig.expected(TEXT))
    assert_golden(rig.screen(), "fb_run_text_320x180")
    on_screen = hashlib.sha256(rig.region_bytes()).hexdigest()
    rig.advance(21)
    assert rig.stages(cmd)[-1] == "done"
    [event] = rig.events()
    assert event["driver"] == "framebuffer" and event["result"] == "done"
    proof = event["screen"]
    assert proof["sha256"] == on_screen and proof["matches"] is True
    assert (proof["width"], proof["height"], proof["format"]) == (320, 180, "XRGB8888")
    with Image.open(io.BytesIO(base64.b64decode(proof["thumb"]))) as thumb:
        assert thumb.format == "JPEG" and 64 <= max(thumb.size) <= 96
        # the thumbnail is of the page: navy where the page is navy
        r, g, b = thumb.convert("RGB").getpixel((2, 40))
        assert abs(r - 11) + abs(g - 37) + abs(b - 69) < 40


def test_16bpp_playlist_with_an_image_and_an_emergency_takeover(tmp_path) -> None:
    rig = FbRig(tmp_path, bpp=16)
    try:
        photo = rig.files.add("field.png", encoded(picture((400, 300)), "PNG"))
        rig.document(1, [
            {"id": "tiem", "text": TEXT, "rotate_s": 15},
            {"id": "anh", "text": "Cánh đồng mẫu", "image": photo, "rotate_s": 5},
            {"id": "hotline", "text": "Đường dây nóng: 0269 3821 xxx", "layout": "text"}])
        rig.wait(lambda: rig.svc.images.ready(photo["sha256"]), "the image")
        assert same(rig.screen(), rig.expected(TEXT))
        rig.advance(15)
        decoded = rig.svc.images.get(photo["sha256"])
        assert same(rig.screen(), rig.expected("Cánh đồng mẫu", layout="beside", image=decoded))
        assert_golden(rig.screen(), "fb_run_playlist_image_320x180_16bpp")
        rig.advance(5)
        assert same(rig.screen(), rig.expected("Đường dây nóng: 0269 3821 xxx"))
        rig.advance(3)
        before = rig.screen()
        exp = rig.clock.now_ms() + 12_000
        cmd = rig.command({"text": ALERT, "priority": "emergency"}, exp=exp)
        assert rig.stages(cmd) == ["received", "queued", "started"]
        takeover = rig.screen()
        assert same(takeover, rig.expected(ALERT, "emergency"))
        assert_golden(takeover, "fb_run_emergency_320x180_16bpp")
        rig.advance(11.5)
        assert same(rig.screen(), takeover), "stays until its exp"
        rig.advance(1)
        assert rig.stages(cmd)[-1] == "done"
        assert same(rig.screen(), before), "the rotation resumes on the page it was on"
        records = [(e["id"], e["result"]) for e in rig.events()]
        assert records == [("tiem", "rotated"), ("anh", "rotated"), ("hotline", "preempted"),
                           (cmd, "done")]
        for event in rig.events():
            assert event["screen"]["format"] == "RGB565" and event["screen"]["matches"]
        image_event = rig.events()[1]
        assert image_event["image"] == photo
    finally:
        rig.close()


def test_hostile_images_are_refused_with_the_reason_and_the_page_stays(rig: FbRig) -> None:
    rig.document(1, [{"id": "hotline", "text": "Đường dây nóng: 0269 3821 xxx"}])
    standing = rig.region_bytes()
    assert same(rig.screen(), rig.expected("Đường dây nóng: 0269 3821 xxx"))
    jpeg = encoded(picture((640, 480)), "JPEG", quality=85)
    cases = {
        "media_checksum": rig.files.add("wrong.jpg", jpeg, sha256="0" * 64),
        "bad_image": rig.files.add("bomb.png", bomb_png()),
        "bad_image ": rig.files.add("cut.jpg", jpeg[: len(jpeg) * 2 // 3]),
        "media_host": {"url": "http://example.invalid/a.png", "sha256": "1" * 64},
    }
    ids = {}
    for reason, image in cases.items():
        ids[reason] = rig.command({"text": ALERT, "priority": "emergency", "image": image})
    for reason, cmd in ids.items():
        rig.wait(lambda c=cmd: rig.stages(c)[-1:] == ["failed"], f"{reason} refused")
        [failed] = [a for a in rig.acks(cmd) if a["stage"] == "failed"]
        assert failed["reason"] == reason.strip(), failed
        assert rig.stages(cmd) == ["received", "failed"], "never queued, never shown"
    messages = {r: a["detail"]["error"] for r, c in ids.items()
                for a in rig.acks(c) if a["stage"] == "failed"}
    assert "decompression bomb" in messages["bad_image"]
    assert "cannot decode" in messages["bad_image "]
    assert rig.region_bytes() == standing, "the standing page stayed on screen"
    assert rig.svc.link is True


def test_a_command_stopped_while_its_image_comes_is_never_shown(rig: FbRig) -> None:
    photo = rig.files.add("slow-photo.png", encoded(picture(), "PNG"))
    before = rig.region_bytes()
    cmd = rig.command({"text": TEXT, "image": photo})
    assert rig.stages(cmd) == ["received"], "queued once its image is ready"
    assert rig.svc.stop_id(cmd) is True
    assert rig.stages(cmd) == ["received", "stopped"]
    rig.wait(lambda: rig.svc.images.ready(photo["sha256"]), "the image")
    rig.pump()
    assert rig.stages(cmd) == ["received", "stopped"]
    assert rig.svc.state()["showing"] is None and rig.region_bytes() == before


def test_a_document_page_with_a_bad_image_is_recorded_and_never_shown(rig: FbRig) -> None:
    bad = rig.files.add("cut.png", encoded(picture(), "PNG")[:300])
    rig.document(1, [{"id": "one", "text": TEXT},
                     {"id": "pic", "text": "Ảnh", "layout": "image", "image": bad}])
    rig.wait(lambda: rig.svc.images.refused(bad["sha256"]) is not None, "the refusal")
    [refusal] = [e for e in rig.core.link.json("/event") if e.get("result") == "image_refused"]
    assert refusal["id"] == "pic" and refusal["reason"] == "bad_image" and refusal["rev"] == 1
    rig.advance(25)  # past two turns: the only page that can show stays
    assert rig.svc.state()["showing"]["id"] == "one" and not rig.events()
    assert same(rig.screen(), rig.expected(TEXT))


def test_a_standing_page_is_not_redrawn_until_the_minute(rig: FbRig) -> None:
    rig.command({"text": TEXT, "effect": "static", "duration_s": 600})
    drawn = rig.svc.driver.pages
    rig.advance(50, step=0.05)  # 16:40:00 -> 16:40:50, timers get every chance to fire
    assert rig.svc.driver.pages == drawn, "no redraw while a page stands"
    rig.advance(10.5)
    assert rig.svc.driver.pages == drawn + 1, "the strip's clock moves once a minute"


def test_no_framebuffer_raises_board_link_and_recovers(tmp_path) -> None:
    rig = FbRig(tmp_path, standin=False)
    try:
        cmd = rig.command({"text": TEXT, "duration_s": 60})
        assert rig.stages(cmd) == ["received", "queued", "started"], "accepted all the same"
        assert rig.svc.link is False
        assert "board_link" in alerts(rig)
        assert "no framebuffer geometry" in rig.svc.state()["error"]
        make_standin(str(rig.fb_dir), *SCREEN, 32, pad=32)
        rig.advance(1.5)
        assert rig.svc.link is True and "board_link" not in alerts(rig)
        assert same(rig.screen(), rig.expected(TEXT))
        rig.advance(60)
        [event] = rig.events()
        assert event["link_lost"] is True and event["screen"]["matches"] is True
    finally:
        rig.close()


def test_something_else_drawing_over_the_page_shows_in_the_proof(rig: FbRig) -> None:
    """The proof is read from the screen: a console cursor or another program drawing over
    the page makes ``matches`` false (seen at a drawing, here the minute's; the sha256 stays
    the first drawing's)."""
    cmd = rig.command({"text": TEXT, "duration_s": 120})
    assert rig.stages(cmd)[-1] == "started"
    first = hashlib.sha256(rig.region_bytes()).hexdigest()
    colours = PALETTES["normal"]
    assert rig.screen().getpixel((5, 100)) == colours.background
    driver = rig.svc.driver
    real_show = driver.show

    def show_then_scribble(page):
        real_show(page)
        with open(rig.fb["device"], "r+b") as f:  # a console writes over the region
            f.seek((REGION[1] + 50) * (SCREEN[0] * 4 + 32) + REGION[0] * 4)
            f.write(b"\xff" * 40)

    driver.show = show_then_scribble
    rig.advance(61)
    driver.show = real_show
    rig.advance(60)
    [event] = rig.events()
    assert event["screen"]["matches"] is False
    assert event["screen"]["sha256"] == first


# --- a real agent, a real mosquitto ----------------------------------------------------------


def test_process_emergency_takeover_on_the_screen_with_its_proof(broker, keys, tmp_path,
                                                                 agent_factory) -> None:
    """The agent as it runs on a cabinet: a standing page with a photo fetched through the
    media cache, an emergency over it until its ``exp``, the standing page back, and a show
    record whose proof is the hash of what the screen file held."""
    from tests.conftest import Watcher, agent_config, wait_online, wait_until

    device = "krongpa-phutuc-c03"
    fb = make_standin(str(tmp_path / "fb"), 320, 180, 16)
    files = Files(tmp_path / "www")
    photo = files.add("photo.jpg", encoded(picture((640, 480)), "JPEG"))
    config = agent_config(tmp_path, broker.port, keys, device=device,
                          security={"trusted_keys": {keys.kid: keys.public_b64},
                                    "media_hosts": ["127.0.0.1"]},
                          board={"driver": "framebuffer", "framebuffer": fb})
    watcher = Watcher(broker.port, ["ttcs/#"])
    try:
        agent = agent_factory(config)
        wait_online(watcher, device)
        doc = protocol.sign({"v": 1, "type": "board", "target": f"dev/{device}", "rev": 1,
                             "ts": int(time.time() * 1000), "args": {"messages": [
                                 {"id": "anh", "text": TEXT, "image": photo}]}},
                            keys.private, keys.kid)
        watcher.publish(f"ttcs/dev/{device}/desired/board", doc, retain=True)

        def screen() -> Image.Image:
            return from_raw(Path(fb["device"]).read_bytes(), 320, 180, 16)

        def near(pixel, colour) -> bool:  # RGB565 and JPEG: within a few levels
            return all(abs(a - b) <= 12 for a, b in zip(pixel, colour, strict=True))

        wait_until(lambda: all(near(screen().getpixel((x, 130)), (40, 150, 60))
                               for x in range(10, 140, 8)), 20,
                   what="the standing page with its photo (its green field)")
        def body() -> bytes:  # below the strip, whose clock may turn a minute meanwhile
            return Path(fb["device"]).read_bytes()[20 * 320 * 2:]

        standing = body()
        exp = int(time.time() * 1000) + 4000
        alert = keys.command(f"dev/{device}", "board", {"text": ALERT, "priority": "emergency"},
                             exp=exp)
        watcher.publish(f"ttcs/dev/{device}/cmd", alert)
        watcher.wait_ack(alert["id"], "started")
        wait_until(lambda: near(screen().getpixel((1, 178)), PALETTES["emergency"].frame), 15,
                   what="the emergency page (its yellow frame)")
        emergency = hashlib.sha256(Path(fb["device"]).read_bytes()).hexdigest()
        watcher.wait_ack(alert["id"], "done", timeout=15)
        assert time.time() * 1000 >= exp - 100, "it stayed until its exp"
        wait_until(lambda: body() == standing, 15, what="the standing page back, as it was")
        [record] = [e for e in watcher.json(f"dev/{device}/event")
                    if e.get("type") == "board" and e.get("id") == alert["id"]]
        assert record["result"] == "done" and record["priority"] == "emergency"
        assert record["screen"]["sha256"] == emergency and record["screen"]["matches"]
        assert agent.alive()
    finally:
        watcher.close()
        files.close()
