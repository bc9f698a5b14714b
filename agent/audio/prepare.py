"""Preparing items before they air, and holding prepared ones so they air in arrival order.

An item (command or schedule slot) is prepared in the audio service's small pool, off the core
thread: its media looked up in the cache or downloaded and verified, its speech rendered, a live
item's fallback file fetched and its relay made. Media already cached and verified needs no
worker. The result is posted back to the core thread. Both the service's pool and the cache's
run jobs in the item's priority lane (:mod:`agent.audio.lanes`): an emergency is never
prepared behind normal items.

The order items air in within a priority is taken when they arrive (``reserve_seq``), not when
their preparation finishes. A prepared item also waits (up to ``hold_s``) while an earlier
arrival of the same or a higher priority is still being prepared, so that commands sent
together air in the order sent (docs/AUDIO.md, "Ack stages"). :meth:`Preparation.release`,
run after every change, hands what may go to ``on_ready``.

Everything but the workers runs on the core thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from agent.audio.arbiter import Item, Variant
from agent.audio.live import LiveOptions, LiveRelay, as_http
from agent.audio.media import MediaCache, MediaError
from agent.audio.tts import TtsEngine, TtsError
from agent.core.loop import Core
from agent.protocol import Priority
from drivers.audio.base import wav_duration_ms

log = logging.getLogger(__name__)

@dataclass
class Meta:
    """What the audio service knows about an item besides the arbiter, from its arrival to its
    final stage."""

    id: str
    origin: str  # command | schedule
    kind: str  # file | stream | tts
    on_result: Callable[[str, str, str | None], None] | None = None  # service.OnResult
    test: bool = False
    cancelled: bool = False  # stopped while preparing
    segments: list[dict] = field(default_factory=list)
    relay: LiveRelay | None = None
    shas: tuple[str, ...] = ()
    volume: int | None = None  # the item's own, else the device volume when it was queued
    arrival: int = 0
    since: float = 0.0  # monotonic: when preparation began
    rank: Priority = Priority.NORMAL
    ready: Item | None = None  # prepared, waiting for earlier arrivals (FIFO)
    submitted: bool = False  # handed to the arbiter
    extra: dict = field(default_factory=dict)  # merged into the play record
    board_text: str | None = None  # shown on the board while the item airs (NFC)
    priority: str = "normal"
    on_board: bool = False


class Preparation:
    """The items the audio service knows of (``items``, by id) and their preparation.

    Reports through callbacks, on the core thread: ``on_ready(meta)`` (prepared and its turn:
    ``meta.ready`` holds the item), ``on_failed(meta, reason, message)`` (not aired: a refused
    host, a failed download or rendering, a duplicate id), ``on_stopped(meta, by)`` (stopped
    while preparing), and ``on_change()`` after anything that may let a held item go or moves
    the hold's deadline."""

    def __init__(self, core: Core, cache: MediaCache, *, tts: TtsEngine | None,
                 tts_error: str | None, pool: Any, live_options: LiveOptions,
                 reserve_seq: Callable[[], int], hold_s: float, live_prefix: str,
                 on_ready: Callable[[Meta], None],
                 on_failed: Callable[[Meta, str, str], None],
                 on_stopped: Callable[[Meta, str], None],
                 on_change: Callable[[], None]) -> None:
        self.core = core
        self.clock = core.clock
        self.cache = cache
        self.tts, self.tts_error = tts, tts_error
        self.live_options = live_options
        self._pool = pool
        self._reserve_seq = reserve_seq
        self.hold_s = hold_s
        self.live_prefix = live_prefix
        self._on_ready, self._on_failed = on_ready, on_failed
        self._on_stopped, self._on_change = on_stopped, on_change
        self.items: dict[str, Meta] = {}
        self._durations: dict[str, int | None] = {}  # sha256 -> WAV length (see _duration)
        self._pinned_sched: set[str] = set()

    # --- what to prepare ------------------------------------------------------------------

    def start(self, item: Item, action: Any, meta: Meta) -> None:
        """Prepare ``item`` from ``action``, shaped by its kind: ``file``, a list of media
        objects; ``stream``, ``{url, backups?, fallback?}``; ``tts``, ``{text, lang?}``."""
        if item.kind == "file":
            self.media(item, list(action), meta)
        elif item.kind == "stream":
            self.live(item, action, meta)
        else:
            self.say(item, action["text"], action.get("lang", "vi"), meta)

    def media(self, item: Item, media: list[dict], meta: Meta) -> None:
        try:
            for m in media:
                self.cache.check_url(m["url"])
        except MediaError as e:
            self.fail(meta, e.reason, e.message)
            return
        meta.shas = tuple(m["sha256"].lower() for m in media)
        self.prepare(item, meta, lambda: [self._fetch_variant(m, meta.rank) for m in media],
                     ready=self._cached_variants(media))

    def say(self, item: Item, text: str, lang: str, meta: Meta) -> None:
        tts = self.tts
        if tts is None:
            self.fail(meta, "tts_failed", self.tts_error or "no tts engine")
            return

        def render() -> list[Variant]:
            path = tts.render(text, lang)
            return [Variant(path, lang, {"text": text, "lang": lang}, wav_duration_ms(path))]
        self.prepare(item, meta, render)

    def live(self, item: Item, action: dict, meta: Meta) -> None:
        urls = [action["url"], *(action.get("backups") or [])]
        try:
            for url in urls:
                self.cache.check_url(as_http(url))
            fallback = action.get("fallback")
            if fallback is not None:
                fallback = fallback[0] if isinstance(fallback, list) else fallback
                self.cache.check_url(fallback["url"])
        except MediaError as e:
            self.fail(meta, e.reason, e.message)
            return
        key = self.live_prefix + item.id
        media = {"url": urls[0], "backups": urls[1:]}
        if fallback is not None:
            media["fallback"] = fallback
            meta.shas = (fallback["sha256"].lower(),)

        def make() -> list[Variant]:
            path = self._fetch_variant(fallback, meta.rank).source if fallback else None
            meta.relay = LiveRelay(urls[0], urls[1:], path, self.clock, self.live_options)
            return [Variant(key, None, media)]
        self.prepare(item, meta, make)

    def prepare(self, item: Item, meta: Meta, make: Callable[[], list[Variant]],
                ready: list[Variant] | None = None) -> None:
        """Run ``make`` in a worker (or take ``ready`` variants as they are); the item is
        then held or handed on, on the core thread."""
        old = self.items.get(item.id)
        if old is not None and not old.cancelled:
            self.fail(meta, "duplicate_id", f"{item.id} is already queued or airing")
            return
        # the arrival number is the arbiter's queue order: taken now, not when the
        # preparation finishes, so items submitted together air in submission order
        meta.arrival, meta.since = self._reserve_seq(), self.clock.monotonic()
        item.seq = meta.arrival
        meta.rank = Priority.parse(item.priority) or Priority.NORMAL
        self.items[item.id] = meta
        self._update_pins()
        if ready is not None:
            self._prepared(item, meta, ready)
            return
        fut = self._pool.submit(make, lane=meta.rank)
        fut.add_done_callback(lambda f: self.core.post(self._prepared, item, meta, _outcome(f)))
        self._on_change()

    def prefetch(self, url: str, sha256: str,
                 then: Callable[[str, Any], None] | None = None) -> Future | None:
        """Download into the cache ahead of time (no item); ``then(sha, path_or_exception)``
        on the core thread."""
        try:
            self.cache.check_url(url)
        except MediaError as e:
            if then is not None:
                then(sha256.lower(), e)
            return None
        fut = self.cache.submit(url, sha256)
        if then is not None:
            fut.add_done_callback(lambda f: self.core.post(
                then, sha256.lower(), f.exception() or f.result()))
        return fut

    # --- workers --------------------------------------------------------------------------

    def _cached_variants(self, media: list[dict]) -> list[Variant] | None:
        """Variants at once when every file is cached and verified (no worker hop)."""
        out = []
        for m in media:
            path = self.cache.ready_path(m["sha256"])
            if path is None:
                return None
            out.append(Variant(path, m.get("lang"), dict(m), self._duration(m["sha256"], path)))
        return out

    def _duration(self, sha: str, path: str) -> int | None:
        """A cached file's length, read once: the file is named by its checksum, so the same
        sha256 always has the same length."""
        sha = sha.lower()
        if sha not in self._durations:
            if len(self._durations) >= 1000:
                self._durations.clear()
            self._durations[sha] = wav_duration_ms(path)
        return self._durations[sha]

    def _fetch_variant(self, m: dict, lane: Priority) -> Variant:
        """Worker thread: a verified local copy (never a file that failed its checksum),
        downloaded in the item's lane."""
        sha = m["sha256"].lower()
        path = self.cache.path_for(sha) or self.cache.submit(m["url"], sha, lane).result()
        return Variant(path, m.get("lang"), dict(m), wav_duration_ms(path))

    def _prepared(self, item: Item, meta: Meta, result: list[Variant] | BaseException) -> None:
        if meta.cancelled or self.items.get(item.id) is not meta:
            return
        if isinstance(result, BaseException):
            reason, message = _reason_for(result)
            self.fail(meta, reason, message)
            return
        item.variants = result
        meta.ready = item
        self._on_change()

    # --- the hold (FIFO) ------------------------------------------------------------------

    def _held(self, meta: Meta) -> bool:
        """Whether an earlier arrival of the same or a higher priority is still being
        prepared (for at most ``hold_s``): then ``meta`` waits, so that commands sent together
        air in the order they were sent, whatever order their look-ups finish in."""
        now = self.clock.monotonic()
        return any(o.arrival < meta.arrival and self._preparing(o)
                   and o.rank >= meta.rank and now - o.since < self.hold_s
                   for o in self.items.values())

    @staticmethod
    def _preparing(meta: Meta) -> bool:
        """Still being prepared: not ready, not handed to the arbiter, not stopped."""
        return meta.ready is None and not meta.submitted and not meta.cancelled

    def hold_deadline(self) -> float | None:
        """Monotonic instant at which a held item may go, or None when none waits."""
        waiting = [m for m in self.items.values() if m.ready is not None]
        if not waiting:
            return None
        pending = [o.since + self.hold_s for o in self.items.values() if self._preparing(o)]
        return min(pending) if pending else self.clock.monotonic()

    def release(self) -> None:
        """Hand prepared items to ``on_ready`` in arrival order."""
        for meta in sorted(self.items.values(), key=lambda m: m.arrival):
            if meta.ready is not None and not self._held(meta):
                self._on_ready(meta)

    def preparing(self) -> list[Meta]:
        return [m for m in self.items.values() if not m.submitted and not m.cancelled]

    # --- ends -----------------------------------------------------------------------------

    def fail(self, meta: Meta, reason: str, message: str) -> None:
        """``meta`` will not air."""
        self._on_failed(meta, reason, message)
        self._on_change()

    def cancel(self, item_id: str | None, by: str) -> list[str]:
        """Stop items still downloading or rendering (not yet in the arbiter): ``item_id``,
        or all of them. Returns the ids stopped."""
        hits = [m for m in self.items.values() if not m.cancelled and not m.submitted
                and (item_id is None or m.id == item_id)]
        for meta in hits:
            meta.cancelled = True
            self.forget(meta.id)
            self._on_stopped(meta, by)
        self._on_change()
        return [m.id for m in hits]

    def forget(self, item_id: str) -> None:
        self.items.pop(item_id, None)
        self._update_pins()

    # --- pins -----------------------------------------------------------------------------

    def set_pinned(self, shas: Any) -> None:
        """Media the schedule still needs; with what the known items need, never evicted."""
        self._pinned_sched = {s.lower() for s in shas}
        self._update_pins()

    def _update_pins(self) -> None:
        busy = {s for m in self.items.values() for s in m.shas}
        self.cache.set_pinned(self._pinned_sched | busy)


def _outcome(fut: Future) -> Any:
    """A finished future's result, or the exception it ended with (cancelled included)."""
    try:
        return fut.exception() or fut.result()
    except CancelledError as e:
        return e


def _reason_for(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, MediaError):
        return exc.reason, exc.message
    if isinstance(exc, TtsError):
        return "tts_failed", str(exc)
    return "media_unavailable", f"{type(exc).__name__}: {exc}"
