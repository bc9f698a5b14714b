"""Preview what a board would show, as an image file (``ttcs-agent board-preview``).

Technicians and district staff use it to check, before sending, that a message is legible on
a board's geometry: ``ttcs-agent board-preview "Bão số 3" --out preview.gif``.

The file written is exactly the one asked for, in the format its name says:

- ``.gif``: a GIF — animated (one scroll loop) when the text scrolls, one frame when it stands;
- ``.png``: a PNG when the text stands still; when it scrolls, an animated PNG (APNG) of the
  loop. Browsers play it; a viewer without APNG support shows its first frame.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from agent.board.render import RenderConfig, TextRender

MAX_GIF_FRAMES = 2000
MAX_PIXELS = 256 * 1024 * 1024  # all frames of one preview together (memory)
MAX_SCALE = 32
FORMATS = {".png": "PNG", ".gif": "GIF"}


class PreviewError(ValueError):
    """A preview that cannot be made as asked (the message says why)."""


def preview(
    config_board_section: dict,
    text: str,
    out_path: str,
    seconds: float | None = None,
    *,
    effect: str = "auto",
    scale: int = 8,
    fps: float | None = None,
) -> dict:
    """Render ``text`` as the board configured by ``config_board_section`` would show it.

    Writes ``out_path`` (``.png`` or ``.gif``, see the module's doc): one frame when the text
    stands still, else the scroll (one full loop when ``seconds`` is None). Each LED becomes a
    ``scale``×``scale`` square, lit amber on black, so the result looks like the board. ``fps``
    defaults to one frame per scrolled pixel (capped at 50, GIF's practical limit). Returns
    ``{"path", "format", "animated", "frames", "width", "height", "text_width"}``. Raises
    :class:`PreviewError` for an unknown suffix, a bad scale or a font that cannot be loaded.
    """
    out = Path(out_path)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise PreviewError(f"{out_path}: the file name must end in .png or .gif")
    if not 1 <= scale <= MAX_SCALE:
        raise PreviewError(f"scale must be 1-{MAX_SCALE} (pixels per LED), not {scale}")
    cfg = RenderConfig.from_options(config_board_section)
    try:
        render = TextRender(text, cfg, effect)
    except OSError as e:  # Pillow: the font file is missing or not a font
        raise PreviewError(f"cannot load the board font {cfg.font or '(default)'}: {e}") from e
    if not render.scrolling:
        frames = [_led_look(render.frame_at(0), scale)]
    else:
        fps = fps or min(50.0, cfg.scroll_speed_px_s)
        duration = seconds if seconds is not None else render.period_s
        per_frame = cfg.width * cfg.height * scale * scale
        count = max(1, min(MAX_GIF_FRAMES, MAX_PIXELS // per_frame, round(duration * fps)))
        frames = [_led_look(render.frame_at(i / fps), scale) for i in range(count)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(frames) == 1:
        frames[0].save(out, format=fmt)
    else:
        frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0, optimize=False)
    return {
        "path": str(out),
        "format": "APNG" if fmt == "PNG" and len(frames) > 1 else fmt,
        "animated": len(frames) > 1,
        "frames": len(frames),
        "width": cfg.width,
        "height": cfg.height,
        "text_width": render.text_width,
    }


def _led_look(frame: Image.Image, scale: int) -> Image.Image:
    big = frame.convert("L").resize(
        (frame.width * scale, frame.height * scale), Image.Resampling.NEAREST
    )
    black = Image.new("RGB", big.size, (0, 0, 0))
    amber = Image.new("RGB", big.size, (255, 176, 0))
    return Image.composite(amber, black, big).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)


# --- page boards (board.driver: framebuffer) -------------------------------------------------

DEFAULT_SCREEN = (1920, 1080)  # when neither a region nor the screen's sysfs tells the size


def page_size(board: dict) -> tuple[int, int]:
    """The size pages are drawn at: ``board.framebuffer.region``'s, else the screen's (from its
    sysfs folder, when this machine has it), else 1920×1080."""
    from drivers.board.base import BoardLinkError
    from drivers.board.framebuffer import read_geometry

    fb = board["framebuffer"]
    if fb["region"]:
        return int(fb["region"][2]), int(fb["region"][3])
    try:
        g = read_geometry(fb["sysfs"])
    except BoardLinkError:
        return DEFAULT_SCREEN
    return g.width, g.height


def preview_pages(board: dict, pages: list[dict], out_path: str, *, tz: str,
                  now_ms: int, cache_dir: str | None = None) -> list[str]:
    """Render ``pages`` (each ``{"text", "priority"?, "layout"?, "image"?: {"sha256"} or
    "image_file"?: a local file}``) as the page board configured in ``board`` shows them: one
    PNG per page, ``out_path`` itself for one page, ``STEM-N.png`` beside it for several.
    Images come from a local file or the media cache folder (``cache_dir``/sha256) and are
    decoded within ``board.framebuffer.max_image_pixels`` as on the device. Returns the
    files written. Raises :class:`PreviewError` (an image refused, a bad file name)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from agent.audio.hosts import MediaError
    from agent.board.images import decode
    from agent.board.page import Page, PageStyle, render_page

    out = Path(out_path)
    if out.suffix.lower() != ".png":
        raise PreviewError(f"{out_path}: a page board preview is a PNG: the name must end in "
                           ".png")
    fb = board["framebuffer"]
    size = page_size(board)
    now = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(tz))
    written = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, spec in enumerate(pages, 1):
        image_file = spec.get("image_file")
        if image_file is None and spec.get("image") and cache_dir:
            candidate = Path(cache_dir) / str(spec["image"]["sha256"]).lower()
            image_file = str(candidate) if candidate.is_file() else None
        picture = None
        if image_file is not None:
            try:
                picture = decode(image_file, int(fb["max_image_pixels"]), size)
            except MediaError as e:
                raise PreviewError(f"page {n}: image {image_file} refused: {e.message}") from e
        page = Page(spec["text"], spec.get("priority", "normal"),
                    spec.get("layout", "beside" if picture is not None else "text"), picture)
        path = out if len(pages) == 1 else out.with_name(f"{out.stem}-{n}{out.suffix}")
        render_page(page, size, now, PageStyle(title=fb["title"])).save(path, format="PNG")
        written.append(str(path))
    return written
