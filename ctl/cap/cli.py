"""``ttcs-ctl cap ingest|watch|status`` (docs/CAP.md): the command line, and the one place
that makes a :class:`ctl.cap.handle.Handler` from the config."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import urllib.parse
from typing import TYPE_CHECKING

from ctl.session import EXIT_FAILED, EXIT_USAGE

if TYPE_CHECKING:  # the CAP parts need the ctl extra (lxml, shapely): imported when used
    from ctl.cap.handle import Handler
    from ctl.cap.record import CapRecord

log = logging.getLogger(__name__)


def add_parser(command) -> None:
    """``command(name, text, parent=None)`` makes a subcommand (ctl/main.py's helper)."""
    p = command("cap", "CAP 1.2 alerts: ingest one, watch a feed or folder, proof of airing")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = command("ingest", "validate one CAP 1.2 message, send it to its areas, print the acks",
                csub)
    i.add_argument("source", help="a file, an http(s) URL, or - for standard input")
    i.add_argument("--no-wait", action="store_true", help="do not wait for received acks")
    i.add_argument("--force", action="store_true",
                   help="handle a message already handled (new command ids)")
    w = command("watch", "follow Atom/RSS feeds of CAP alerts or folders of CAP files", csub)
    w.add_argument("sources", nargs="+", metavar="URL|DIR")
    w.add_argument("--interval", type=float, default=30.0, metavar="S",
                   help="seconds between reads of each source (default 30)")
    w.add_argument("--once", action="store_true", help="read each source once and exit")
    s = command("status", "which devices aired a CAP alert, when; which did not, and why",
                csub)
    s.add_argument("identifier", help="the alert's identifier")


def _plain(line: str) -> str:
    """A printed line holds text from the message (identifier, sender, areaDesc) and from
    devices: shown as one line of plain text, its control and format characters removed
    (ctl/sanitize.py), leading indentation kept."""
    from ctl.sanitize import clean

    body = line.lstrip(" ")
    return line[:len(line) - len(body)] + clean(body, 4000)


def make_handler(cfg: dict, record: CapRecord, *, shared: bool = False):
    """The :class:`Handler` of ``cap ingest`` (a connection per message), or with ``shared``,
    of ``cap watch``: ``(handler, link)``, one connection kept open. None without a key."""
    from ctl.cap.handle import Handler
    from ctl.cap.link import Link
    from ctl.cap.notice import Notifier
    from ctl.keys import signing_key
    from ctl.media import MediaStore

    key = signing_key(cfg)
    if key is None:
        return None
    alerts = cfg["alerts"]
    channels = []
    if any(alerts.get(k) for k in ("webhook_url", "telegram", "email")):
        from ctl.notify import channels_from_config

        channels = channels_from_config(alerts)
    link = Link.open(cfg, key, owned=False) if shared else None
    handler = Handler(cfg, record, MediaStore.from_config(cfg),
                      (lambda: link) if shared else (lambda: Link.open(cfg, key)),
                      Notifier(channels, cfg["relay"]["timezone"]))
    return (handler, link) if shared else handler


def main(cfg: dict, args) -> int:
    try:
        from ctl.cap.handle import Handler  # noqa: F401  (lxml and shapely: the ctl extra)
        from ctl.cap.record import CapRecord
        from ctl.cap.status import report
    except ImportError as e:
        print(f"ttcs-ctl cap needs the controller extras ({e.name} is missing):"
              " pip install 'ttcs-agent[ctl]'", file=sys.stderr)
        return EXIT_FAILED
    record = CapRecord.open(cfg)
    try:
        if args.action == "status":
            code, lines = report(record, args.identifier, cfg)
            print("\n".join(_plain(ln) for ln in lines))
            return code
        if args.action == "ingest":
            handler = make_handler(cfg, record)
            if handler is None:
                return EXIT_USAGE
            return ingest(handler, cfg, args.source, wait=not args.no_wait, force=args.force)
        return watch(cfg, record, args.sources, args.interval, args.once)
    finally:
        record.close()


def _read(cfg: dict, source: str) -> bytes:
    from ctl.cap.feed import Fetcher
    from ctl.cap.parse import MAX_BYTES

    if source == "-":
        return sys.stdin.buffer.read(MAX_BYTES + 1)
    if urllib.parse.urlsplit(source).scheme in ("http", "https"):
        return Fetcher(MAX_BYTES + 1, cfg["cap"]["download_timeout_s"]).get(source)
    with open(source, "rb") as f:
        return f.read(MAX_BYTES + 1)


def ingest(handler: Handler, cfg: dict, source: str, *, wait: bool, force: bool) -> int:
    from ctl.cap.feed import SourceError
    from ctl.cap.handle import EXIT_INVALID

    try:
        data = _read(cfg, source)
    except (OSError, SourceError) as e:
        print(f"ttcs-ctl cap ingest: cannot read {source}: {e}", file=sys.stderr)
        return EXIT_FAILED
    out = handler.handle(data, source, wait=wait, force=force)
    stream = sys.stderr if out.code == EXIT_INVALID else sys.stdout
    print("\n".join(_plain(ln) for ln in out.lines), file=stream)
    for problem in handler.notifier.errors:
        print(f"notice not delivered: {problem}", file=sys.stderr)
    return out.code


def watch(cfg: dict, record: CapRecord, sources: list[str], interval: float,
          once: bool) -> int:
    from ctl.cap.link import AckListener

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for s in sources:
        if not s.startswith(("http://", "https://")) and not os.path.isdir(s):
            print(f"ttcs-ctl cap watch: {s} is neither an http(s) URL nor a folder",
                  file=sys.stderr)
            return EXIT_USAGE
    made = make_handler(cfg, record, shared=True)
    if made is None:
        return EXIT_USAGE
    handler, link = made
    try:
        return _watch(handler, AckListener(link, record), cfg, record, sources, interval, once)
    finally:
        link.shut()


def _watch(handler: Handler, listener, cfg: dict, record: CapRecord, sources: list[str],
           interval: float, once: bool) -> int:
    from ctl.cap.feed import Fetcher, Watcher

    def handle(data: bytes, where: str) -> None:
        out = handler.handle(data, where)
        for line in out.lines:
            log.info("%s", _plain(line))

    watcher = Watcher(sources, handle, record,
                      Fetcher(int(cfg["cap"]["feed_max_bytes"]),
                              cfg["cap"]["download_timeout_s"]), interval)
    if once:
        watcher.tick()
        listener.drain()
        return 0
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("cap watch: %d source(s) every %g s", len(sources), interval)
    try:
        while not stop.is_set():
            watcher.tick()
            listener.drain()
            stop.wait(min(1.0, interval))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.drain()
    log.info("cap watch stopped")
    return 0
