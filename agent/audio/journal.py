"""The airing journal: what is on air, kept in agent.db, so that an item cut by a power cut or a
crash still gets its play record (docs/AUDIO.md, "Play records", ``result: "interrupted"``).

An item has a row in the ``airing`` table (:meth:`agent.core.store.Store.airing_put`) from the
moment it starts airing until its final stage, whose play record and row deletion go in the
same batch. The row holds the record so far: the closed segments (as the arbiter reported
them) and the open one (kind, media, priority, requested length, when it started), plus the
item's id, origin, volume and the schedule's fields. It is written when a segment opens
(``started``, ``resumed``) or closes (``preempted``); while the item airs, its position
(``played_ms`` of the open segment, ``updated``) is moved every ``interval_s`` seconds by a
core timer, inside the core's batch and without a flush of its own
(:meth:`~agent.core.store.Store.airing_progress`).

At the next start, every row left is an item that was on air (or preempted and waiting) when
the agent died: :meth:`AiringJournal.recover` hands each to the play records as an item whose
last segment ended ``interrupted`` at the last moment known, then drops the rows.

Everything runs on the core thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.audio.arbiter import Item, order_variants, requested_ms
from agent.core.clock import Clock
from agent.core.store import Store

if TYPE_CHECKING:
    from agent.audio.prepare import Meta

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"


@dataclass
class Interrupted:
    """An item the agent was airing when it last died, as its row kept it."""

    id: str
    origin: str
    volume: int | None
    extra: dict
    segments: list[dict]  # the last one ended "interrupted" (or "preempted": it was waiting)
    ended: int  # the last moment known, epoch ms


@dataclass
class _Open:
    segment: dict  # what the open segment's record will say, ``started`` included
    mono: float  # monotonic start of the open segment


class AiringJournal:
    """See the module docstring. ``languages``: the device's, to know the variants aired."""

    def __init__(self, store: Store, clock: Clock, *, languages: list[str],
                 interval_s: float) -> None:
        self.store = store
        self.clock = clock
        self.languages = languages
        self.interval_s = interval_s
        self._planned: dict[str, dict] = {}  # id -> its segments' fields, from submission
        self._open: dict[str, _Open] = {}  # id -> the segment on air
        self._kept: set[str] = set()  # ids with a row

    def submitted(self, item: Item) -> None:
        """An item handed to the arbiter: what a segment of it will say."""
        order = order_variants(item.variants, self.languages)
        self._planned[item.id] = {
            "id": item.id, "origin": item.origin, "kind": item.kind,
            "media": [v.media for v in order], "priority": item.priority,
            "requested_ms": requested_ms(item, order), "repeat": item.repeat}

    def follow(self, meta: Meta, stage: str) -> None:
        """A stage of ``meta``'s item (before its final stage forgets it): a segment opened
        or closed. Never raises: the journal must not stop the audio."""
        try:
            if stage in ("started", "resumed") and meta.id in self._planned:
                now = self.clock.now_ms()
                self._open[meta.id] = _Open({**self._planned[meta.id], "started": now},
                                            self.clock.monotonic())
                self._put(meta, now)
            elif stage == "preempted" and meta.id in self._kept:
                self._open.pop(meta.id, None)
                self._put(meta, self.clock.now_ms())
        except Exception:
            log.exception("airing journal: %s %s not recorded", meta.id, stage)

    def ended(self, item_id: str) -> None:
        """The item reached its final stage (its play record is in the same batch)."""
        self._planned.pop(item_id, None)
        self._open.pop(item_id, None)
        if item_id in self._kept:
            self._kept.discard(item_id)
            try:
                self.store.airing_done(item_id)
            except Exception:
                log.exception("airing journal: %s not removed", item_id)

    def tick(self) -> None:
        """Move the position of what airs (the core's timer, every ``interval_s``)."""
        for item_id, seg in self._open.items():
            try:
                self.store.airing_progress(item_id, self._played(seg), self.clock.now_ms())
            except Exception:
                log.exception("airing journal: position of %s not recorded", item_id)

    def recover(self, record: Callable[[Interrupted], Any]) -> int:
        """At start, before anything airs: ``record`` each item left on air by the last run,
        then drop the rows (in one transaction). Returns how many there were."""
        with self.store.transaction():
            rows = self.store.airing_rows()
            for item_id, body, played_ms, updated in rows:
                segments = list(body.get("segments") or [])
                if body.get("open"):
                    # the position is counted on the monotonic clock: the segment ends where
                    # it says (its start plus what played), whatever the wall clock did
                    opened = body["open"]
                    end = opened["started"] + played_ms if "started" in opened else updated
                    segments.append({**opened, "ended": end, "played_ms": played_ms,
                                     "result": INTERRUPTED})
                    updated = end
                if segments:
                    log.warning("%s %s was on air when the agent stopped: recorded %s",
                                body.get("origin"), item_id, INTERRUPTED)
                    record(Interrupted(item_id, body.get("origin", "command"),
                                       body.get("volume"), body.get("extra") or {}, segments,
                                       updated))
                self.store.airing_done(item_id)
        return len(rows)

    def _put(self, meta: Meta, now: int) -> None:
        seg = self._open.get(meta.id)
        body = {"origin": meta.origin, "volume": meta.volume, "extra": meta.extra,
                "segments": meta.segments, "open": seg.segment if seg else None}
        self.store.airing_put(meta.id, body, self._played(seg) if seg else 0, now)
        self._kept.add(meta.id)

    def _played(self, seg: _Open) -> int:
        return round((self.clock.monotonic() - seg.mono) * 1000)
