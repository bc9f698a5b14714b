"""ttcs-agent: the daemon and the technician's on-device tool."""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent import __version__, config
from agent.pidfile import pid_alive
from agent.status import render_status

__all__ = ["main", "render_status"]

DESCRIPTION = ("The agent of a commune loudspeaker cabinet and LED board: runs the daemon,\n"
               "and helps a technician check and watch it.")
EPILOG = f"""examples:
  ttcs-agent check-config --config /etc/ttcs-agent/agent.yaml
  ttcs-agent --config /etc/ttcs-agent/agent.yaml status
  ttcs-agent board-preview "Thông báo" --out preview.gif

--config may come before or after the command; without it the agent reads $TTCS_AGENT_CONFIG,
else {config.DEFAULT_CONFIG_PATH}."""
CONFIG_HELP = f"config file (default: $TTCS_AGENT_CONFIG, else {config.DEFAULT_CONFIG_PATH})"
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttcs-agent", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, description=helptext)
        # Also after the command; SUPPRESS keeps a --config given before it.
        p.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        return p

    command("run", "run in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config)")
    command("check-config", "check the config file: every problem as FILE:LINE:COL: key: what")
    command("status", "what the running agent is doing").add_argument(
        "--json", action="store_true", help="the raw status as JSON")
    command("doctor", "check audio, board, GPIO, modem, broker, clock and disk; say how to fix")
    p = command("board-preview", "draw a text as the board shows it, into a PNG or GIF file "
                "(with no config: the default 64x16 board)")
    p.add_argument("text", nargs="?", help="the message (Vietnamese with diacritics is fine)")
    p.add_argument("--out", default="board-preview.png",
                   help="the file to write, .png or .gif (a scrolling text in a .png is an "
                        "animated PNG; viewers without APNG show its first frame)")
    p.add_argument("--effect", choices=("auto", "scroll", "static"), default="auto")
    p.add_argument("--scale", type=_scale, default=8, help="pixels per LED in the picture, 1-32")
    page = p.add_argument_group("page boards (board.driver: framebuffer): a PNG per page")
    page.add_argument("--priority", choices=("normal", "priority", "emergency"),
                      default="normal", help="the page's colours")
    page.add_argument("--image", help="a PNG or JPEG file shown with the text")
    page.add_argument("--layout", choices=("text", "beside", "image"),
                      help="text alone, the image beside the text (default with --image), "
                           "or the image alone")
    page.add_argument("--document", help="a desired/board document (JSON: the envelope or "
                      "its args): each message as a page, OUT-1.png, OUT-2.png...; images from "
                      "the media cache when it holds them")
    command("version", "print the version")
    return parser


