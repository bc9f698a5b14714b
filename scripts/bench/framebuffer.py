#!/usr/bin/env python3
"""The framebuffer board (issue #20): page drawing time, emergency takeover, idle CPU, memory.

Targets: a 1920x1080 page (text + one image) drawn and on the framebuffer in <= 150 ms; an
emergency takeover on the framebuffer <= 250 ms from the command; idle CPU unchanged while a
page stands (no redraw loop); memory for this driver <= 40 MB above the agent's idle figure.

1. In process: ``render_page`` + ``FramebufferBoard.show`` + the read-back proof, on a
   1920x1080 stand-in in /dev/shm (memory, as /dev/fb0 is), 32 and 16 bits per pixel, the
   text changing each time (no cache helps), a 1600x1200 JPEG photo beside it.
2. Real agents against a private mosquitto: one with ``board.driver: none`` (the idle
   baseline: RSS and CPU), then one on the framebuffer stand-in with a standing page carrying
   the photo (fetched through the media cache from a local HTTP server). Its RSS and idle CPU
   are compared with the baseline's; then emergency ``board`` commands are published and the
   time until the screen file's last row turns emergency yellow (the page is
   written top to bottom: it is then whole) is measured (the bench polls the
   file every millisecond), with the ``started`` ack's arrival beside it.

    .venv/bin/python scripts/bench/framebuffer.py [--draws 30] [--takeovers 10] [--idle-s 30]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import (
    AgentProcess,
    Broker,
    Keys,
    Recorder,
    agent_config,
    cpu_s,
    machine,
    parser,
    percentile,
    print_table,
    rss_kb,
    verdict,
    wait_until,
    workdir,
    write_json,
)
from PIL import Image, ImageDraw

from agent import protocol
from agent.board.page import Page, PageStyle, render_page
from agent.board.screen import thumbnail
from drivers.board.framebuffer import FramebufferBoard, make_standin
from tests.test_board_framebuffer_service import Files

SIZE = (1920, 1080)
DEV = "bench-fb"
YELLOW = (255, 214, 10)  # the emergency frame (agent.board.page.PALETTES)
TEXTS = ["Lịch tiêm chủng: thứ Bảy {n} giờ 30 tại trạm y tế xã Phú Túc",
         "Đường dây nóng phòng chống thiên tai: 0269 3821 {n:03d}",
         "Họp dân thôn {n} về kế hoạch nạo vét kênh mương, 19 giờ tại nhà văn hoá"]


def photo_jpeg() -> bytes:
    img = Image.new("RGB", (1600, 1200), (90, 160, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 800, 1600, 1200), fill=(40, 150, 60))
    for i in range(0, 1600, 40):
        draw.line((i, 800, 800, 1200), fill=(30, 110 + i % 60, 40), width=3)
    draw.ellipse((200, 150, 500, 450), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def shm_dir(name: str) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"ttcs-{name}-", dir=base))


# --- 1. drawing in process ---------------------------------------------------------------------

def draw_times(draws: int, bpp: int, photo: Image.Image) -> dict:
    folder = shm_dir(f"fb{bpp}")
    fb = make_standin(str(folder), *SIZE, bpp)
    board = FramebufferBoard({"framebuffer": fb})
    style = PageStyle(title="UBND xã Phú Túc")
    now = datetime(2025, 11, 26, 16, 40)
    totals, drawn, renders, writes, proofs, cpu = [], [], [], [], [], []
    for n in range(draws):
        text = TEXTS[n % len(TEXTS)].format(n=n)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        page = render_page(Page(text, "normal", "beside", photo), SIZE, now, style)
        t1 = time.perf_counter()
        board.show(page)
        t2 = time.perf_counter()
        c2 = time.thread_time()
        back = board.read_back()
        _ = back.sha256, thumbnail(back.thumbnail(96))
        t3 = time.perf_counter()
        renders.append((t1 - t0) * 1000)
        writes.append((t2 - t1) * 1000)
        proofs.append((t3 - t2) * 1000)
        totals.append((t3 - t0) * 1000)
        drawn.append((t2 - t0) * 1000)
        cpu.append((c2 - c0) * 1000)
    board.close()
    for p in folder.rglob("*"):
        if p.is_file():
            p.unlink()
    return {"bpp": bpp, "draws": draws,
            "render_ms_p50": percentile(renders, 50), "write_ms_p50": percentile(writes, 50),
            "proof_ms_p50": percentile(proofs, 50),
            "drawn_ms_p50": percentile(drawn, 50), "drawn_ms_p95": percentile(drawn, 95),
            "drawn_ms_max": max(drawn),
            "total_ms_p50": percentile(totals, 50), "total_ms_p95": percentile(totals, 95),
            "total_ms_max": max(totals), "drawn_cpu_ms_p50": percentile(cpu, 50),
            "drawn_cpu_ms_max": max(cpu)}


# --- 2. the agent ----------------------------------------------------------------------------

def idle(pid: int, settle_s: float, idle_s: float) -> dict:
    time.sleep(settle_s)
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(idle_s)
    c1, t1 = cpu_s(pid), time.monotonic()
    return {"rss_mb": rss_kb(pid) / 1024, "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
            "idle_s": round(t1 - t0, 1)}


def corner_pixel(device: str) -> tuple[int, int, int]:
    """The bottom-left pixel of the screen (32 bpp, no padding): the last band written, so
    the whole page is on the framebuffer when it changes (emergency: the yellow frame)."""
    with open(device, "rb") as f:
        f.seek((SIZE[1] - 1) * SIZE[0] * 4)
        b, g, r, _ = f.read(4)
    return (r, g, b)


def agent_run(base: Path, broker: Broker, keys: Keys, args) -> dict:
    # the baseline: the same agent with no board
    (base / "none").mkdir(exist_ok=True)
    (base / "fb").mkdir(exist_ok=True)
    cfg = agent_config(base / "none", broker.port, keys, device=DEV,
                       state={"min_interval_s": 1.0})
    agent = AgentProcess(cfg, base / "none.log").start()
    try:
        baseline = idle(agent.proc.pid, args.settle_s, args.idle_s)
    finally:
        agent.stop()

    folder = shm_dir("fb-agent")
    fb = make_standin(str(folder), *SIZE, 32)
    files = Files(base / "www")
    photo = files.add("photo.jpg", photo_jpeg())
    cfg = agent_config(base / "fb", broker.port, keys, device=DEV,
                       state={"min_interval_s": 1.0},
                       security={"trusted_keys": {keys.kid: keys.public_b64},
                                 "media_hosts": ["127.0.0.1"]},
                       board={"driver": "framebuffer",
                              "framebuffer": {**fb, "title": "UBND xã Phú Túc"}})
    acks: list[tuple[float, dict]] = []
    showing: list[str | None] = [None]  # the state topic's board.showing id, latest

    def on_message(t: float, topic: str, payload: bytes) -> None:
        body = json.loads(payload)
        if topic.endswith("/ack"):
            acks.append((t, body))
        elif isinstance(body.get("board"), dict):
            showing[0] = (body["board"].get("showing") or {}).get("id")

    rec = Recorder(broker.port, [f"ttcs/dev/{DEV}/ack", f"ttcs/dev/{DEV}/state"], on_message)
    agent = AgentProcess(cfg, base / "fb.log").start()
    try:
        doc = protocol.sign({"v": 1, "type": "board", "target": f"dev/{DEV}", "rev": 1,
                             "ts": int(time.time() * 1000), "args": {"messages": [
                                 {"id": "anh", "text": TEXTS[0].format(n=7), "image": photo}]}},
                            keys.private, keys.kid)
        rec.publish(f"ttcs/dev/{DEV}/desired/board", protocol.canonical(doc))
        normal = hashlib.sha256(Path(fb["device"]).read_bytes()).hexdigest()
        wait_until(lambda: hashlib.sha256(Path(fb["device"]).read_bytes()).hexdigest()
                   != normal, 30, what="a first page")
        # The agent's first page may be its idle page: wait until the standing message (its
        # photo fetched) is on show, then for the screen to settle.
        wait_until(lambda: showing[0] == "anh", 30, what="the standing page with its photo")
        time.sleep(1.0)
        standing = corner_pixel(fb["device"])
        fb_idle = idle(agent.proc.pid, args.settle_s, args.idle_s)
        takeovers, started = [], []
        for n in range(args.takeovers):
            env = keys.command(f"dev/{DEV}", "board", {
                "text": f"KHẨN CẤP: lũ trên sông Ba, sơ tán ngay (lần {n + 1})",
                "priority": "emergency", "duration_s": 60})
            before = len(acks)
            t0 = time.monotonic()
            rec.publish(f"ttcs/dev/{DEV}/cmd", protocol.canonical(env))
            while corner_pixel(fb["device"]) != YELLOW:
                if time.monotonic() - t0 > 10:
                    raise RuntimeError("no emergency page within 10 s")
                time.sleep(0.001)
            takeovers.append((time.monotonic() - t0) * 1000)
            wait_until(lambda env=env, before=before: any(
                a["id"] == env["id"] and a["stage"] == "started"
                for _, a in acks[before:]), 10, what="started")
            started.append(next((t - t0) * 1000 for t, a in acks[before:]
                                if a["id"] == env["id"] and a["stage"] == "started"))
            stop = keys.command(f"dev/{DEV}", "stop", {"all": True})
            rec.publish(f"ttcs/dev/{DEV}/cmd", protocol.canonical(stop))
            wait_until(lambda: corner_pixel(fb["device"]) == standing, 10,
                       interval=0.005, what="the standing page back")
            time.sleep(0.5)
        peak = rss_kb(agent.proc.pid) / 1024
    finally:
        agent.stop()
        rec.close()
        files.close()
        for p in folder.rglob("*"):
            if p.is_file():
                p.unlink()
    return {"baseline": baseline, "framebuffer_idle": fb_idle, "rss_mb_after_takeovers": peak,
            "takeover_ms": takeovers, "started_ack_ms": started}


def main() -> int:
    p = parser(__doc__.splitlines()[0], "framebuffer")
    p.add_argument("--draws", type=int, default=30, help="pages drawn in process, per format")
    p.add_argument("--takeovers", type=int, default=10, help="emergency commands to time")
    p.add_argument("--settle-s", type=float, default=8, help="wait before an idle window")
    p.add_argument("--idle-s", type=float, default=30, help="idle window for CPU")
    args = p.parse_args()
    base = workdir(args.workdir, "framebuffer")
    with Image.open(io.BytesIO(photo_jpeg())) as im:
        im.draft("RGB", SIZE)
        photo = im.convert("RGB")
    draws = [draw_times(args.draws, bpp, photo) for bpp in (32, 16)]
    broker = Broker(base / "broker").start()
    try:
        run = agent_run(base, broker, Keys(), args)
    finally:
        broker.stop()
    report(args, draws, run)
    return 0


def report(args, draws: list[dict], run: dict) -> None:
    rows = []
    for d in draws:
        rows += [(f"{d['bpp']} bpp page: render / write / proof p50 (ms)",
                  f"{d['render_ms_p50']:.0f} / {d['write_ms_p50']:.1f} / {d['proof_ms_p50']:.0f}",
                  "", ""),
                 (f"{d['bpp']} bpp page drawn + on fb, p50 / p95 / max (ms)",
                  f"{d['drawn_ms_p50']:.0f} / {d['drawn_ms_p95']:.0f} / {d['drawn_ms_max']:.0f}",
                  "<= 150", verdict(d["drawn_ms_p95"] <= 150)),
                 (f"{d['bpp']} bpp  ... and its proof read back, p50 / p95 (ms)",
                  f"{d['total_ms_p50']:.0f} / {d['total_ms_p95']:.0f}", "", ""),
                 (f"{d['bpp']} bpp page render + write, CPU p50 / max (ms)",
                  f"{d['drawn_cpu_ms_p50']:.0f} / {d['drawn_cpu_ms_max']:.0f}", "", "")]
    t = run["takeover_ms"]
    rows.append(("emergency on the fb from the command, p50 / max (ms)",
                 f"{percentile(t, 50):.0f} / {max(t):.0f}", "<= 250", verdict(max(t) <= 250)))
    s = run["started_ack_ms"]
    rows.append(("  'started' ack arrival, p50 (ms)", f"{percentile(s, 50):.0f}", "", ""))
    b, f = run["baseline"], run["framebuffer_idle"]
    rows.append(("idle CPU: no board / page standing (% of a core)",
                 f"{b['cpu_pct']:.2f} / {f['cpu_pct']:.2f}", "unchanged",
                 verdict(f["cpu_pct"] <= b["cpu_pct"] + 0.5)))
    extra = max(f["rss_mb"], run["rss_mb_after_takeovers"]) - b["rss_mb"]
    rows.append(("RSS: no board / page standing / after takeovers (MB)",
                 f"{b['rss_mb']:.1f} / {f['rss_mb']:.1f} / {run['rss_mb_after_takeovers']:.1f}",
                 "", ""))
    rows.append(("  the driver's share, above the idle agent (MB)", f"{extra:.1f}", "<= 40",
                 verdict(extra <= 40)))
    m = machine()
    print_table(f"framebuffer board ({m['nproc']} x {m['cpu']}, load {m['loadavg'][0]:.2f})",
                rows)
    write_json(args.out, {"bench": "framebuffer", "machine": m, "draws": draws, **run,
                          "targets": {"page_ms": 150, "takeover_ms": 250, "extra_rss_mb": 40}})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
