"""Pre-roll for ``at`` items (docs/AUDIO.md, "Timing"): shortly before the next instant, when
nothing airs, its first source is opened paused on the output, so that the arbiter's ``play``
at the instant only unpauses it. Only when nothing airs: there is one player, and what airs
is never cut for a pre-roll. An output that cannot pre-roll (``AudioOutput.preroll`` returns
False) just starts at the instant.
"""

from __future__ import annotations

import logging

from agent.core.clock import Clock
from drivers.audio.base import AudioOutput

log = logging.getLogger(__name__)


class Preroll:
    """``lead_s``: how long before the instant the source is opened. Core thread only."""

    def __init__(self, output: AudioOutput, clock: Clock, *, lead_s: float) -> None:
        self._out = output
        self._clock = clock
        self.lead_s = lead_s
        self.sources: dict[str, tuple[int, str]] = {}  # at items: id -> (at, first source)
        self._done: str | None = None  # the source pre-rolled (or tried) for the next instant

    def add(self, item_id: str, at_ms: int, source: str) -> None:
        self.sources[item_id] = (at_ms, source)

    def discard(self, item_id: str) -> None:
        self.sources.pop(item_id, None)

    def started(self, item_id: str) -> None:
        """The item airs: its pre-roll, if any, is used."""
        self.sources.pop(item_id, None)
        self._done = None

    def again(self) -> None:
        """The wall clock was stepped: the instants moved, pre-roll again."""
        self._done = None

    def due(self, busy: bool) -> float | None:
        """Monotonic instant to call :meth:`run` at, or None. None while something airs: the
        change that ends it is followed by a :meth:`run`."""
        nxt = self._next()
        if nxt is None or self._done == nxt[1] or busy or self._out.is_playing():
            return None
        at_mono = self._clock.monotonic() + (nxt[0] - self._clock.now_ms()) / 1000
        return max(self._clock.monotonic(), at_mono - self.lead_s)

    def run(self, busy: bool) -> None:
        """Pre-roll the next ``at`` item's source if its instant is within ``lead_s``."""
        nxt = self._next()
        if nxt is None or busy or self._out.is_playing():
            return
        at_ms, source = nxt
        wait_ms = at_ms - self._clock.now_ms()
        if 0 < wait_ms <= self.lead_s * 1000 + 5 and self._done != source:
            self._done = source  # once: an output that cannot, or failed, starts at the instant
            try:
                self._out.preroll(source)
            except Exception as e:  # noqa: BLE001 - a failed pre-roll just means no pre-roll
                log.info("pre-roll of %s failed: %s", source, e)

    def _next(self) -> tuple[int, str] | None:
        return min(self.sources.values()) if self.sources else None