def _scale(text: str) -> int:
    from agent.board.preview import MAX_SCALE

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SCALE:
        raise argparse.ArgumentTypeError(f"must be a whole number 1-{MAX_SCALE}, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "version":
        print(f"ttcs-agent {__version__}")
        return 0
    if args.cmd == "check-config":
        return check_config(args.config)
    if args.cmd == "status":
        return status(args.config, args.json)
    if args.cmd == "board-preview":
        return board_preview(args)
    if args.cmd == "doctor":
        from agent import doctor

        return doctor.main(args.config)
    from agent import app

    return app.run(args.config)


def check_config(path: str | None) -> int:
    cfg = config.load_or_report(path, sys.stdout)
    if cfg is None:
        return 1
    print(f"{cfg['_path']}: ok (device {cfg['device']['id']})")
    return 0


def board_preview(args) -> int:
    from agent.board.preview import preview

    cfg = _preview_config(args.config)
    if cfg is None:
        return 1
    board = cfg["board"]
    if board["driver"] == "framebuffer":
        return _page_preview(args, cfg)
    if args.document or args.image or args.layout or args.priority != "normal":
        print("board-preview: --priority, --image, --layout and --document are for page "
              "boards (board.driver: framebuffer)", file=sys.stderr)
        return EXIT_USAGE
    if args.text is None:
        print("board-preview: the text to show is missing", file=sys.stderr)
        return EXIT_USAGE
    result, code = _write_preview(args.out, lambda: preview(
        board, args.text, args.out, effect=args.effect, scale=args.scale))
    if result is None:
        return code
    kind = {"APNG": "animated PNG (APNG: a viewer without APNG support shows the first frame; "
                    "use a .gif name for a GIF)",
            "GIF": "animated GIF" if result["animated"] else "GIF", "PNG": "PNG"}
    print(f"{result['path']}: {kind[result['format']]}, {result['frames']} frame(s), board "
          f"{result['width']}x{result['height']}, text {result['text_width']} px wide")
    return 0


def _write_preview(out: str, write):
    """``(write(), 0)``, or ``(None, exit code)`` with the problem said on stderr."""
    from agent.board.preview import PreviewError

    try:
        return write(), 0
    except PreviewError as e:
        print(f"board-preview: {e}", file=sys.stderr)
        return None, EXIT_USAGE
    except OSError as e:
        print(f"board-preview: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return None, 1


def _preview_config(path: str | None) -> dict | None:
    """The config to preview with (``board``, ``device.timezone``, ``media.dir``): the one
    named (``--config`` or $TTCS_AGENT_CONFIG) must be valid; with neither, the device's
    config when this user can read it, else the defaults (a note says so on stderr)."""
    named = path or os.environ.get("TTCS_AGENT_CONFIG")
    if named or os.access(config.DEFAULT_CONFIG_PATH, os.R_OK):
        return config.load_or_report(named or config.DEFAULT_CONFIG_PATH)
    board = config.defaults("board")
    why = "no" if not os.path.exists(config.DEFAULT_CONFIG_PATH) else "cannot read the"
    print(f"board-preview: {why} device config {config.DEFAULT_CONFIG_PATH}: the default "
          f"{board['width']}x{board['height']} board (--config FILE for another)",
          file=sys.stderr)
    return {"board": board, "device": {"timezone": "Asia/Ho_Chi_Minh"}, "media": {"dir": None}}


def _page_preview(args, cfg: dict) -> int:
    """A page board: the text (or each message of ``--document``) as a PNG page."""
    from agent.board.preview import page_size, preview_pages

    if args.document:
        try:
            with open(args.document, encoding="utf-8") as f:
                doc = json.load(f)
            body = doc.get("args", doc) if isinstance(doc, dict) else doc
        except (OSError, ValueError) as e:
            print(f"board-preview: {args.document}: {e}", file=sys.stderr)
            return EXIT_USAGE
        from agent.board.content import validate_document_args

        errors = validate_document_args(body)
        if errors:
            print(f"board-preview: {args.document}: not a board document: "
                  f"{'; '.join(errors[:5])}", file=sys.stderr)
            return EXIT_USAGE
        pages = [{"text": m["text"], "layout": m.get("layout"), "image": m.get("image")}
                 for m in body["messages"]]
        for spec in pages:
            if spec["layout"] is None:
                del spec["layout"]
    elif args.text is not None:
        pages = [{"text": args.text, "priority": args.priority, "image_file": args.image}]
        if args.layout:
            pages[0]["layout"] = args.layout
    else:
        print("board-preview: give the text to show, or --document FILE", file=sys.stderr)
        return EXIT_USAGE
    import time

    written, code = _write_preview(args.out, lambda: preview_pages(
        cfg["board"], pages, args.out, tz=cfg["device"]["timezone"],
        now_ms=int(time.time() * 1000), cache_dir=cfg["media"]["dir"]))
    if written is None:
        return code
    width, height = page_size(cfg["board"])
    for path in written:
        print(f"{path}: PNG page, {width}x{height}")
    return 0


def status(path: str | None, raw: bool) -> int:
    cfg = config.load_or_report(path)
    if cfg is None:
        return 1
    from zoneinfo import ZoneInfo

    state_dir = cfg["paths"]["state_dir"]
    try:
        with open(os.path.join(state_dir, "status.json"), encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        print(f"no status in {state_dir}: the agent has not run here yet")
        return 3
    alive = pid_alive(st.get("pid"))
    try:
        with open(os.path.join(state_dir, "health.json"), encoding="utf-8") as f:
            st["health"] = json.load(f)
    except (OSError, ValueError):
        pass
    if raw:
        print(json.dumps({**st, "alive": alive}, ensure_ascii=False, indent=1))
        return 0 if alive else 3
    print(render_status(st, alive, ZoneInfo(cfg["device"]["timezone"])))
    return 0 if alive else 3


if __name__ == "__main__":
    sys.exit(main())
