"""Stream failover as an output: what the arbiter plays through (docs/AUDIO.md, "Live relay").

The arbiter knows a ``live`` item as one source, its relay key (``live:<id>``). A
:class:`LiveOutput` plays every other source on the real output as it is, and a relay key
through its :class:`~agent.audio.live.LiveRelay`: it airs the relay's current source, follows
the real output's events about it, feeds the relay the position and level once a second
(:meth:`LiveOutput.tick`), probes the primary in a worker and switches sources. Its listener
(the arbiter's side) hears of a live item only as of any other source: an ``error`` for the
key once every source of the chain failed; plus ``switched`` (``source``) when it changed
source. Core thread only, except the probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.audio.live import LiveOptions, LiveRelay, probe_url
from drivers import DriverError
from drivers.audio.base import AudioOutput, Listener

log = logging.getLogger(__name__)


@dataclass
class LiveRun:
    """The live item on air: its relay key, its relay and the volume it airs at."""

    key: str
    relay: LiveRelay
    volume: int


class LiveOutput(AudioOutput):
    """Wraps the real output (whose lifetime stays with its owner: :meth:`close` leaves it
    open). ``pool`` runs the probes; ``post`` hands their result back to the core thread."""

    def __init__(self, output: AudioOutput, options: LiveOptions, *, meter: Any, pool: Any,
                 post: Callable[..., None], listener: Listener) -> None:
        super().__init__(output.options, listener)
        self.name = output.name
        self._out = output
        self._options = options
        self._meter = meter
        self._pool = pool
        self._post = post
        self.relays: dict[str, LiveRelay] = {}  # relay key -> relay, while its item is known
        self.run: LiveRun | None = None

    # --- AudioOutput ----------------------------------------------------------------------

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        self.run = None
        relay = self.relays.get(source)
        if relay is None:
            self._out.play(source, start_ms=start_ms, volume=volume)
            return
        self._out.play(relay.rejoin(), volume=volume)  # a stream rejoins from its primary
        self.run = LiveRun(source, relay, volume)

    def stop(self) -> int:
        self.run = None
        return self._out.stop()

    def set_volume(self, level: int) -> None:
        if self.run is not None:
            self.run.volume = level
        self._out.set_volume(level)

    def position_ms(self) -> int:
        return self._out.position_ms()

    def is_playing(self) -> bool:
        return self._out.is_playing()

    def ok(self) -> bool:
        return self._out.ok()

    def preroll(self, source: str, start_ms: int = 0) -> bool:
        return self._out.preroll(source, start_ms)

    @property
    def last_error(self) -> str | None:  # type: ignore[override]
        return self._out.last_error

    # --- relays ---------------------------------------------------------------------------

    def add(self, key: str, relay: LiveRelay) -> None:
        """``key`` is the source the arbiter will play for ``relay``."""
        self.relays[key] = relay

    def discard(self, key: str) -> None:
        self.relays.pop(key, None)

    # --- the real output's events, the tick, probes ---------------------------------------

    def on_output_event(self, kind: str, detail: dict) -> None:
        """An event of the real output (on the core thread). One about the live source on
        air moves the chain on (an ended fallback file loops); the rest go to the listener."""
        run = self.run
        if run is not None and detail.get("source") == run.relay.current():
            if kind == "ended":
                self._switch(run, run.relay.ended())
            elif kind == "error":
                self._switch(run, run.relay.failed("error"))
            return
        self.listener(kind, detail)

    def tick(self) -> None:
        """Once a second: dead air leaves the source; a due probe of the primary starts."""
        run = self.run
        if run is None:
            return
        level = self._meter.level_dbfs() if self._meter is not None else None
        if run.relay.observe(self._out.position_ms(), level):
            log.warning("live %s: dead air on %s", run.key, run.relay.current())
            self._switch(run, run.relay.failed("dead_air"))
        elif run.relay.probe_due():
            url = run.relay.probe_started()
            fut = self._pool.submit(probe_url, url, self._options.probe_timeout_s)
            fut.add_done_callback(lambda f: self._post(
                self._probed, run, not f.exception() and f.result()))

    def _probed(self, run: LiveRun, ok: bool) -> None:
        if self.run is not run:
            run.relay.probing = False
            return
        nxt = run.relay.probe_result(bool(ok))
        if nxt is not None:
            log.info("live %s: primary is back", run.key)
            self._switch(run, nxt)

    def _switch(self, run: LiveRun, nxt: str | None) -> None:
        """Air the relay's next source, or fail the item once the chain is exhausted."""
        error, reason = "every source of the live chain failed", "media_unavailable"
        if nxt is not None:
            log.info("live %s: now airing %s", run.key, nxt)
            try:
                self._out.play(nxt, volume=run.volume)
                self.listener("switched", {"source": nxt})
                return
            except DriverError as e:
                error, reason = str(e), "audio_fault"
        self.run = None
        self.listener("error", {"source": run.key, "error": error, "reason": reason})
