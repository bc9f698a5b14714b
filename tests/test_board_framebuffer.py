"""The framebuffer board driver against a stand-in (a file of the screen's size and a
sysfs-like folder), 16 and 32 bits per pixel, with regions and line padding; full-colour
pages (golden images, sizes from an LED wall to an LCD); image decoding within a budget."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw

from agent.audio.hosts import MediaError
from agent.board.images import decode
from agent.board.page import PALETTES, Page, PageStyle, fit_text, render_page
from drivers.board.base import BoardLinkError
from drivers.board.framebuffer import (
    FramebufferBoard,
    from_raw,
    make_standin,
    read_geometry,
    to_raw,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TTCS_UPDATE_GOLDEN") == "1"
NOW = datetime(2025, 11, 26, 16, 40)  # a Wednesday
STYLE = PageStyle(title="UBND xã Phú Túc")
VIETNAMESE = "THÔNG BÁO: Bão số 3 đổ bộ — Đề nghị người dân ở trong nhà, tránh xa bờ sông"


def assert_golden(image: Image.Image, name: str) -> None:
    """Compare with tests/golden/NAME.png pixel for pixel; TTCS_UPDATE_GOLDEN=1 rewrites."""
    path = GOLDEN / f"{name}.png"
    if UPDATE:
        image.save(path)
    with Image.open(path) as golden:
        expected = golden.convert("RGB")
    assert expected.size == image.size, f"{name}: size {image.size}, golden {expected.size}"
    diff = ImageChops.difference(expected, image.convert("RGB")).getbbox()
    assert diff is None, f"{name}: differs from the golden image in box {diff}"


def picture(size=(160, 120)) -> Image.Image:
    """A test photo: sky, a field, a red sun — colours that show where they land."""
    img = Image.new("RGB", size, (90, 160, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, size[1] * 2 // 3, size[0], size[1]), fill=(40, 150, 60))
    draw.ellipse((size[0] // 8, size[1] // 8, size[0] // 3, size[1] // 3), fill=(220, 30, 30))
    return img


def region_bytes(device: str, stride: int, region, bpp: int) -> bytes:
    x, y, w, h = region
    data = Path(device).read_bytes()
    line = w * bpp // 8
    return b"".join(data[(y + r) * stride + x * bpp // 8:][:line] for r in range(h))


# --- the driver ----------------------------------------------------------------------------


def test_sysfs_geometry_is_read_as_the_kernel_writes_it(tmp_path) -> None:
    fb = make_standin(str(tmp_path), 1920, 1080, 32, pad=64)
    g = read_geometry(fb["sysfs"])
    assert (g.width, g.height, g.bpp, g.stride) == (1920, 1080, 32, 1920 * 4 + 64)
    (tmp_path / "sysfs" / "bits_per_pixel").write_text("24\n")
    with pytest.raises(BoardLinkError, match="24 bits per pixel not supported"):
        read_geometry(fb["sysfs"])


def test_32bpp_whole_screen_is_bgrx_and_reads_back_what_was_drawn(tmp_path) -> None:
    fb = make_standin(str(tmp_path), 64, 32, 32, fill=0x55)
    board = FramebufferBoard({"framebuffer": fb})
    assert board.ok() and (board.width, board.height) == (64, 32)
    page = Image.new("RGB", (64, 32), (10, 20, 30))
    page.putpixel((0, 0), (255, 0, 0))
    board.show(page)
    raw = Path(fb["device"]).read_bytes()
    assert raw[:8] == bytes([0, 0, 255, 0, 30, 20, 10, 0]), "B, G, R, X little-endian"
    back = board.read_back()
    assert back.sha256 == hashlib.sha256(raw).hexdigest() == board.written_sha256
    assert ImageChops.difference(back.image(), page).getbbox() is None


def test_16bpp_region_with_padding_touches_only_the_region(tmp_path) -> None:
    fb = make_standin(str(tmp_path), 40, 20, 16, pad=6, fill=0xAA)
    region = [5, 3, 24, 12]
    board = FramebufferBoard({"framebuffer": {**fb, "region": region}})
    assert (board.width, board.height) == (24, 12)
    page = Image.new("RGB", (24, 12), (255, 0, 0))
    page.paste((0, 255, 0), (0, 6, 24, 12))
    board.show(page)
    raw = Path(fb["device"]).read_bytes()
    stride = 40 * 2 + 6
    inside = region_bytes(fb["device"], stride, region, 16)
    assert inside[:2] == bytes([0x00, 0xF8]), "pure red is 0xF800, low byte first"
    assert inside[-2:] == bytes([0xE0, 0x07]), "pure green is 0x07E0"
    # everything outside the region, line padding included, is as it was
    outside = bytearray(raw)
    for r in reversed(range(12)):  # from the end: a cut moves what follows it
        start = (3 + r) * stride + 5 * 2
        outside[start:start + 48] = b""
    assert set(outside) == {0xAA}
    back = board.read_back()
    assert back.data == inside and back.format == "RGB565"
    assert back.sha256 == hashlib.sha256(inside).hexdigest() == board.written_sha256


def test_rgb565_round_trip_keeps_the_top_bits() -> None:
    img = Image.new("RGB", (3, 1))
    img.putpixel((0, 0), (0x12, 0x34, 0x56))
    img.putpixel((1, 0), (255, 255, 255))
    back = from_raw(to_raw(img, 16), 3, 1, 16)
    r, g, b = back.getpixel((0, 0))
    assert (r & 0xF8, g & 0xFC, b & 0xF8) == (0x10, 0x34, 0x50)
    assert back.getpixel((1, 0)) == (255, 255, 255)


def test_missing_framebuffer_wrong_sizes_and_a_mode_change_are_link_errors(tmp_path) -> None:
    board = FramebufferBoard({"framebuffer": {"device": str(tmp_path / "nofb"),
                                              "sysfs": str(tmp_path / "nosysfs")}})
    assert not board.ok() and "no framebuffer geometry" in board.last_error
    with pytest.raises(BoardLinkError):
        board.show(Image.new("RGB", (64, 16)))
    fb = make_standin(str(tmp_path), 100, 50, 32)
    big = FramebufferBoard({"framebuffer": {**fb, "region": [50, 0, 80, 40]}})
    assert not big.ok() and "does not fit the 100x50 screen" in big.last_error
    Path(fb["device"]).write_bytes(bytes(100))  # a device smaller than the screen it claims
    short = FramebufferBoard({"framebuffer": fb})
    assert not short.ok() and "holds 100 bytes" in short.last_error
    make_standin(str(tmp_path), 100, 50, 32)
    board = FramebufferBoard({"framebuffer": fb})
    with pytest.raises(BoardLinkError, match="page is 64x16, the region is 100x50"):
        board.show(Image.new("RGB", (64, 16)))
    make_standin(str(tmp_path), 80, 40, 16)  # another screen plugged in
    with pytest.raises(BoardLinkError, match="screen changed from 100x50 at 32 bpp to 80x40"):
        board.show(Image.new("RGB", (100, 50)))
    board.show(Image.new("RGB", (80, 40), (0, 0, 255)))  # reopened at its new size
    assert board.ok() and (board.width, board.height) == (80, 40)
    with pytest.raises(ValueError, match=r"\[x, y, width, height\]"):
        FramebufferBoard({"framebuffer": {**fb, "region": [0, 0, 10]}})


# --- pages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(192, 96), (1920, 1080)])
def test_text_scales_with_the_region_and_fits(size) -> None:
    layout = fit_text(VIETNAMESE, STYLE.bold, size[0] - 10, size[1] - 20)
    total = layout.line_h * len(layout.lines) + layout.gap * (len(layout.lines) - 1)
    assert total <= size[1] - 20
    assert all(layout.font.getlength(line) <= size[0] - 10 for line in layout.lines)
    assert " ".join(layout.lines) == VIETNAMESE, "every word shown, in order"
    assert layout.font.size >= size[1] // 12, "as large as the region allows"


def test_vietnamese_page_matches_golden_at_led_wall_and_lcd_sizes() -> None:
    for size in ((192, 96), (480, 270)):
        page = render_page(Page(VIETNAMESE), size, NOW, STYLE)
        assert page.mode == "RGB" and page.size == size
        assert_golden(page, f"fb_text_{size[0]}x{size[1]}")


def test_priority_colours_are_unmistakable() -> None:
    pages = {p: render_page(Page("Mất điện từ 8h", p), (320, 180), NOW, STYLE)
             for p in ("normal", "priority", "emergency")}
    for priority, page in pages.items():
        assert page.getpixel((160, 170)) == PALETTES[priority].background
    assert pages["emergency"].getpixel((1, 100)) == PALETTES["emergency"].frame
    assert_golden(pages["emergency"], "fb_emergency_320x180")


def test_image_beside_text_and_image_alone_match_golden() -> None:
    photo = picture()
    beside = render_page(Page("Lịch tiêm chủng thứ Bảy", "normal", "beside", photo),
                         (480, 270), NOW, STYLE)
    alone = render_page(Page("Ảnh", "normal", "image", photo), (480, 270), NOW, STYLE)
    assert beside.getpixel((110, 210)) == (40, 150, 60), "the field, left of the text"
    assert_golden(beside, "fb_beside_480x270")
    assert_golden(alone, "fb_image_480x270")


# --- images --------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@functools.cache
def bomb_png() -> bytes:
    """16000x16000 of zeros: ~260 KB of PNG, 768 MB as RGB."""
    return encoded(Image.new("1", (16000, 16000)), "PNG")


def test_decode_fits_the_region_and_refuses_hostile_files(tmp_path) -> None:
    good = tmp_path / "photo.jpg"
    good.write_bytes(encoded(picture((1600, 1200)), "JPEG", quality=90))
    img = decode(str(good), 12_000_000, (320, 180))
    assert img.mode == "RGB" and img.width <= 320 and img.height <= 180
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(MediaError) as refused:
        decode(str(bomb), 12_000_000, (320, 180))
    assert refused.value.reason == "bad_image" and "decompression bomb" in refused.value.message
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(MediaError, match="cannot decode"):
        decode(str(cut), 12_000_000, (320, 180))
    gif = tmp_path / "anim.gif"
    gif.write_bytes(encoded(picture(), "GIF"))
    with pytest.raises(MediaError, match="GIF image: only PNG or JPEG"):
        decode(str(gif), 12_000_000, (320, 180))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(MediaError, match="cannot decode"):
        decode(str(text), 12_000_000, (320, 180))


# --- the technician's preview --------------------------------------------------------------


def test_board_preview_renders_the_pages_of_a_page_board(tmp_path, capsys) -> None:
    from agent import cli

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "device: {id: dev-1}\n"
        f"paths: {{state_dir: {tmp_path}/state, cache_dir: {tmp_path}/cache}}\n"
        "board:\n  driver: framebuffer\n"
        "  framebuffer: {region: [0, 0, 320, 180], title: UBND xã Phú Túc}\n",
        encoding="utf-8")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encoded(picture((800, 600)), "JPEG"))
    out = tmp_path / "page.png"
    assert cli.main(["board-preview", "Lũ trên sông Ba", "--config", str(cfg), "--priority",
                     "emergency", "--image", str(photo), "--out", str(out)]) == 0
    with Image.open(out) as page:
        assert page.size == (320, 180)
        assert page.convert("RGB").getpixel((160, 175)) == PALETTES["emergency"].background
    doc = tmp_path / "doc.json"
    doc.write_text('{"args": {"messages": [{"id": "a", "text": "Tin một"}, '
                   '{"id": "b", "text": "Tin hai", "layout": "text"}]}}', encoding="utf-8")
    assert cli.main(["board-preview", "--document", str(doc), "--config", str(cfg),
                     "--out", str(tmp_path / "doc.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("doc-*.png")) == ["doc-1.png", "doc-2.png"]
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    assert cli.main(["board-preview", "x", "--config", str(cfg), "--image", str(bomb),
                     "--out", str(tmp_path / "bomb-page.png")]) == 2
    assert "decompression bomb" in capsys.readouterr().err


def test_doctor_checks_the_screen_and_the_region(tmp_path) -> None:
    from agent.doctor import check_board

    fb = make_standin(str(tmp_path), 320, 180, 16)

    def finding(region, **over):
        board = {"driver": "framebuffer", "framebuffer": {**fb, "region": region, **over}}
        [found] = check_board({"board": board})
        return found

    good = finding([0, 0, 200, 100])
    assert good.level == "ok" and "320x180 at 16 bpp, pages of 200x100" in good.message
    outside = finding([200, 0, 200, 100])
    assert outside.level == "FAIL" and "does not fit the 320x180 screen" in outside.message
    gone = finding([], sysfs=str(tmp_path / "none"))
    assert gone.level == "FAIL" and "HDMI screens" in gone.fix


def test_config_refuses_a_malformed_region_with_its_position() -> None:
    from agent import config

    text = ("device: {id: dev-1}\nboard:\n  driver: framebuffer\n"
            "  framebuffer: {region: [0, 0, 4], titel: x}\n")
    with pytest.raises(config.ConfigError) as bad:
        config.parse(text, "agent.yaml")
    assert bad.value.problems == [
        "agent.yaml:4:17: board.framebuffer.region: must be [x, y, width, height] (width and "
        "height at least 8), or empty for the whole screen, not [0, 0, 4]",
        "agent.yaml:4:36: board.framebuffer.titel: unknown key (did you mean 'title'?)"]
    good = config.parse("device: {id: dev-1}\nboard:\n  driver: framebuffer\n"
                        "  framebuffer: {region: [0, 0, 192, 96]}\n")
    assert good["board"]["framebuffer"] == {
        "device": "/dev/fb0", "sysfs": "/sys/class/graphics/fb0", "region": [0, 0, 192, 96],
        "title": "", "max_image_pixels": 12_000_000}


def test_text_too_long_for_the_region_is_cut_inside_the_body() -> None:
    long = render_page(Page("Đường dây nóng phòng chống thiên tai " * 30), (192, 96), NOW, STYLE)
    short = render_page(Page("Họp"), (192, 96), NOW, STYLE)
    strip = (0, 0, 192, 12)
    assert long.crop(strip).tobytes() == short.crop(strip).tobytes(), "the strip untouched"
    bottom = long.crop((0, 94, 192, 96))
    assert bottom.getcolors() == [(192 * 2, PALETTES["normal"].background)], "nothing below"
