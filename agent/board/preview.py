"""Preview what a board would show, as an image file (``ttcs-agent board-preview``).

Technicians and district staff use it to check, before sending, that a message is legible on
a board's geometry: ``ttcs-agent board-preview "Bão số 3" --out preview.gif``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from agent.board.render import RenderConfig, TextRender

MAX_GIF_FRAMES = 2000


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

    Writes a PNG when the text stands still, else an animated GIF of the scroll (one full loop
    when ``seconds`` is None; ``out_path``'s suffix is replaced by ``.gif`` when needed). Each
    LED becomes a ``scale``×``scale`` square, lit amber on black, so the result looks like the
    board. ``fps`` defaults to one frame per scrolled pixel (capped at 50, GIF's practical
    limit). Returns ``{"path", "animated", "frames", "width", "height", "text_width"}``.
    """
    cfg = RenderConfig.from_options(config_board_section)
    render = TextRender(text, cfg, effect)
    out = Path(out_path)
    if not render.scrolling:
        image = _led_look(render.frame_at(0), scale)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, format="PNG")
        return _result(out, False, 1, cfg, render)
    fps = fps or min(50.0, cfg.scroll_speed_px_s)
    duration = seconds if seconds is not None else render.period_s
    count = max(1, min(MAX_GIF_FRAMES, round(duration * fps)))
    frames = [_led_look(render.frame_at(i / fps), scale) for i in range(count)]
    if out.suffix.lower() != ".gif":
        out = out.with_suffix(".gif")
    out.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        out,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=0,
        optimize=False,
    )
    return _result(out, True, count, cfg, render)


def _led_look(frame: Image.Image, scale: int) -> Image.Image:
    big = frame.convert("L").resize(
        (frame.width * scale, frame.height * scale), Image.Resampling.NEAREST
    )
    black = Image.new("RGB", big.size, (0, 0, 0))
    amber = Image.new("RGB", big.size, (255, 176, 0))
    return Image.composite(amber, black, big).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)


def _result(out: Path, animated: bool, frames: int, cfg: RenderConfig, render: TextRender) -> dict:
    return {
        "path": str(out),
        "animated": animated,
        "frames": frames,
        "width": cfg.width,
        "height": cfg.height,
        "text_width": render.text_width,
    }
