"""Priority arbitration of what airs (SPEC §7): pure, thread-free, driven by an injected clock.

The core owns one :class:`Arbiter` and calls it from its event-loop thread only: ``submit`` for
new items, ``stop_*``/``set_volume`` for commands, ``on_output_event`` for events the audio
backend reported (the backend's listener only enqueues them), and ``tick`` whenever the
monotonic instant returned by ``next_deadline`` has passed (and after anything else, calling
``tick`` early is harmless). The arbiter never sleeps and starts no thread. After each of those
calls that may have changed what airs or waits, it calls ``on_change()`` (once per call), where
the owner re-arms its timer and publishes its state.

Rules:
- emergency > priority > normal; a higher item preempts the airing one at once;
- a preempted item resumes before the rest of its priority (a file or TTS from where it stopped,
  rewound ``resume_rewind_ms`` so the cut word is heard again; a stream by rejoining) unless
  it has expired (``exp``) meanwhile;
- first in, first out within one priority (by ``Item.seq`` when the caller reserved one at
  arrival with ``reserve_seq``: preparation may finish out of order);
- an item's language variants air one after the other in ``device.languages`` order, and the
  whole sequence ``repeat`` times, as one item;
- an item with ``at`` waits, the amplifier is switched on ``warm_up_s`` before, and audio
  starts at that instant (unless something of the same or higher priority is airing then);
- a stream stops after ``duration_s``;
- a backend failure fails the item (``audio_fault``) and the next one airs; nothing raises.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.core.clock import Clock
from agent.protocol import Priority

log = logging.getLogger(__name__)

KINDS = ("file", "stream", "tts")
TOLERANCE_MS = 5  # a timer firing this early still counts as on time

AckFn = Callable[..., None]  # on_ack(cmd_id, stage, reason=None, detail=None)
PlayFn = Callable[[dict], None]


def _changes(method: Callable) -> Callable:
    """A public call that may change what airs or waits: ``on_change`` follows it, once, when
    the outermost such call returns (or raises)."""
    @functools.wraps(method)
    def run(self: Arbiter, *args: Any, **kwargs: Any) -> Any:
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._on_change is not None:
                self._call_quietly(self._on_change)
    return run


class Output(Protocol):
    """What the arbiter needs of a :class:`drivers.audio.base.AudioOutput`."""

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None: ...
    def stop(self) -> int: ...
    def set_volume(self, level: int) -> None: ...


class Amp(Protocol):
    """What the arbiter needs of an :class:`agent.audio.amplifier.Amplifier`."""

    warm_up_s: float

    def request_on(self) -> None: ...
    def request_off(self) -> None: ...
    def is_ready(self) -> bool: ...
    def next_deadline(self) -> float | None: ...
    def tick(self) -> None: ...


class Meter(Protocol):
    """What the arbiter needs of a :class:`drivers.level.LevelMeter`."""

    def begin(self) -> None: ...
    def end(self) -> dict | None: ...


@dataclass
class Variant:
    """One language version, already resolved: ``source`` is a local path or a stream URL.

    ``media`` is what play records report (``{"url", "sha256", "lang"}`` or ``{"text",
    "lang"}``); ``duration_ms`` when known makes ``requested_ms`` known.
    """

    source: str
    lang: str | None = None
    media: dict = field(default_factory=dict)
    duration_ms: int | None = None


@dataclass
class Item:
    id: str
    kind: str  # file | stream | tts
    variants: list[Variant]
    priority: str = "normal"
    volume: int | None = None  # None: the device volume
    repeat: int = 1
    duration_s: float | None = None  # streams: stop after this long
    at_ms: int | None = None  # start exactly then (epoch ms)
    exp_ms: int | None = None  # never start or resume after this (epoch ms)
    origin: str = "command"  # or "schedule"; copied into play records
    seq: int | None = None  # arrival order from Arbiter.reserve_seq(); None: at submit


@dataclass
class _Entry:
    item: Item
    order: list[Variant]
    seq: int
    step: int = 0  # index into order * repeat
    pos_ms: int = 0  # where to start the current step (a resumed file)
    front: bool = False  # preempted: resumes before its priority's queue
    started: bool = False  # the "started" ack went out
    played_ms: int = 0  # before the open segment
    segments: int = 0
    seg_wall: int | None = None
    seg_mono: float | None = None

    @property
    def priority(self) -> Priority:
        return Priority(self.item.priority)

    @property
    def steps(self) -> int:
        return len(self.order) * self.item.repeat

    @property
    def variant(self) -> Variant:
        return self.order[self.step % len(self.order)]


def order_variants(variants: list[Variant], languages: list[str]) -> list[Variant]:
    """Variants in ``languages`` order, then untagged ones; all of them if none matches.

    A variant in a language the device does not list is not aired (a Jrai commune does not air
    the Bahnar version), unless no variant matches at all: airing something beats silence.
    """
    langs = list(dict.fromkeys(languages))
    chosen = [v for lang in langs for v in variants if v.lang == lang]
    chosen += [v for v in variants if v.lang is None]
    return chosen or list(variants)


class Arbiter:
    def __init__(self, output: Output, clock: Clock, *, on_ack: AckFn, on_play: PlayFn,
                 languages: list[str] | None = None, amp: Amp | None = None,
                 meter: Meter | None = None, volume: int = 80,
                 resume_rewind_ms: int = 1000,
                 on_change: Callable[[], None] | None = None) -> None:
        self._out = output
        self._clock = clock
        self._on_ack = on_ack
        self._on_play = on_play
        self._on_change = on_change
        self._depth = 0  # nesting of _changes calls
        self.languages = list(languages or ["vi"])
        self._amp = amp
        self._meter = meter
        self.volume = volume
        self.resume_rewind_ms = resume_rewind_ms
        self._seq = itertools.count()
        self._queue: list[_Entry] = []
        self._timed: list[_Entry] = []
        self._current: _Entry | None = None
        self._airing = False  # audio is out (not waiting for the amplifier)

    # --- commands -------------------------------------------------------------------------

    def reserve_seq(self) -> int:
        """An arrival number for an item submitted later (after its preparation): items keep
        the order they arrived in, not the order their preparation finished in."""
        return next(self._seq)

    @_changes
    def submit(self, item: Item) -> None:
        """Accept an item: ``queued`` ack, then it airs when its turn (or ``at``) comes.

        Within a priority, items queue by ``item.seq`` (from :meth:`reserve_seq` when the
        item arrived) or, without one, in the order submitted; ``at`` items due at the same
        instant are released in that order too."""
        _validate(item)
        seq = item.seq if item.seq is not None else next(self._seq)
        entry = _Entry(item, order_variants(item.variants, self.languages), seq)
        if self._expired(entry):
            self._ack(entry, "expired")
            return
        self._ack(entry, "queued")
        if item.at_ms is not None and item.at_ms > self._clock.now_ms() + TOLERANCE_MS:
            self._timed.append(entry)
            self._warm_for_timed()
        else:
            self._queue.append(entry)
        self._schedule()

    @_changes
    def stop_current(self, by: str | None = None) -> str | None:
        """Stop what is airing (or about to, during warm-up); return its id."""
        cur = self._current
        if cur is None:
            return None
        self._stop_current(by)
        self._schedule()
        return cur.item.id

    @_changes
    def stop_id(self, item_id: str, by: str | None = None) -> bool:
        """Stop or remove the item ``item_id`` wherever it is; False when unknown."""
        if self._current is not None and self._current.item.id == item_id:
            self.stop_current(by)
            return True
        for pool in (self._queue, self._timed):
            for entry in pool:
                if entry.item.id == item_id:
                    pool.remove(entry)
                    self._ack(entry, "stopped", detail={"by": by})
                    self._schedule()
                    return True
        return False

    @_changes
    def stop_all(self, by: str | None = None) -> list[str]:
        """Stop the airing item and clear everything waiting; return the ids stopped."""
        ids = []
        if self._current is not None:
            ids.append(self._current.item.id)
            self._stop_current(by)
        for entry in sorted(self._queue + self._timed, key=self._key):
            ids.append(entry.item.id)
            self._ack(entry, "stopped", detail={"by": by})
        self._queue.clear()
        self._timed.clear()
        self._schedule()
        return ids

    @_changes
    def set_volume(self, level: int) -> None:
        """Device volume 0–100: for items without their own, and at once for what airs."""
        self.volume = max(0, min(100, int(level)))
        if self._airing:
            self._call_output(self._out.set_volume, self.volume)

    # --- events and time ------------------------------------------------------------------

    @_changes
    def on_output_event(self, kind: str, detail: dict | None = None) -> None:
        """An event from the audio backend (delivered on the core's thread)."""
        detail = detail or {}
        cur = self._current
        if cur is None or not self._airing or kind not in ("ended", "error"):
            return
        source = detail.get("source")
        if source is not None and source != cur.variant.source:
            return  # a late event about something already stopped
        if kind == "error":
            self._call_output(self._out.stop)
            error = str(detail.get("error", "output error"))
            # a live relay whose whole chain failed reports media_unavailable instead
            reason = str(detail.get("reason") or "audio_fault")
            self._finish("failed", reason, {"error": error})
        else:
            self._advance()
        self._schedule()

    def next_deadline(self) -> float | None:
        """Monotonic seconds at which :meth:`tick` must next run, or None."""
        times = []
        if self._amp is not None:
            times.append(self._amp.next_deadline())
        times.append(self._stream_end())
        warm = self._amp.warm_up_s if self._amp is not None else 0.0
        now_ms = self._clock.now_ms()
        for entry in self._timed:
            times.append(self._mono_at(entry.item.at_ms))
            if entry.item.at_ms - warm * 1000 > now_ms:  # the warm-up has not begun yet
                times.append(self._mono_at(entry.item.at_ms - warm * 1000))
        for entry in self._queue:
            if entry.item.exp_ms is not None:
                times.append(self._mono_at(entry.item.exp_ms))
        times = [t for t in times if t is not None]
        return min(times) if times else None

    @_changes
    def tick(self) -> None:
        """Act on whatever is due: warm-ups, ``at`` starts, stream limits, expiries, amp hold."""
        if self._amp is not None:
            self._amp.tick()
        self._warm_for_timed()
        self._release_timed()
        end = self._stream_end()
        if end is not None and self._clock.monotonic() >= end - 1e-3:
            self._call_output(self._out.stop)
            self._finish("done")
        self._schedule()

    @_changes
    def on_clock_jump(self) -> None:
        """The wall clock was stepped. ``at`` and ``exp`` are wall-clock instants, and
        :meth:`next_deadline` maps them to the monotonic clock from the wall clock *now*: act
        on what the step made due (an ``at`` jumped over starts, an amplifier warming up for
        an ``at`` pushed back is released) and let the caller re-arm its timer."""
        self.tick()

    # --- introspection --------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._current is not None

    def most_urgent(self) -> Priority | None:
        """The most urgent priority of what airs or waits (not timed items), or None."""
        items = [e.item for e in self._queue]
        if self._current is not None:
            items.append(self._current.item)
        found = [p for p in (Priority.parse(i.priority) for i in items) if p is not None]
        return max(found) if found else None

    def snapshot(self) -> dict[str, Any]:
        """What airs and waits, for the ``state`` topic and ``ttcs-agent status``."""
        cur = self._current
        current = None
        if cur is not None:
            current = {"id": cur.item.id, "kind": cur.item.kind, "priority": cur.item.priority,
                       "lang": cur.variant.lang, "step": cur.step, "steps": cur.steps,
                       "airing": self._airing}
        waiting = sorted(self._queue, key=self._key)
        return {"current": current, "volume": self.volume,
                "queue": [{"id": e.item.id, "priority": e.item.priority, "resume": e.front}
                          for e in waiting],
                "timed": [{"id": e.item.id, "at": e.item.at_ms}
                          for e in sorted(self._timed, key=lambda e: e.item.at_ms)]}

    # --- the decision loop ----------------------------------------------------------------

    def _schedule(self) -> None:
        """Bring the world in line with the rules; loops past items that fail to start."""
        while True:
            self._drop_expired()
            cur = self._current
            if cur is not None:
                top = self._peek()
                if top is None or top.priority <= cur.priority:
                    if not self._airing and self._amp_ready() and not self._air():
                        continue
                    return
                self._preempt()
            entry = self._peek()
            if entry is None:
                self._idle()
                return
            self._queue.remove(entry)
            self._current, self._airing = entry, False
            if self._amp is not None:
                self._amp.request_on()
            if self._amp_ready() and not self._air():
                continue
            return

    def _air(self) -> bool:
        """Play the current step; False when the backend refused (the item is then failed)."""
        cur = self._current
        assert cur is not None
        volume = cur.item.volume if cur.item.volume is not None else self.volume
        try:
            self._out.play(cur.variant.source, start_ms=cur.pos_ms, volume=volume)
        except Exception as e:  # noqa: BLE001 - DriverError or worse: never raise into the core
            log.warning("audio output refused %s: %s", cur.item.id, e)
            self._finish("failed", "audio_fault", {"error": str(e)})
            return False
        if not self._airing:
            self._airing = True
            self._open_segment(cur)
        return True

    def _open_segment(self, cur: _Entry) -> None:
        cur.seg_wall, cur.seg_mono = self._clock.now_ms(), self._clock.monotonic()
        if self._meter is not None:
            self._call_quietly(self._meter.begin)
        if not cur.started:
            cur.started = True
            self._ack(cur, "started", detail={"lang": cur.variant.lang})
        else:
            self._ack(cur, "resumed", detail={"position_ms": cur.pos_ms, "step": cur.step})

    def _advance(self) -> None:
        cur = self._current
        assert cur is not None
        cur.step += 1
        cur.pos_ms = 0
        if cur.step >= cur.steps or cur.item.kind == "stream":
            self._finish("done")
        else:
            self._air()

    def _preempt(self) -> None:
        cur = self._current
        assert cur is not None
        if self._airing:
            pos = self._call_output(self._out.stop) or 0
            self._close_segment(cur, "preempted")
            self._ack(cur, "preempted")
            cur.pos_ms = 0 if cur.item.kind == "stream" else max(0, pos - self.resume_rewind_ms)
        cur.front = True
        self._queue.append(cur)
        self._current, self._airing = None, False

    def _stop_current(self, by: str | None) -> None:
        cur = self._current
        assert cur is not None
        if self._airing:
            self._call_output(self._out.stop)
            self._close_segment(cur, "stopped")
        self._ack(cur, "stopped", detail={"by": by})
        self._current, self._airing = None, False

    def _finish(self, result: str, reason: str | None = None, detail: dict | None = None) -> None:
        """End the current item: ``done`` or ``failed`` (record and ack)."""
        cur = self._current
        assert cur is not None
        self._close_segment(cur, result, detail)
        self._ack(cur, result, reason, detail)
        self._current, self._airing = None, False

    def _close_segment(self, cur: _Entry, result: str, detail: dict | None = None) -> None:
        now_mono, now_ms = self._clock.monotonic(), self._clock.now_ms()
        played = round((now_mono - cur.seg_mono) * 1000) if cur.seg_mono is not None else 0
        cur.played_ms += played
        record = {
            "id": cur.item.id, "origin": cur.item.origin, "kind": cur.item.kind,
            "media": [v.media for v in cur.order], "priority": cur.item.priority,
            "started": cur.seg_wall if cur.seg_wall is not None else now_ms, "ended": now_ms,
            "result": result, "played_ms": played,
            "requested_ms": requested_ms(cur.item, cur.order),
            "segment": cur.segments, "repeat": cur.item.repeat,
        }
        if detail:
            record["detail"] = detail
        if self._meter is not None and cur.seg_mono is not None:
            record["verification"] = self._call_quietly(self._meter.end)
        cur.segments += 1
        cur.seg_wall = cur.seg_mono = None
        self._call_quietly(self._on_play, record)

    # --- queue helpers --------------------------------------------------------------------

    @staticmethod
    def _key(entry: _Entry) -> tuple:
        return (entry.priority.order, not entry.front, entry.seq)

    def _peek(self) -> _Entry | None:
        return min(self._queue, key=self._key) if self._queue else None

    def _expired(self, entry: _Entry) -> bool:
        exp = entry.item.exp_ms
        return exp is not None and self._clock.now_ms() >= exp

    def _drop_expired(self) -> None:
        for entry in [e for e in self._queue if self._expired(e)]:
            self._queue.remove(entry)
            self._ack(entry, "expired")

    def _release_timed(self) -> None:
        """Move ``at`` items whose instant has come into the queue, in ``at`` order."""
        now = self._clock.now_ms()
        due = sorted((e for e in self._timed if e.item.at_ms <= now + TOLERANCE_MS),
                     key=lambda e: (e.item.at_ms, e.seq))
        for entry in due:
            self._timed.remove(entry)
            entry.seq = next(self._seq)  # it arrives in its queue now
            self._queue.append(entry)

    def _warm_for_timed(self) -> None:
        if self._amp is not None and self._warming_soon():
            self._amp.request_on()

    def _warming_soon(self) -> bool:
        """An ``at`` item is within its warm-up window (the relay must be on)."""
        if self._amp is None:
            return False
        horizon = self._clock.now_ms() + self._amp.warm_up_s * 1000 + TOLERANCE_MS
        return any(e.item.at_ms <= horizon for e in self._timed)

    def _idle(self) -> None:
        if self._amp is not None and not self._warming_soon():
            self._amp.request_off()

    def _amp_ready(self) -> bool:
        return self._amp is None or self._amp.is_ready()

    def _stream_end(self) -> float | None:
        cur = self._current
        if cur is None or not self._airing or cur.item.kind != "stream" or not cur.item.duration_s:
            return None
        remaining_s = cur.item.duration_s - cur.played_ms / 1000
        return cur.seg_mono + max(0.0, remaining_s)

    def _mono_at(self, wall_ms: float) -> float:
        return self._clock.monotonic() + (wall_ms - self._clock.now_ms()) / 1000

    # --- calls out ------------------------------------------------------------------------

    def _ack(self, entry: _Entry, stage: str, reason: str | None = None,
             detail: dict | None = None) -> None:
        self._call_quietly(self._on_ack, entry.item.id, stage, reason, detail)

    def _call_output(self, fn: Callable, *args: Any) -> Any:
        """stop/set_volume on the backend: a failure is logged; the next play() reports it."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            log.warning("audio output %s failed: %s", fn.__name__, e)
            return None

    @staticmethod
    def _call_quietly(fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a listener's bug must not stop the audio
            log.exception("callback %r failed", fn)
            return None


def _validate(item: Item) -> None:
    if Priority.parse(item.priority) is None:
        raise ValueError(f"priority must be one of {', '.join(Priority)}, not {item.priority!r}")
    if item.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {item.kind!r}")
    if not item.variants:
        raise ValueError("an item needs at least one variant")
    if not 1 <= item.repeat <= 10:
        raise ValueError("repeat must be 1–10")


def requested_ms(item: Item, order: list[Variant]) -> int | None:
    """What an item airing ``order`` asks for: its variants' lengths × ``repeat``, a stream's
    ``duration_s``; None when a length is unknown (a non-WAV file)."""
    if item.kind == "stream":
        return round(item.duration_s * 1000) if item.duration_s else None
    lengths = [v.duration_ms for v in order]
    if any(n is None for n in lengths):
        return None
    return sum(lengths) * item.repeat
