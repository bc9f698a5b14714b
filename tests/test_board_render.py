"""Board rendering: golden images of Vietnamese text, sizing, scrolling by time, brightness."""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import time as dtime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from agent.board.render import (
    DEJAVU_SANS,
    RenderConfig,
    TextRender,
    brightness_at,
    find_unifont,
    fit_font,
    normalize_text,
    parse_brightness_schedule,
    render_strip,
    resolve_font_path,
    to_1bit,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TTCS_UPDATE_GOLDEN") == "1"
BULLETIN = "THÔNG BÁO: Bão số 3 đổ bộ — Đề nghị người dân ở trong nhà"
MARKS = "Ệỗữặ Đ"
GEOMETRIES = [(64, 16), (128, 32)]

needs_fonts = pytest.mark.skipif(
    not Path(DEJAVU_SANS).is_file() or find_unifont() is None,
    reason="golden images are drawn with DejaVu Sans and GNU Unifont",
)


def assert_golden(image: Image.Image, name: str) -> None:
    """Compare with tests/golden/NAME.png; TTCS_UPDATE_GOLDEN=1 rewrites it instead."""
    path = GOLDEN / f"{name}.png"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    expected = Image.open(path)
    assert expected.size == image.size, f"{name}: size {image.size}, golden {expected.size}"
    diff = ImageChops.difference(expected.convert("1"), image.convert("1")).getbbox()
    assert diff is None, f"{name}: differs from the golden image in box {diff}"


@needs_fonts
@pytest.mark.parametrize(("width", "height"), GEOMETRIES)
def test_bulletin_strip_matches_golden(width: int, height: int) -> None:
    strip = render_strip(BULLETIN, RenderConfig(width, height))
    assert strip.height == height and strip.mode == "1"
    assert_golden(strip, f"bulletin_{width}x{height}")


@needs_fonts
@pytest.mark.parametrize(("width", "height"), GEOMETRIES)
def test_stacked_marks_static_frame_matches_golden(width: int, height: int) -> None:
    render = TextRender(MARKS, RenderConfig(width, height), "static")
    assert not render.scrolling
    assert_golden(render.frame_at(0), f"marks_{width}x{height}")


@needs_fonts
@pytest.mark.parametrize(("width", "height"), GEOMETRIES)
def test_marks_above_and_below_are_drawn_not_clipped(width: int, height: int) -> None:
    """Ệ must light rows above and below a plain E: the circumflex and the dot survive."""
    cfg = RenderConfig(width, height)
    plain, marked = render_strip("E", cfg), render_strip("Ệ", cfg)
    plain_rows = _lit_rows(plain)
    marked_rows = _lit_rows(marked)
    assert min(marked_rows) < min(plain_rows), "no mark above the E"
    assert max(marked_rows) > max(plain_rows), "no dot below the E"
    assert min(marked_rows) >= 0 and max(marked_rows) <= height - 1


def _lit_rows(image: Image.Image) -> list[int]:
    px = image.load()
    return [y for y in range(image.height) if any(px[x, y] for x in range(image.width))]


def test_unifont_chosen_for_16_px_boards_dejavu_for_others() -> None:
    if find_unifont():
        assert "unifont" in resolve_font_path(None, 16)
    assert resolve_font_path(None, 32) == DEJAVU_SANS
    assert resolve_font_path("/x/my.ttf", 16) == "/x/my.ttf"


@pytest.mark.parametrize("height", [16, 24, 32, 48, 64])
def test_font_fits_tallest_and_deepest_vietnamese_glyphs(height: int) -> None:
    path = resolve_font_path(None, height)
    fitted = fit_font(path, height)
    _, top, _, bottom = fitted.font.getbbox("ỆỖẶẤỸgjpqyỵ")
    assert fitted.y + top >= 0 and fitted.y + bottom <= height
    assert bottom - top >= height * 0.75, "font much smaller than the board allows"


def test_decomposed_input_renders_like_composed() -> None:
    decomposed = unicodedata.normalize("NFD", BULLETIN)
    assert decomposed != BULLETIN
    assert normalize_text(decomposed) == BULLETIN
    cfg = RenderConfig(128, 32)
    a, b = render_strip(normalize_text(decomposed), cfg), render_strip(BULLETIN, cfg)
    assert a.size == b.size and ImageChops.difference(a, b).getbbox() is None


def test_normalize_strips_controls_and_folds_space() -> None:
    assert normalize_text("  Bão\x1b[31m\n\tsố 3\x00 ") == "Bão[31m số 3"


def test_short_text_static_and_centred() -> None:
    cfg = RenderConfig(128, 32)
    render = TextRender("Họp 19h", cfg)
    assert not render.scrolling and render.period_s is None and render.next_change_s(3) is None
    frame = render.frame_at(0)
    box = frame.getbbox()
    assert box is not None
    left_margin, right_margin = box[0], cfg.width - box[2]
    assert abs(left_margin - right_margin) <= 3
    assert ImageChops.difference(frame, render.frame_at(123.4)).getbbox() is None


def test_long_text_scrolls_even_if_static_asked() -> None:
    render = TextRender(BULLETIN, RenderConfig(64, 16), "static")
    assert render.scrolling and render.text_width > 64


def test_scroll_effect_scrolls_short_text() -> None:
    assert TextRender("Họp", RenderConfig(128, 32), "scroll").scrolling


@pytest.mark.parametrize(
    ("t", "dt", "speed"), [(0.5, 0.25, 24.0), (3.0, 0.5, 30.0), (7.1, 0.1, 20.0)]
)
def test_scroll_moves_speed_times_dt_pixels(t: float, dt: float, speed: float) -> None:
    cfg = RenderConfig(64, 16, scroll_speed_px_s=speed)
    render = TextRender(BULLETIN, cfg)
    shift = round(speed * dt)
    before, after = render.frame_at(t), render.frame_at(t + dt)
    assert ImageChops.difference(before, after).getbbox() is not None, "frame did not move"
    moved = before.crop((shift, 0, cfg.width, cfg.height))
    kept = after.crop((0, 0, cfg.width - shift, cfg.height))
    assert ImageChops.difference(moved, kept).getbbox() is None


def test_scroll_starts_blank_enters_from_right_and_loops() -> None:
    cfg = RenderConfig(64, 16, scroll_speed_px_s=20.0)
    render = TextRender(BULLETIN, cfg)
    assert render.frame_at(0).getbbox() is None
    entering = render.frame_at(0.5).getbbox()  # 10 px in
    assert entering is not None and entering[0] >= cfg.width - 10
    assert render.period_s == pytest.approx((render.text_width + cfg.width) / 20.0)
    for t in (0.3, 5.0, 11.05):
        a, b = render.frame_at(t), render.frame_at(t + render.period_s)
        assert ImageChops.difference(a, b).getbbox() is None


def test_offset_rounding_is_exact_for_decimal_times() -> None:
    render = TextRender(BULLETIN, RenderConfig(64, 16, scroll_speed_px_s=100.0))
    assert render.offset_at(0.29) == 29
    assert render.next_change_s(0.29) == pytest.approx(0.30)


def test_frame_sizes_and_mode() -> None:
    for w, h in [*GEOMETRIES, (192, 48)]:
        frame = TextRender(BULLETIN, RenderConfig(w, h)).frame_at(2.0)
        assert frame.size == (w, h) and frame.mode == "1"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.floats(min_value=0, max_value=1e5, allow_nan=False))
