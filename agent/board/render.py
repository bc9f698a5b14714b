"""Pure rendering of board text with Pillow: fonts, sizing, static and scrolling frames.

Nothing here touches hardware, threads or the clock: a caller asks for the frame at an
elapsed time (``TextRender.frame_at(elapsed_s)``) and pushes it to a board driver. Frames are
1-bit images (mode ``"1"``), what LED matrices show.

Vietnamese text carries stacked diacritics (``Ệ``, ``Ỗ``, ``Ặ``) above capitals and a dot below
(``ỵ``), so the font is sized so that the *tallest and deepest* Vietnamese glyphs fit in the
board height, not merely the Latin cap height. On 16-pixel boards GNU Unifont (a pixel font
whose 16-px cells hold these stacked marks) is used when installed: an outline font
thresholded to 16 px loses the marks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import time as dtime
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

DEJAVU_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
UNIFONT_CANDIDATES = (
    "/usr/share/fonts/opentype/unifont/unifont.otf",
    "/usr/share/fonts/truetype/unifont/unifont.ttf",
)
UNIFONT_CELL = 16  # Unifont glyphs are drawn on a 16-pixel grid: only multiples stay crisp

# Glyphs that reach highest and lowest in Vietnamese text; the font must fit them all.
_PROBE = "ỆỖẶẤỸÁÉÝĐ|gjpqyỵ"

DEFAULT_SCROLL_SPEED = 24.0  # px/s: readable on a 64-px board at a walking distance
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC-normalise, drop control characters and fold runs of white space into one space.

    NFC matters: a decomposed ``e`` + U+0302 + U+0323 would otherwise be drawn as separate,
    possibly overlapping, marks by fonts without mark positioning.
    """
    text = unicodedata.normalize("NFC", text)
    text = _SPACES.sub(" ", text)
    return _CONTROL.sub("", text).strip()


# --- fonts -------------------------------------------------------------------------------


def find_unifont() -> str | None:
    for path in UNIFONT_CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def resolve_font_path(font: str | None, height: int) -> str:
    """The font file to use: ``font`` when given (path), else Unifont for boards whose height
    is exactly 16 px (its native cell), else DejaVu Sans."""
    if font:
        return font
    if height == UNIFONT_CELL:
        unifont = find_unifont()
        if unifont:
            return unifont
    return DEJAVU_SANS


def _is_unifont(path: str) -> bool:
    return "unifont" in Path(path).name.lower()


@dataclass(frozen=True)
class FittedFont:
    font: ImageFont.FreeTypeFont
    size: int
    y: int  # where to draw (the text origin) so the probe glyphs sit centred in the height


