"""Full-colour pages for page boards (an LCD or an LED wall over HDMI), drawn with Pillow.

A page is the board's whole region: a strip at the top with the commune's name and the date
and time, and under it the body — the text alone, an image beside the text, or the image
alone. Everything scales with the region, from a 192×96 LED wall to a 1920×1080 LCD: the
strip is a tenth of the height, the text the largest size at which its wrapped lines fit the
body (the tallest and deepest Vietnamese glyphs, ``Ệ`` and ``ỵ``, included in each line's
height), anti-aliased (a screen has grey levels, unlike an LED matrix).

Colours tell the priority at a glance: white on navy for normal content, black on amber for
``priority``, and for an emergency white on red inside a yellow frame with a yellow strip
that says ``KHẨN CẤP`` (emergency) where the commune's name stands otherwise.

Pure: no I/O but font files, no clock (the caller passes the local time), no threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from agent.args import PAGE_LAYOUTS
from agent.board.render import DEJAVU_SANS, normalize_text

DEJAVU_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
LAYOUTS = PAGE_LAYOUTS
_PROBE = "ỆỖẶẤỸÁÉÝĐ|gjpqyỵ"  # the glyphs that reach highest and lowest in Vietnamese
WEEKDAYS = ("Thứ Hai", "Thứ Ba", "Thứ Tư", "Thứ Năm", "Thứ Sáu", "Thứ Bảy", "Chủ Nhật")
EMERGENCY_HEADING = "KHẨN CẤP"
MIN_FONT = 6
_FITTED_LOCK = threading.Lock()
NARROW = 480  # regions narrower than this show the time and the day only
LINE_GAP = 0.12  # of the line height, between wrapped lines


@dataclass(frozen=True)
class Palette:
    background: tuple[int, int, int]
    text: tuple[int, int, int]
    strip: tuple[int, int, int]
    strip_text: tuple[int, int, int]
    frame: tuple[int, int, int] | None = None  # a border round the body (emergency)


PALETTES = {
    "normal": Palette((11, 37, 69), (255, 255, 255), (19, 49, 92), (238, 244, 237)),
    "priority": Palette((242, 169, 0), (0, 0, 0), (122, 78, 0), (255, 255, 255)),
    "emergency": Palette((193, 18, 31), (255, 255, 255), (255, 214, 10), (0, 0, 0),
                         frame=(255, 214, 10)),
}


@dataclass(frozen=True, eq=False)
class Page:
    """What one page shows. ``layout``: ``text``, ``beside`` (the image left of the text, or
    above it on a portrait region) or ``image`` (the image alone); without an image every
    layout is ``text``."""

    text: str
    priority: str = "normal"
    layout: str = "text"
    image: Image.Image | None = None


@dataclass(frozen=True)
class PageStyle:
    """``title``: the commune's name (``board.framebuffer.title``); ``font``/``bold``: font
    files for the strip and the body (DejaVu Sans by default: it has every Vietnamese
    glyph)."""

    title: str = ""
    font: str = DEJAVU_SANS
    bold: str = DEJAVU_BOLD


def render_page(page: Page, size: tuple[int, int], now: datetime,
                style: PageStyle | None = None) -> Image.Image:
    """The page as an RGB image of ``size``; ``now``: the local time shown in the strip."""
    style = style or PageStyle()
    width, height = size
    colours = PALETTES.get(page.priority, PALETTES["normal"])
    canvas = Image.new("RGB", size, colours.background)
    draw = ImageDraw.Draw(canvas)
    strip_h = max(12, round(height / 10))
    _strip(draw, page.priority, (width, strip_h), now, style, colours)
    pad = max(2, round(min(width, height) / 40))
    body = (pad, strip_h + pad, width - pad, height - pad)
    if colours.frame is not None:
        border = max(2, round(min(width, height) / 60))
        draw.rectangle((0, strip_h, width - 1, height - 1), outline=colours.frame, width=border)
        body = (body[0] + border, body[1] + border, body[2] - border, body[3] - border)
    text = normalize_text(page.text)
    layout = page.layout if page.image is not None else "text"
    if layout == "image":
        _paste_fitted(canvas, page.image, body)
    elif layout == "beside":
        image_box, text_box = _split(body, pad)
        _paste_fitted(canvas, page.image, image_box)
        _text(draw, text, text_box, style.bold, colours.text)
    else:
        _text(draw, text, body, style.bold, colours.text)
    return canvas


def _strip(draw: ImageDraw.ImageDraw, priority: str, size: tuple[int, int], now: datetime,
           style: PageStyle, colours: Palette) -> None:
    width, strip_h = size
    draw.rectangle((0, 0, width - 1, strip_h - 1), fill=colours.strip)
    clock = f"{now:%H:%M} {WEEKDAYS[now.weekday()]} {now:%d/%m/%Y}"
    if width < NARROW:
        clock = f"{now:%H:%M} {now:%d/%m}"
    left = EMERGENCY_HEADING if priority == "emergency" else normalize_text(style.title)
    font_path = style.bold if priority == "emergency" else style.font
    inner = max(1, strip_h - 2 * max(1, strip_h // 8))
    font, y = _font_for_height(font_path, inner, strip_h)
    margin = max(2, strip_h // 3)
    clock_w = font.getlength(clock)
    if clock_w + 2 * margin > width:  # a narrow LED wall: the time alone
        clock = f"{now:%H:%M}"
        clock_w = font.getlength(clock)
    draw.text((width - margin - clock_w, y), clock, font=font, fill=colours.strip_text)
    room = width - clock_w - 3 * margin
    if left and room > 0:
        draw.text((margin, y), _cut(left, font, room), font=font, fill=colours.strip_text)


def _cut(text: str, font: ImageFont.FreeTypeFont, room: float) -> str:
    """``text``, shortened with an ellipsis to fit ``room`` pixels."""
    if font.getlength(text) <= room:
        return text
    while text and font.getlength(text + "…") > room:
        text = text[:-1]
    return text + "…" if text else ""


def _split(body: tuple[int, int, int, int], gap: int):
    """The image's box and the text's: side by side on a wide body, stacked on a tall one."""
    x0, y0, x1, y1 = body
    if x1 - x0 >= y1 - y0:
        cut = x0 + round((x1 - x0) * 0.45)
        return (x0, y0, cut, y1), (cut + gap, y0, x1, y1)
    cut = y0 + round((y1 - y0) * 0.5)
    return (x0, y0, x1, cut), (x0, cut + gap, x1, y1)


_FITTED: OrderedDict[tuple[int, int, int], tuple[Image.Image, Image.Image]] = OrderedDict()
_FITTED_KEEP = 2  # the same image comes back at the same size at each turn; a page is MBs


def _paste_fitted(canvas: Image.Image, image: Image.Image,
                  box: tuple[int, int, int, int]) -> None:
    """``image`` scaled to fit ``box`` (aspect kept), centred; transparency over the page."""
    w, h = box[2] - box[0], box[3] - box[1]
    if w < 1 or h < 1:
        return
    fitted = _fitted(image, w, h)
    at = (box[0] + (w - fitted.width) // 2, box[1] + (h - fitted.height) // 2)
    canvas.paste(fitted, at, fitted if fitted.mode == "RGBA" else None)


def _fitted(image: Image.Image, w: int, h: int) -> Image.Image:
    """``image`` contained in ``w`` × ``h``; the last few kept (by identity of the image)."""
    key = (id(image), w, h)
    with _FITTED_LOCK:
        held = _FITTED.get(key)
        if held is not None and held[0] is image:
            _FITTED.move_to_end(key)
            return held[1]
    if image.width * h > w * image.height:  # wider than the box: its width fills it
        size = (w, max(1, round(image.height * w / image.width)))
    else:
        size = (max(1, round(image.width * h / image.height)), h)
    fitted = image if size == image.size else image.resize(
        size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    with _FITTED_LOCK:
        _FITTED[key] = (image, fitted)
        while len(_FITTED) > _FITTED_KEEP:
            _FITTED.popitem(last=False)
    return fitted


def _text(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], font_path: str,
          colour: tuple[int, int, int]) -> None:
    w, h = box[2] - box[0], box[3] - box[1]
    if not text or w < 4 or h < 4:
        return
    layout = fit_text(text, font_path, w, h)
    lines = list(layout.lines)
    room = max(1, (h + layout.gap) // (layout.line_h + layout.gap))
    if len(lines) > room:  # too long even at the smallest size: cut, and say so
        lines = lines[:room]
        lines[-1] = _cut(lines[-1] + "…", layout.font, w)
    total = layout.line_h * len(lines) + layout.gap * (len(lines) - 1)
    y = box[1] + (h - total) // 2
    for line in lines:
        line_w = layout.font.getlength(line)
        draw.text((box[0] + (w - line_w) / 2, y + layout.offset), line, font=layout.font,
                  fill=colour)
        y += layout.line_h + layout.gap


@dataclass(frozen=True)
class TextLayout:
    font: ImageFont.FreeTypeFont
    lines: tuple[str, ...]
    line_h: int  # the Vietnamese extent of one line
    offset: int  # where to draw in a line so that extent starts at its top
    gap: int


@lru_cache(maxsize=8)  # each layout holds a font: ~0.4 MB at large sizes
def fit_text(text: str, font_path: str, width: int, height: int) -> TextLayout:
    """The largest size at which ``text``, wrapped at spaces (a word wider than ``width``
    broken where it must), fits ``width`` × ``height``; bisection over the font size."""
    lo, hi = MIN_FONT, max(MIN_FONT, height)
    best = _wrap(text, font_path, lo, width)
    while lo <= hi:
        mid = (lo + hi) // 2
        layout = _wrap(text, font_path, mid, width)
        total = layout.line_h * len(layout.lines) + layout.gap * (len(layout.lines) - 1)
        if total <= height and all(layout.font.getlength(s) <= width for s in layout.lines):
            best, lo = layout, mid + 1
        else:
            hi = mid - 1
    return best


def _wrap(text: str, font_path: str, size: int, width: int) -> TextLayout:
    font = ImageFont.truetype(font_path, size)  # not cached: the bisection tries many sizes
    _, top, _, bottom = font.getbbox(_PROBE)
    line_h = int(bottom - top)
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:  # an overlong word
            cut = len(current) - 1
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    return TextLayout(font, tuple(lines), line_h, -int(top), round(line_h * LINE_GAP))


@lru_cache(maxsize=8)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@lru_cache(maxsize=16)
def _font_for_height(path: str, inner: int, strip_h: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """The largest font whose Vietnamese extent fits ``inner`` pixels, and the y that centres
    it in a strip ``strip_h`` high."""
    for size in range(max(MIN_FONT, inner * 2), MIN_FONT - 1, -1):
        font = _font(path, size)
        _, top, _, bottom = font.getbbox(_PROBE)
        if bottom - top <= inner or size == MIN_FONT:
            return font, int(-top + (strip_h - (bottom - top)) // 2)
    raise AssertionError("unreachable")
