"""Board backends: the interface the core drives, and the ``none`` and ``image`` boards.

Three kinds of board exist. A *pixel* board (``kind = "pixel"``: MAX7219 matrices, the image
board) takes whole 1-bit frames through :meth:`BoardDriver.show`; the core renders text with
``agent.board.render`` and pushes a new frame each time the scroll moves. A *text* board
(``kind = "text"``: a serial LED sign) draws and scrolls text itself and takes
:meth:`BoardDriver.show_text` once per message.

Link failures (a cable pulled, a USB adapter gone) raise :class:`BoardLinkError`, which the
core turns into a ``board_link`` alert; the next ``show``/``show_text`` tries to reconnect.
"""

from __future__ import annotations

import io
import logging
import time
from abc import ABC

from PIL import Image

from drivers import DriverError
from drivers.fsutil import atomic_write

log = logging.getLogger(__name__)


class BoardLinkError(DriverError):
    """The board cannot be reached now; the driver will try to reconnect on the next show."""


class BoardDriver(ABC):  # noqa: B024 - show or show_text is required, by kind
    """Base of every board backend. ``options`` is the validated ``board:`` config section.

    A pixel board implements :meth:`show`; a text board implements :meth:`show_text`. The other
    one raises ``NotImplementedError`` so a core that confuses them fails loudly in tests.

    Every board has, and the core reads directly:

    - ``last_error``: why the link is down (None while it works or the board cannot tell);
    - ``last_sent``: the text as a text board last got it (None for a pixel board);
    - ``transliterated``: whether ``last_sent`` lost characters or marks of the text given
      (a sign without Vietnamese glyphs); always False for a pixel board;
    - ``written_sha256``: a page board, the sha256 of the last page as written to the screen
      (in its own pixel format, as :meth:`read_back` hashes it); None for the others.
    """

    name = "abstract"
    kind = "pixel"

    def __init__(self, options: dict) -> None:
        self.options = dict(options)
        self.width = int(options.get("width", 64))
        self.height = int(options.get("height", 16))
        self.brightness = int(options.get("brightness", 255))
        self.last_error: str | None = None
        self.last_sent: str | None = None
        self.transliterated = False
        self.written_sha256: str | None = None
        self._closed = False

    def show(self, frame: Image.Image) -> None:
        """Display a ``width``×``height`` frame (mode ``"1"``: a pixel is on or off)."""
        raise NotImplementedError(f"{self.name} board shows text, not frames")

    def show_text(self, text: str, effect: str = "scroll") -> None:
        """Display ``text`` with ``effect`` (scroll | static) on a sign that renders it."""
        raise NotImplementedError(f"{self.name} board shows frames, not text")

    def read_back(self):
        """What the screen holds now (a page board: an object with ``data``, ``sha256``,
        ``width``, ``height``, ``format`` and ``image()``), or None for a board that cannot
        tell (LED matrices and signs take data and answer nothing)."""
        return None

    def set_brightness(self, level: int) -> None:
        """0 (darkest the board allows) to 255 (full)."""
        if not 0 <= level <= 255:
            raise ValueError(f"brightness must be 0-255, not {level}")
        self.brightness = level

    def ok(self) -> bool:
        """Whether the link to the board works as far as the driver knows (health)."""
        return not self._closed

    def close(self) -> None:
        """Release the board. Idempotent."""
        self._closed = True

    def __enter__(self) -> BoardDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_frame(self, frame: Image.Image) -> Image.Image:
        if frame.size != (self.width, self.height):
            raise ValueError(
                f"frame is {frame.size[0]}x{frame.size[1]}, board is {self.width}x{self.height}"
            )
        return frame if frame.mode == "1" else frame.convert("1")


class LinkedBoard(BoardDriver):
    """A board behind a link that can be lost (SPI, serial) and is reopened by the driver."""

    def __init__(self, options: dict) -> None:
        super().__init__(options)
        self._retry_s = float(options.get("reconnect_interval_s", 5.0))
        self._last_attempt = -1e9

    def _connect(self) -> bool:
        """Open the link; record the failure in ``last_error`` and return False."""
        raise NotImplementedError

    def _reconnect(self) -> bool:
        """Try to reopen, at most once per ``reconnect_interval_s`` (a frame comes many times a
        second; opening a missing device that often would only fill the log)."""
        if time.monotonic() - self._last_attempt < self._retry_s:
            return False
        return self._connect()


class NoneBoard(BoardDriver):
    """No board fitted: accepts frames and text and discards them."""

    name = "none"

    def show(self, frame: Image.Image) -> None:
        pass

    def show_text(self, text: str, effect: str = "scroll") -> None:
        pass


class ImageBoard(BoardDriver):
    """Writes each frame as a PNG to ``image_path`` (atomically), for tests, demos, previews.

    Options: ``image_path`` (required), ``image_scale`` (1-16, default 1: each LED drawn as
    a square of that many pixels, easier to look at). Brightness is recorded, not applied.
    Test helpers: ``last_frame`` (the frame as given), ``frames`` (how many were shown).

    Writing on every scroll step wears an SD card; use it on a tmpfs or for tests.
    """

    name = "image"

    def __init__(self, options: dict) -> None:
        super().__init__(options)
        if not options.get("image_path"):
            raise ValueError("board.image_path is required for the image board")
        self.image_path = str(options["image_path"])
        self.scale = int(options.get("image_scale", 1))
        self.last_frame: Image.Image | None = None
        self.frames = 0
        self._link_ok = True

    def show(self, frame: Image.Image) -> None:
        frame = self._check_frame(frame)
        out = frame
        if self.scale > 1:
            out = frame.resize(
                (self.width * self.scale, self.height * self.scale), Image.Resampling.NEAREST
            )
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        try:
            atomic_write(self.image_path, buf.getvalue())
        except OSError as exc:
            self._link_ok = False
            raise BoardLinkError(f"cannot write {self.image_path}: {exc}") from exc
        self._link_ok = True
        self.last_frame = frame.copy()
        self.frames += 1

    def ok(self) -> bool:
        return self._link_ok and super().ok()