def test_any_text_renders_a_board_sized_frame(text: str, elapsed: float) -> None:
    frame = TextRender(text, RenderConfig(64, 16)).frame_at(elapsed)
    assert frame.size == (64, 16) and frame.mode == "1"


def test_to_1bit_thresholds_without_dither() -> None:
    grey = Image.new("L", (4, 1))
    grey.putdata([0, 127, 128, 255])
    assert list(to_1bit(grey).convert("L").tobytes()) == [0, 0, 255, 255]


def test_brightness_schedule_wraps_over_midnight() -> None:
    points, errors = parse_brightness_schedule({"19:00": 40, "06:00": 200, "12:00": 255})
    assert errors == []
    assert brightness_at(points, dtime(3, 0)) == 40
    assert brightness_at(points, dtime(6, 0)) == 200
    assert brightness_at(points, dtime(11, 59)) == 200
    assert brightness_at(points, dtime(18, 59)) == 255
    assert brightness_at(points, dtime(23, 0)) == 40
    assert brightness_at([], dtime(1, 0), default=90) == 90


def test_brightness_schedule_reports_every_error() -> None:
    _, errors = parse_brightness_schedule({"25:00": 10, "06:00": 300, "07:00": True, "7:00": 5})
    assert len(errors) == 4
    assert any("25:00" in e for e in errors) and any("0-255" in e for e in errors)
    assert parse_brightness_schedule([1, 2])[1]


