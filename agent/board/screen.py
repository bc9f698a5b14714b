"""Pages on a page board (a screen on the framebuffer) and the proof of what it shows.

The board service asks :meth:`PageScreen.job` on the core thread for what to draw (the text,
its priority, its image, the local time for the strip) and runs the job on its driver
thread: the page is rendered (:mod:`agent.board.page`), drawn, and the region is read back
from the screen itself. The job returns a :class:`Proof` of what the screen holds — the
sha256 of the region's pixels as the framebuffer stores them, a small JPEG thumbnail, and
whether that is what was drawn — which the show record (``board`` event) carries as
``screen``: the district learns what people saw, not what was sent.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from PIL import Image

from agent.audio.media import MediaCache
from agent.board.content import Shown
from agent.board.images import BoardImages
from agent.board.page import Page, PageStyle, render_page
from drivers.board.base import BoardDriver, BoardLinkError

log = logging.getLogger(__name__)

THUMB_PX = 96  # the thumbnail's longer side
THUMB_QUALITY = 70


@dataclass(frozen=True)
class Proof:
    sha256: str
    width: int
    height: int
    format: str
    matches: bool  # the screen holds what was drawn (nothing else drew over it)
    thumb: str  # base64 JPEG, at most THUMB_PX on its longer side
    at_ms: int

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "width": self.width, "height": self.height,
                "format": self.format, "matches": self.matches, "thumb": self.thumb,
                "at": self.at_ms}


def thumbnail(image: Image.Image) -> str:
    """``image`` (already small, or scaled down here) as base64 JPEG."""
    small = image.copy()
    small.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.convert("RGB").save(buf, format="JPEG", quality=THUMB_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class PageScreen:
    """Builds page jobs for ``driver`` (kind ``page``). ``now_ms``: the core's wall clock."""

    def __init__(self, driver: BoardDriver, images: BoardImages | None, style: PageStyle,
                 tz: ZoneInfo, now_ms: Callable[[], int]) -> None:
        self.driver = driver
        self.images = images
        self.style = style
        self._tz = tz
        self._now_ms = now_ms

    def job(self, shown: Shown | None) -> Callable[[], Proof]:
        """What to run on the driver thread to show ``shown`` (None: a page with the strip
        alone, the commune's name and the time)."""
        now_ms = self._now_ms()
        local = datetime.fromtimestamp(now_ms / 1000.0, self._tz)
        text = shown.text if shown is not None else ""
        priority = shown.priority if shown is not None else "normal"
        image = shown.image if shown is not None else None
        layout = shown.layout if shown is not None else "text"

        def draw() -> Proof:
            picture = self.images.get(image["sha256"]) if image and self.images else None
            page = Page(text, priority, layout, picture)
            try:
                drawn = self._draw(page, local)
            except BoardLinkError:
                if not self.driver.ok():
                    raise
                drawn = self._draw(page, local)  # reopened at another size: once more
            return self._proof(drawn, now_ms)

        return draw

    def _draw(self, page: Page, local: datetime) -> str | None:
        image = render_page(page, (self.driver.width, self.driver.height), local, self.style)
        self.driver.show(image)
        return self.driver.written_sha256

    def _proof(self, written: str | None, now_ms: int) -> Proof:
        back = self.driver.read_back()
        if back is None:
            raise BoardLinkError(f"{self.driver.name} board cannot read its screen back")
        sha = back.sha256
        matches = written == sha
        return Proof(sha, back.width, back.height, back.format, matches,
                     thumbnail(back.thumbnail(THUMB_PX)), now_ms)


def open_screen(core, driver: BoardDriver,
                cache: MediaCache | None) -> tuple[PageScreen, BoardImages | None]:
    """The screen of a page board and its images, which come through ``cache`` (the agent's
    media cache; one is opened from the config when none is handed in)."""
    cfg = core.cfg
    fb = cfg["board"]["framebuffer"]
    own = cache is None
    if cache is None:
        from agent.audio.parts import open_cache

        try:
            cache = open_cache(cfg)
        except OSError as exc:
            log.error("board images unavailable: media cache: %s", exc)
    images = None
    if cache is not None:
        images = BoardImages(cache, max_pixels=int(fb["max_image_pixels"]),
                             size=lambda: (driver.width, driver.height), post=core.post,
                             own_cache=own)
    screen = PageScreen(driver, images, PageStyle(title=fb["title"]),
                        ZoneInfo(cfg["device"]["timezone"]), core.clock.now_ms)
    return screen, images