@lru_cache(maxsize=32)
def fit_font(font_path: str, height: int, font_size: int | None = None) -> FittedFont:
    """The largest font size whose Vietnamese glyph extent fits ``height`` (or ``font_size``
    when given), and the vertical offset that centres that extent."""
    if font_size:
        return _fitted(font_path, font_size, height)
    sizes = range(max(height * 2, 8), 3, -1)
    if _is_unifont(font_path) and height >= UNIFONT_CELL:
        sizes = [UNIFONT_CELL * k for k in range(height // UNIFONT_CELL, 0, -1)]
    for size in sizes:
        fitted = _fitted(font_path, size, height)
        top, bottom = _extent(fitted.font)
        if bottom - top <= height:
            return fitted
    return _fitted(font_path, 4, height)


def _fitted(font_path: str, size: int, height: int) -> FittedFont:
    font = ImageFont.truetype(font_path, size)
    top, bottom = _extent(font)
    return FittedFont(font, size, -top + (height - (bottom - top)) // 2)


def _extent(font: ImageFont.FreeTypeFont) -> tuple[int, int]:
    _, top, _, bottom = font.getbbox(_PROBE)
    return int(top), int(bottom)


# --- rendering ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderConfig:
    """Board geometry and text style, usually built from the ``board:`` config section."""

    width: int = 64
    height: int = 16
    font: str | None = None
    font_size: int | None = None
    scroll_speed_px_s: float = DEFAULT_SCROLL_SPEED
    scroll_gap_px: int | None = None  # blank columns between loops; None: the board width

    @classmethod
    def from_options(cls, options: dict) -> RenderConfig:
        return cls(
            width=int(options.get("width", 64)),
            height=int(options.get("height", 16)),
            font=options.get("font") or None,
            font_size=options.get("font_size") or None,
            scroll_speed_px_s=float(options.get("scroll_speed_px_s", DEFAULT_SCROLL_SPEED)),
            scroll_gap_px=options.get("scroll_gap_px"),
        )

    @property
    def gap(self) -> int:
        return self.width if self.scroll_gap_px is None else int(self.scroll_gap_px)


def render_strip(text: str, cfg: RenderConfig) -> Image.Image:
    """The whole text drawn on one 1-bit strip ``cfg.height`` pixels high (at least 1 wide)."""
    path = resolve_font_path(cfg.font, cfg.height)
    fitted = fit_font(path, cfg.height, cfg.font_size)
    left, _, right, _ = fitted.font.getbbox(text) if text else (0, 0, 0, 0)
    width = max(1, math.ceil(max(right, fitted.font.getlength(text)) - min(left, 0)))
    strip = Image.new("1", (width, cfg.height), 0)
    draw = ImageDraw.Draw(strip)
    draw.fontmode = "1"  # no anti-aliasing: an LED is on or off, grey edges become noise
    draw.text((-min(left, 0), fitted.y), text, font=fitted.font, fill=255)
    return strip


class TextRender:
    """One message laid out for one board: a static frame, or scrolling frames by time.

    ``effect``: ``static`` shows the text centred when it fits (and scrolls anyway when it
    does not: cut-off text is worse than moving text); ``scroll`` always scrolls; ``auto``
    behaves as ``static``.
    """

    def __init__(self, text: str, cfg: RenderConfig, effect: str = "auto") -> None:
        self.cfg = cfg
        self.text = normalize_text(text)
        self.strip = render_strip(self.text, cfg)
        self.text_width = self.strip.width if self.text else 0
        self.scrolling = effect == "scroll" or self.text_width > cfg.width
        self.period_px = self.text_width + cfg.gap
        self._static = None if self.scrolling else self._centred()

    @property
    def period_s(self) -> float | None:
        """Seconds per scroll loop, None for a static frame."""
        if not self.scrolling:
            return None
        return self.period_px / self.cfg.scroll_speed_px_s

    def offset_at(self, elapsed_s: float) -> int:
        """Scroll offset in whole pixels (0 = board blank, text about to enter from the
        right), looping every ``period_px``. Rounded to 1e-6 first so that 0.29 s × 100 px/s
        is 29 px, not 28."""
        travelled = round(max(0.0, elapsed_s) * self.cfg.scroll_speed_px_s, 6)
        return math.floor(travelled) % self.period_px

    def frame_at(self, elapsed_s: float) -> Image.Image:
        """The frame to show ``elapsed_s`` seconds after the message appeared."""
        if self._static is not None:
            return self._static.copy()
        return self._window(self.offset_at(elapsed_s))

    def next_change_s(self, elapsed_s: float) -> float | None:
        """Elapsed time at which the frame next changes (None: never, a static frame)."""
        if not self.scrolling:
            return None
        step = 1.0 / self.cfg.scroll_speed_px_s
        return (math.floor(round(elapsed_s / step, 6)) + 1) * step

    def _centred(self) -> Image.Image:
        frame = Image.new("1", (self.cfg.width, self.cfg.height), 0)
        frame.paste(self.strip, ((self.cfg.width - self.text_width) // 2, 0))
        return frame

    def _window(self, offset: int) -> Image.Image:
        """Board-sized view of the endless ribbon [gap][text][gap][text]... at ``offset``."""
        frame = Image.new("1", (self.cfg.width, self.cfg.height), 0)
        x = self.cfg.gap - offset
        while x < self.cfg.width:
            if x + self.text_width > 0:
                frame.paste(self.strip, (x, 0))
            x += self.period_px
        return frame


def render_or_fallback(text: str, cfg: RenderConfig, effect: str) -> TextRender | None:
    """``TextRender`` with the configured font; a font that cannot be read falls back to the
    default (logged); None when no font works (the board stays blank)."""
    try:
        return TextRender(text, cfg, effect)
    except OSError as exc:  # a configured font that cannot be read: fall back
        log.error("board font %s unusable (%s); using the default", cfg.font, exc)
    try:
        return TextRender(text, dataclasses.replace(cfg, font=None), effect)
    except OSError:
        log.exception("no usable font: the board stays blank")
        return None


def to_1bit(image: Image.Image, threshold: int = 128) -> Image.Image:
    """Any image to mode ``"1"`` by a plain threshold (no dithering: LEDs flicker on dots)."""
    if image.mode == "1":
        return image
    grey = image.convert("L")
    return grey.point(lambda v: 255 if v >= threshold else 0).convert("1", dither=Image.Dither.NONE)


# --- brightness by time of day ------------------------------------------------------------

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def parse_brightness_schedule(schedule: dict) -> tuple[list[tuple[int, int]], list[str]]:
    """``{"HH:MM": level 0-255}`` → sorted ``[(minute_of_day, level)]`` and a list of errors.

    Each entry holds from its time until the next one; the last one holds over midnight
    until the first, so ``{"06:00": 200, "19:00": 60}`` is bright by day and dim by night.
    """
    errors: list[str] = []
    points: list[tuple[int, int]] = []
    if not isinstance(schedule, dict):
        return [], ['must be a mapping of "HH:MM" to a level 0-255']
    for key, level in schedule.items():
        m = _HHMM.match(str(key))
        if not m:
            errors.append(f'{key}: must be a time "HH:MM" (00:00-23:59)')
            continue
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 255:
            errors.append(f"{key}: level must be an integer 0-255, not {level!r}")
            continue
        points.append((int(m.group(1)) * 60 + int(m.group(2)), level))
    return sorted(points), errors


def brightness_at(points: list[tuple[int, int]], at: dtime, default: int = 255) -> int:
    """The level in force at local time ``at`` (``default`` when the schedule is empty)."""
    if not points:
        return default
    minute = at.hour * 60 + at.minute
    level = points[-1][1]  # before the first entry of the day: the last one, from yesterday
    for start, value in points:
        if start <= minute:
            level = value
    return level