# --- preview -------------------------------------------------------------------------------


def test_preview_static_png(tmp_path: Path) -> None:
    from agent.board.preview import preview

    result = preview(
        {"driver": "image", "width": 128, "height": 32}, "Họp 19h", str(tmp_path / "p.png")
    )
    assert result["animated"] is False and result["frames"] == 1
    image = Image.open(result["path"])
    assert image.format == "PNG" and image.size == (128 * 8, 32 * 8)
    expected = TextRender("Họp 19h", RenderConfig(128, 32)).frame_at(0)
    lit = (
        image.convert("L")
        .resize((128, 32), Image.Resampling.NEAREST)
        .point(lambda v: 255 if v else 0)
    )
    assert ImageChops.difference(lit.convert("1"), expected).getbbox() is None


def test_preview_scrolling_gif_loops_once(tmp_path: Path) -> None:
    from agent.board.preview import preview

    board = {"width": 64, "height": 16, "scroll_speed_px_s": 20}
    result = preview(board, BULLETIN, str(tmp_path / "p.gif"), scale=2)
    assert result["animated"] and result["path"] == str(tmp_path / "p.gif")
    render = TextRender(BULLETIN, RenderConfig(64, 16, scroll_speed_px_s=20))
    assert result["frames"] == round(render.period_s * 20)
    gif = Image.open(result["path"])
    assert gif.size == (128, 32)
    assert _shown_at(gif, 2000, (64, 16), result["frames"] * 50) == render.frame_at(2.0).tobytes()
    short = preview(board, BULLETIN, str(tmp_path / "s.gif"), seconds=1.5)
    assert short["frames"] == 30


def _shown_at(animation: Image.Image, ms: int, board: tuple[int, int], total_ms: int) -> bytes:
    """The 1-bit board frame on screen ``ms`` into an animated GIF or PNG preview. Pillow
    merges identical neighbouring frames, adding their durations."""
    durations = []
    for index in range(animation.n_frames):
        animation.seek(index)
        durations.append(animation.info["duration"])
    assert sum(durations) == total_ms
    animation.seek(next(i for i in range(len(durations)) if sum(durations[: i + 1]) > ms))
    lit = animation.convert("L").resize(board, Image.Resampling.NEAREST)
    return lit.point(lambda v: 255 if v else 0).convert("1").tobytes()


def test_preview_writes_exactly_the_path_asked(tmp_path: Path) -> None:
    """A scrolling text asked as b.png used to be written to b.gif: now b.png is an animated
    PNG (its first frame is what a viewer without APNG support shows), b.gif a GIF, and a
    static text asked as .gif a one-frame GIF."""
    from agent.board.preview import preview

    board = {"width": 64, "height": 16, "scroll_speed_px_s": 20}
    result = preview(board, BULLETIN, str(tmp_path / "b.png"), scale=1)
    assert result["path"] == str(tmp_path / "b.png") and result["format"] == "APNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]
    render = TextRender(BULLETIN, RenderConfig(64, 16, scroll_speed_px_s=20))
    with Image.open(tmp_path / "b.png") as png:
        assert png.format == "PNG" and png.is_animated
        shown = _shown_at(png, 2000, (64, 16), result["frames"] * 50)
        assert shown == render.frame_at(2.0).tobytes()
    still = preview(board, "Họp", str(tmp_path / "s.gif"))
    assert still["format"] == "GIF" and still["frames"] == 1
    with Image.open(tmp_path / "s.gif") as gif:
        assert gif.format == "GIF" and gif.size == (64 * 8, 16 * 8)


@pytest.mark.parametrize("out, scale, message", [
    ("b.jpg", 8, "the file name must end in .png or .gif"),
    ("b.png", 0, "scale must be 1-32 (pixels per LED), not 0"),
])
def test_preview_refuses_what_it_cannot_make(tmp_path: Path, out, scale, message) -> None:
    from agent.board.preview import PreviewError, preview

    with pytest.raises(PreviewError, match=re.escape(message)):
        preview({}, "x", str(tmp_path / out), scale=scale)
