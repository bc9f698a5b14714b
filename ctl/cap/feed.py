"""``ttcs-ctl cap watch URL|DIR``: follow sources of CAP messages (docs/CAP.md, "watch").

A source is a folder where another system drops CAP files (``*.xml``), or a URL: an Atom or
RSS feed whose entries link to CAP messages (or hold one inline, as some hubs do), or a CAP
message itself. Every ``interval`` each source is read; what it gives is handed to the
:class:`ctl.cap.handle.Handler`, which handles a message once (sender + identifier + sent
remembered in the relay's database, across restarts). A file or document already read is
remembered by its SHA-256 (``cap_seen``), so an invalid one is reported once, not every
interval. A source that fails (down, too big, not XML) is retried with backoff (``interval``
doubling up to :data:`MAX_BACKOFF_S`) without holding up the others.

Feeds are parsed with defusedxml (no DTD, no entities): a feed is hostile input too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

from ctl.cap import fetch
from ctl.cap.parse import NS as CAP_NS

log = logging.getLogger(__name__)

ATOM = "{http://www.w3.org/2005/Atom}"
MAX_BACKOFF_S = 600.0
MAX_ENTRIES = 200  # per feed read: a hub lists the current alerts, not its history


class SourceError(Exception):
    pass


@dataclass
class Source:
    where: str  # a URL or a folder
    failures: int = 0
    next_s: float = 0.0

    @property
    def is_url(self) -> bool:
        return self.where.startswith(("http://", "https://"))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fetcher:
    """HTTP GET with a size cap; http(s) only."""

    def __init__(self, max_bytes: int, timeout: float) -> None:
        self.max_bytes, self.timeout = max_bytes, timeout

    def get(self, url: str) -> bytes:
        try:
            return fetch.get(url, max_bytes=self.max_bytes, timeout=self.timeout,
                             too_big="cap.feed_max_bytes")
        except fetch.FetchError as e:
            raise SourceError(str(e)) from None


def messages_in(data: bytes, base_url: str, fetch: Callable[[str], bytes]) -> list[
        tuple[str, bytes]]:
    """``(where, CAP bytes)`` in a document: itself when it is a CAP alert; else the entries
    of an Atom or RSS feed (a link to a CAP message, or one inline)."""
    try:
        root = DET.fromstring(data, forbid_dtd=True)
    except (DefusedXmlException, DET.ParseError, LookupError, ValueError) as e:
        raise SourceError(f"not a feed or a CAP message: {type(e).__name__}: {e}") from None
    if root.tag == f"{{{CAP_NS}}}alert":
        return [(base_url, data)]
    out: list[tuple[str, bytes]] = []
    entries = root.findall(f"{ATOM}entry") or root.findall("channel/item")
    for entry in entries[:MAX_ENTRIES]:
        inline = entry.find(f".//{{{CAP_NS}}}alert")
        if inline is not None:
            out.append((base_url, DET.tostring(inline, encoding="utf-8")))
            continue
        link = _link(entry)
        if not link:
            continue
        url = urllib.parse.urljoin(base_url, link)
        try:
            out.append((url, fetch(url)))
        except SourceError as e:
            log.warning("cap watch: %s: %s", url, e)
    return out


def _link(entry) -> str | None:
    links = entry.findall(f"{ATOM}link")
    if links:
        cap = [ln for ln in links if "cap" in (ln.get("type") or "")]
        alt = [ln for ln in links if ln.get("rel") in (None, "alternate")]
        chosen = (cap or alt or links)[0]
        return chosen.get("href")
    link = entry.findtext("link")
    return link.strip() if link else None


def folder_messages(folder: str) -> list[tuple[str, bytes]]:
    """The ``*.xml`` files of ``folder``, oldest first (by modification time)."""
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".xml") and not n.startswith(".")]
    except OSError as e:
        raise SourceError(f"cannot list {folder}: {e.strerror}") from None
    paths = [os.path.join(folder, n) for n in names]
    out = []
    for p in sorted(paths, key=lambda p: (os.path.getmtime(p), p)):
        try:
            with open(p, "rb") as f:
                out.append((p, f.read(5 * 1024 * 1024 + 1)))
        except OSError as e:
            log.warning("cap watch: %s: %s", p, e.strerror)
    return out


class Watcher:
    """Reads each source when due and hands new messages to ``handle(data, where)``."""

    def __init__(self, sources: list[str], handle: Callable[[bytes, str], None], seen,
                 fetcher: Fetcher, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = [Source(s) for s in sources]
        self.handle, self.seen, self.fetcher = handle, seen, fetcher
        self.interval_s, self.clock = interval_s, clock

    def tick(self) -> int:
        """Read every due source once; how many new documents were handed on."""
        n = 0
        for src in self.sources:
            if self.clock() < src.next_s:
                continue
            try:
                found = self._read(src)
            except Exception as e:  # a source's trouble never stops the watch
                if not isinstance(e, SourceError):
                    log.exception("cap watch: reading %s failed", src.where)
                src.failures += 1
                delay = min(MAX_BACKOFF_S, self.interval_s * 2 ** min(src.failures, 20))
                src.next_s = self.clock() + delay
                log.warning("cap watch: %s failed (%s); next try in %.0f s", src.where, e,
                            delay)
                continue
            if src.failures:
                log.info("cap watch: %s is back", src.where)
            src.failures, src.next_s = 0, self.clock() + self.interval_s
            for where, data in found:
                key = digest(data)
                if self.seen.seen(src.where, key):
                    continue
                try:
                    self.handle(data, where)
                except Exception:  # one message's bug must not stop the watch
                    log.exception("cap watch: handling %s failed", where)
                    continue  # not marked: tried again next time
                self.seen.mark_seen(src.where, key, int(time.time() * 1000))
                n += 1
        return n

    def _read(self, src: Source) -> list[tuple[str, bytes]]:
        if src.is_url:
            return messages_in(self.fetcher.get(src.where), src.where, self.fetcher.get)
        return folder_messages(src.where)
