"""Live relay: which source a ``live`` item airs now, and when to change it.

Plain logic on an injected clock, like the arbiter: no threads, no libvlc. The audio service
drives it: it plays :meth:`LiveRelay.current`, reports what the output did (``started``,
``failed``, ``ended``), feeds :meth:`LiveRelay.observe` once a second with the output position
and the monitored level, and runs :func:`probe_url` in a worker when :meth:`probe_due` says so.

The chain is the primary stream, its backups, then an optional local fallback file, as Barix
endpoints and Liquidsoap ``fallback`` chains do:

- a source that errors, ends (the server closed the stream) or goes dead (no position advance,
  or a level below ``silence_dbfs`` for ``dead_air_s``) is left for the next one;
- the fallback file loops while no stream airs; when it fails too, the chain is exhausted;
- while off the primary, the primary is re-probed with a backoff (10 s, doubling to 3 min);
  a good probe switches back to it. The backoff starts afresh only once the primary has aired
  well for ``STABLE_S``: a primary that answers probes but keeps going dead is retried less
  and less often instead of flapping;
- rejoining (after a preemption) starts again from the primary.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent.core.clock import Clock

STABLE_S = 60.0  # a source airing this long without a fault has recovered for good


@dataclass
class LiveOptions:
    dead_air_s: float = 8.0  # no progress (or silence) this long on an airing source: dead
    start_grace_s: float = 12.0  # a source may take this long to produce its first audio
    silence_dbfs: float = -50.0
    probe_min_s: float = 10.0
    probe_max_s: float = 180.0
    probe_timeout_s: float = 5.0


@dataclass
class Switch:
    """One change of source, for the play record."""

    at_ms: int
    source: str
    reason: str


@dataclass
class LiveRelay:
    primary: str
    backups: list[str]
    fallback: str | None  # a local file path
    clock: Clock
    options: LiveOptions = field(default_factory=LiveOptions)
    index: int = 0
    switches: list[Switch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._since = self.clock.monotonic()  # when the current source was (re)started
        self._last_pos: int | None = None
        self._progress_at: float | None = None  # last position advance
        self._silent_since: float | None = None
        self._probe_delay = self.options.probe_min_s
        self._probe_at: float | None = None
        self.probing = False

    # --- the chain ------------------------------------------------------------------------

    @property
    def sources(self) -> list[str]:
        return [self.primary, *self.backups] + ([self.fallback] if self.fallback else [])

    def current(self) -> str | None:
        """The source to air now, None once the chain is exhausted."""
        return self.sources[self.index] if self.index < len(self.sources) else None

    def on_fallback(self) -> bool:
        return self.fallback is not None and self.current() == self.fallback

    def rejoin(self) -> str:
        """Start (again) from the primary: a fresh item or a resume after a preemption."""
        self.index = 0
        self._probe_at = None
        self._probe_delay = self.options.probe_min_s
        self._restart("rejoin")
        return self.primary

    def failed(self, reason: str) -> str | None:
        """The current source failed (error, end of stream, dead air): the next one or None.

        The fallback file ending by itself is not a failure: it loops (see :meth:`ended`).
        """
        if self.current() is None:
            return None
        self.index += 1
        if self.index == 1 and self._probe_at is None:
            self._probe_at = self.clock.monotonic() + self._probe_delay
        self._restart(reason)
        return self.current()

    def ended(self) -> str | None:
        """The output reached the end of the current source."""
        if self.on_fallback():
            self._restart("fallback_loop")
            return self.fallback
        return self.failed("stream_ended")

    def _restart(self, reason: str) -> None:
        self._since = self.clock.monotonic()
        self._last_pos = None
        self._progress_at = None
        self._silent_since = None
        cur = self.current()
        if cur is not None and reason != "fallback_loop":
            self.switches.append(Switch(self.clock.now_ms(), cur, reason))

    # --- dead air -------------------------------------------------------------------------

    def observe(self, position_ms: int | None, level_dbfs: float | None = None) -> bool:
        """Feed the output position and the monitored level; True when the source is dead."""
        now = self.clock.monotonic()
        if position_ms is not None and position_ms != self._last_pos:
            if self._last_pos is not None:
                self._progress_at = now
            self._last_pos = position_ms
        if level_dbfs is not None and level_dbfs < self.options.silence_dbfs:
            self._silent_since = self._silent_since or now
        else:
            self._silent_since = None
        dead = self._stalled(now) or self._silent(now)
        if not dead and self.index == 0 and now - self._since >= STABLE_S:
            self._probe_delay = self.options.probe_min_s
        return dead

    def _stalled(self, now: float) -> bool:
        if self._progress_at is None:  # nothing heard yet: allow for connecting and buffering
            return now - self._since >= self.options.start_grace_s
        return now - self._progress_at >= self.options.dead_air_s

    def _silent(self, now: float) -> bool:
        if self.on_fallback() or self._silent_since is None:
            return False  # a fallback file may hold pauses; only streams are judged by level
        return now - self._silent_since >= self.options.dead_air_s

    # --- re-probing the primary -----------------------------------------------------------

    def probe_due(self) -> bool:
        return (self.index > 0 and not self.probing and self._probe_at is not None
                and self.clock.monotonic() >= self._probe_at)

    def probe_started(self) -> str:
        self.probing = True
        return self.primary

    def probe_result(self, ok: bool) -> str | None:
        """The primary answered (switch back to it: returned) or not (back off)."""
        self.probing = False
        if self.index == 0:
            return None
        # either way the next probe waits longer: after a failed probe, or if the primary
        # fails again soon after a good one (observe() resets it once the primary airs well)
        self._probe_delay = min(self._probe_delay * 2, self.options.probe_max_s)
        if ok:
            self.index = 0
            self._probe_at = None
            self._restart("primary_back")
            return self.primary
        self._probe_at = self.clock.monotonic() + self._probe_delay
        return None

    def next_deadline(self) -> float | None:
        return self._probe_at if self.index > 0 and not self.probing else None

    def report(self) -> dict:
        """For the play record: which source aired last and every switch."""
        return {"source": self.current(), "switches": [
            {"at": s.at_ms, "source": s.source, "reason": s.reason} for s in self.switches]}


def as_http(url: str) -> str:
    """The same host and port as an http URL: the media host allow-list checks only http(s)."""
    parts = urlsplit(url)
    if parts.scheme.lower() in ("http", "https"):
        return url
    return parts._replace(scheme="http").geturl()


def probe_url(url: str, timeout_s: float = 5.0, min_bytes: int = 4096) -> bool:
    """Whether a stream answers: http(s) sends ``min_bytes`` of a 200 response; rtsp accepts
    a TCP connection. Blocking: run it in a worker."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "rtsp":
        try:
            with socket.create_connection((parts.hostname, parts.port or 554), timeout=timeout_s):
                return True
        except OSError:
            return False
    import requests

    try:
        with requests.get(url, stream=True, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return False
            got = 0
            for chunk in resp.iter_content(1024):
                got += len(chunk)
                if got >= min_bytes:
                    return True
    except requests.RequestException:
        return False
    return False
