"""The offline schedule (SPEC §8): validation, per-topic documents, slots and the planner.

Plain, thread-free code. Every method takes the wall time in epoch milliseconds (or reads the
injected clock), so tests drive weeks of schedule without sleeping.

Local times are resolved with zoneinfo in the item's timezone (default: the device's), with
``fold=0``. What that means on DST days (Vietnam has none; Europe/Berlin is the test case):

- a time that does not exist (spring forward: 02:30 on the last Sunday of March) airs at the
  instant it would have had without the change, 02:30 CET = 03:30 CEST: late, never lost;
- a time that exists twice (fall back: 02:30 on the last Sunday of October) airs once, at its
  first occurrence (CEST).

A slot's key names its topic, item, local date and local time, not its instant, so it is the
same whatever the offset, and the slot log (agent.schedule.store.SlotLog) keyed by it makes
sure no slot airs twice across restarts, repeated calls and clock jumps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent import args as a
from agent.args import DAY_NAMES, Obj, parse_date, problems
from agent.core.clock import Clock
from agent.protocol import Priority
from agent.schedule.store import AIRED, SKIPPED, SlotLog

__all__ = [
    "DueResult", "MediaAlert", "ScheduleBook", "ScheduleDoc", "ScheduleItem", "SchedulePlanner",
    "Slot", "local_to_ms", "parse_item", "validate_schedule_args", "zone_or_none",
]

log = logging.getLogger(__name__)

MAX_ITEMS = 500
MAX_TIMES = 48
MAX_DATES = 366

DAY_MS = 86_400_000
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
# How far back the planner looks for missed slots (and reports them as skipped).
MAX_LOOKBACK_MS = DAY_MS
# How far ahead next_deadline_ms / next slots look.
HORIZON_MS = 400 * DAY_MS
# A wall clock before this (2024-01-01 UTC) is not believed even if called trusted: a board
# without RTC that boots at 1970 must not mark slots as aired or skipped.
MIN_PLAUSIBLE_MS = 1_704_067_200_000

_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_TZ_RE = re.compile(r"[A-Za-z0-9_+-]{1,30}(/[A-Za-z0-9_+-]{1,30}){0,2}")
_TOPIC_RE = re.compile(r"(dev|grp)/[A-Za-z0-9._-]{1,64}")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- validation ------------------------------------------------------------------------------

ITEM = Obj(
    required=("id", "times"),
    fields={
        "id": a.ID,
        "media": a.MEDIA,
        "live": a.Either(short=a.STREAM_URL, full=Obj(
            shape="{url, backups?, fallback?}", required=("url",), fields=a.LIVE)),
        "say": a.Either(short=a.SAY_TEXT, full=Obj(
            shape="{text, lang?}", required=("text",),
            fields={"text": a.SAY_TEXT, "lang": a.LANG})),
        **a.WINDOW,
        "dates": a.ListOf(item=a.DATE, noun="dates", min=1, max=MAX_DATES, unique=True),
        "times": a.ListOf(item=a.Pattern(regex=_TIME_RE.pattern, what="a time HH:MM"),
                          noun="times", min=1, max=MAX_TIMES, unique=True),
        "timezone": a.Parsed(parse=lambda name: zone_or_none(name),  # defined below
                             what="a timezone name such as 'Asia/Ho_Chi_Minh'"),
        "priority": a.PRIORITY,
        "volume": a.VOLUME,
        "duration_s": a.DURATION,
        "catch_up_s": a.Int(lo=0, hi=86_400),
        "repeat": a.REPEAT,
        "board_text": a.BOARD_TEXT,  # shown on the board while the slot airs
    },
    rules=(a.exactly_one("media", "live", "say"), a.exactly_one("days", "dates"),
           a.required_with("duration_s", "live", "a live item"), a.from_until),
)
DOCUMENT = Obj(required=("items",), fields={
    "items": a.ListOf(item=ITEM, noun="items", max=MAX_ITEMS, unique_by="id")})


def validate_schedule_args(args: object) -> list[str]:
    """All problems of a schedule document's ``args``, each as ``key.path: what is wrong``:
    the document's own keys as ``args.key``, and from the item list down as docs/SCHEDULE.md
    shows them, ``items[3].times[0]``.

    Never raises, whatever ``args`` is; an empty list means valid.
    """
    return [p.removeprefix("args.") if p.startswith(("args.items:", "args.items[")) else p
            for p in problems(DOCUMENT, args)]


def _parse_time(value: object) -> time | None:
    m = _TIME_RE.fullmatch(value) if isinstance(value, str) else None
    return time(int(m.group(1)), int(m.group(2))) if m else None


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zone_or_none(name: object) -> ZoneInfo | None:
    """The zone named ``name``, or None if it is not a known zoneinfo name."""
    if not (isinstance(name, str) and _TZ_RE.fullmatch(name)):
        return None
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


# --- items and documents ---------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleItem:
    """One validated item. ``action`` is normalised: media -> list of {url, sha256, lang?};
    live -> {url, backups: [...], fallback: [media...] | None}; say -> {text, lang?}."""

    id: str
    index: int  # position in its document: order among items due together
    kind: str  # "media" | "live" | "say"
    action: Any
    times: tuple[time, ...]
    days: frozenset[int] | None  # weekday numbers, Monday = 0
    dates: tuple[date, ...] | None  # sorted
    from_date: date | None
    until_date: date | None
    timezone: str
    priority: Priority = Priority.NORMAL
    volume: int | None = None
    duration_s: int | None = None
    catch_up_s: int | None = None  # None: the planner's default
    repeat: int = 1
    board_text: str | None = None  # on the board while a slot airs

    def dates_between(self, first: date, last: date) -> Iterator[date]:
        """Local dates in [first, last] on which the item airs."""
        if self.from_date and self.from_date > first:
            first = self.from_date
        if self.until_date and self.until_date < last:
            last = self.until_date
        if self.dates is not None:
            yield from (d for d in self.dates if first <= d <= last)
            return
        day = first
        while day <= last:
            if day.weekday() in self.days:
                yield day
            day += timedelta(days=1)

    def media_refs(self) -> list[tuple[str, str]]:
        """(url, sha256) of every file the item may need: language variants, live fallback."""
        if self.kind == "media":
            variants = self.action
        elif self.kind == "live":
            variants = self.action["fallback"] or []
        else:
            variants = []
        return [(m["url"], m["sha256"].lower()) for m in variants]


def _media_list(value: Any) -> list[dict]:
    return list(value) if isinstance(value, list) else [value]


def _normalise_action(raw: dict) -> tuple[str, Any]:
    if "media" in raw:
        return "media", _media_list(raw["media"])
    if "live" in raw:
        live = raw["live"]
        if isinstance(live, str):
            live = {"url": live}
        fallback = _media_list(live["fallback"]) if "fallback" in live else None
        return "live", {"url": live["url"], "backups": list(live.get("backups", [])),
                        "fallback": fallback}
    say = raw["say"]
    return "say", dict(say) if isinstance(say, dict) else {"text": say}


def parse_item(raw: dict, index: int, default_timezone: str) -> ScheduleItem:
    """Build an item from a dict that passed :func:`validate_schedule_args`."""
    kind, action = _normalise_action(raw)
    days = frozenset(DAY_NAMES.index(d) for d in raw["days"]) if "days" in raw else None
    dates = tuple(sorted({parse_date(d) for d in raw["dates"]})) if "dates" in raw else None
    return ScheduleItem(
        id=raw["id"], index=index, kind=kind, action=action,
        times=tuple(sorted(_parse_time(t) for t in raw["times"])),
        days=days, dates=dates,
        from_date=parse_date(raw.get("from")), until_date=parse_date(raw.get("until")),
        timezone=raw.get("timezone", default_timezone),
        priority=Priority(raw.get("priority", "normal")), volume=raw.get("volume"),
        duration_s=raw.get("duration_s"), catch_up_s=raw.get("catch_up_s"),
        repeat=raw.get("repeat", 1), board_text=raw.get("board_text"),
    )


@dataclass(frozen=True)
class ScheduleDoc:
    topic: str
    rev: int
    items: tuple[ScheduleItem, ...]
    received_ms: int = 0
    kid: str | None = None


@dataclass(frozen=True)
class Slot:
    """One airing of one item: ``key`` is stable across restarts and clock offsets."""

    key: str
    topic: str
    item_id: str
    due_ms: int
    item: ScheduleItem = field(repr=False, compare=False)
    priority: Priority = Priority.NORMAL

    @property
    def source(self) -> str:
        """The namespaced item id for play records: ``grp/krongpa:news``."""
        return f"{self.topic}:{self.item_id}"


def local_to_ms(day: date, at: time, tz: ZoneInfo) -> int:
    """Epoch ms of local ``day`` ``at`` in ``tz``; fold=0 (see the module doc for DST)."""
    return (datetime.combine(day, at, tzinfo=tz) - _EPOCH) // timedelta(milliseconds=1)


def _local_naive(ms: int, tz: ZoneInfo) -> datetime:
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(tz).replace(tzinfo=None)


# Wider than any UTC offset change (DST is 1 h, 2 h at most): local wall times outside the
# window widened by this cannot fall inside it, so they are not converted at all.
_LOCAL_MARGIN = timedelta(hours=3)


def _item_slots(topic: str, item: ScheduleItem, start_ms: int, end_ms: int) -> Iterator[Slot]:
    tz = _zone(item.timezone)
    lo = _local_naive(start_ms, tz) - _LOCAL_MARGIN
    hi = _local_naive(end_ms, tz) + _LOCAL_MARGIN
    for day in item.dates_between(lo.date(), hi.date()):
        for at in item.times:
            if not lo <= datetime.combine(day, at) <= hi:
                continue  # cheap naive test first: zoneinfo conversion is the costly part
            due = local_to_ms(day, at, tz)
            if start_ms <= due < end_ms:
                key = f"{topic}:{item.id}@{day.isoformat()}T{at.strftime('%H:%M')}"
                yield Slot(key, topic, item.id, due, item, item.priority)


def _order(slot: Slot) -> tuple:
    return (slot.due_ms, slot.priority.order, slot.topic, slot.item.index)


class ScheduleBook:
    """The last applied document of each topic; the effective schedule is their union."""

    def __init__(self, default_timezone: str = "Asia/Ho_Chi_Minh") -> None:
        if zone_or_none(default_timezone) is None:
            raise ValueError(f"unknown timezone {default_timezone!r}")
        self.default_timezone = default_timezone
        self._docs: dict[str, ScheduleDoc] = {}

    def apply(
        self, topic: str, rev: object, args: object, *, received_ms: int = 0,
        kid: str | None = None,
    ) -> tuple[bool, str]:
        """Apply a verified document: (applied, reason). Reasons: ``applied``, ``cleared``
        (empty items), ``stale_rev`` (rev not above the current one: no rollback by replay),
        ``bad_topic``, ``bad_rev``, ``bad_args: ...``."""
        if not (isinstance(topic, str) and _TOPIC_RE.fullmatch(topic)):
            return False, "bad_topic"
        if not (a.is_int(rev) and rev >= 0):
            return False, "bad_rev"
        current = self._docs.get(topic)
        if current is not None and rev <= current.rev:
            return False, "stale_rev"
        errors = validate_schedule_args(args)
        if errors:
            more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
            return False, "bad_args: " + "; ".join(errors[:5]) + more
        items = tuple(parse_item(raw, i, self.default_timezone)
                      for i, raw in enumerate(args["items"]))
        self._docs[topic] = ScheduleDoc(topic, rev, items, received_ms, kid)
        return True, "applied" if items else "cleared"

    def document(self, topic: str) -> ScheduleDoc | None:
        return self._docs.get(topic)

    def revisions(self) -> dict[str, int]:
        return {t: d.rev for t, d in sorted(self._docs.items())}

    def items(self) -> Iterator[tuple[str, ScheduleItem]]:
        for topic in sorted(self._docs):
            for item in self._docs[topic].items:
                yield topic, item

    def slots_between(self, start_ms: int, end_ms: int) -> list[Slot]:
        """Slots due in [start_ms, end_ms), by time, then priority, then document order."""
        slots = [s for topic, item in self.items()
                 for s in _item_slots(topic, item, start_ms, end_ms)]
        return sorted(slots, key=_order)

    def iter_slots(self, start_ms: int, horizon_ms: int = HORIZON_MS) -> Iterator[Slot]:
        """Slots from start_ms on, in order, in widening windows up to ``horizon_ms`` ahead."""
        lo, span = start_ms, HOUR_MS
        while lo < start_ms + horizon_ms:
            hi = min(lo + span, start_ms + horizon_ms)
            yield from self.slots_between(lo, hi)
            lo, span = hi, span * 4

    def next_slots(self, now_ms: int, n: int) -> list[Slot]:
        """The next ``n`` slots due at or after now."""
        out: list[Slot] = []
        for slot in self.iter_slots(now_ms):
            if len(out) >= n:
                break
            out.append(slot)
        return out


# --- planner ---------------------------------------------------------------------------------

@dataclass
class DueResult:
    due: list[Slot]  # air these now, by priority then time then document order
    skipped: list[Slot]  # missed beyond their catch-up: the caller logs them
    held: bool = False  # the clock is not trusted: nothing airs, the caller raises clock_untrusted


@dataclass(frozen=True)
class MediaAlert:
    source: str  # topic:item-id
    due_ms: int  # the first slot within the lead time
    missing: tuple[tuple[str, str], ...]  # (url, sha256) not in the cache


class SchedulePlanner:
    """Decides which slots are due, exactly once each, and persists that in a SlotLog.

    A slot more than its catch-up (``catch_up_s``, else ``catch_up_default``, but at least
    ``grace_s`` so a slightly late timer never skips) past its time is skipped, not aired.
    Missed slots are looked for back to the last decision (``checked_until_ms``), at most a day.
    """

    def __init__(
        self, book: ScheduleBook, clock: Clock, *, catch_up_default: int = 0,
        log: SlotLog | None = None, grace_s: int = 60, min_plausible_ms: int = MIN_PLAUSIBLE_MS,
    ) -> None:
        self.book = book
        self.clock = clock
        self.catch_up_default = catch_up_default
        self.log = log if log is not None else SlotLog()
        self.grace_ms = grace_s * 1000
        self.min_plausible_ms = min_plausible_ms
        self.last_jump: tuple[int, int] | None = None

    def _now(self, now_ms: int | None) -> int:
        return self.clock.now_ms() if now_ms is None else now_ms

    def allowance_ms(self, item: ScheduleItem) -> int:
        catch_up = item.catch_up_s if item.catch_up_s is not None else self.catch_up_default
        return max(catch_up * 1000, self.grace_ms)

    def _scan_start(self, now: int) -> int:
        widest = max((self.allowance_ms(i) for _, i in self.book.items()), default=self.grace_ms)
        lo = now - widest
        checked = self.log.checked_until_ms
        if checked is not None and checked < lo:
            lo = max(checked, now - MAX_LOOKBACK_MS)  # report what was missed since
        return lo

    def due(self, now_ms: int | None = None, trusted: bool = False) -> DueResult:
        """Slots to air now. Call on every timer tick and after any change (document applied,
        clock trusted, clock jump). Each slot is returned once, ever."""
        now = self._now(now_ms)
        if not trusted or now < self.min_plausible_ms:
            return DueResult([], [], held=True)
        due: list[Slot] = []
        skipped: list[Slot] = []
        for slot in self.book.slots_between(self._scan_start(now), now + 1):
            if slot.key in self.log:
                continue
            if now - slot.due_ms <= self.allowance_ms(slot.item):
                due.append(slot)
                self.log.mark(slot.key, slot.due_ms, AIRED)
            else:
                skipped.append(slot)
                self.log.mark(slot.key, slot.due_ms, SKIPPED)
        self.log.checked_until_ms = now
        if due or skipped:
            self.log.prune(now)
            self.log.save()  # before the caller airs anything: a crash must not air it twice
        due.sort(key=lambda s: (s.priority.order, s.due_ms, s.topic, s.item.index))
        return DueResult(due, skipped)

    def upcoming(self, now_ms: int | None = None) -> Iterator[Slot]:
        """Undecided slots due after now, in order (after a backward jump, slots already
        aired in the repeated interval are left out)."""
        now = self._now(now_ms)
        return (s for s in self.book.iter_slots(now + 1) if s.key not in self.log)

    def next_deadline_ms(self, now_ms: int | None = None) -> int | None:
        """When to call :meth:`due` next for the next slot, or None if nothing is scheduled
        within the horizon."""
        return next((s.due_ms for s in self.upcoming(now_ms)), None)

    def on_clock_jump(self, old_ms: int, new_ms: int) -> None:
        """The wall clock stepped from old_ms to new_ms. The next :meth:`due` re-plans:

        - forward: slots in the jumped-over interval are missed; they air if within their
          catch-up, else they are skipped (reported). If nothing was ever decided, the old
          time (when plausible) becomes the point from which misses are reported;
        - backward: slots already aired or skipped in the repeated interval are in the slot
          log and are not aired again.
        """
        self.last_jump = (old_ms, new_ms)
        log.info("schedule: clock jump %+d ms", new_ms - old_ms)
        if (new_ms > old_ms and self.log.checked_until_ms is None
                and old_ms >= self.min_plausible_ms):
            self.log.checked_until_ms = old_ms

    def media_needed(self, now_ms: int | None = None, days: int = 7) -> set[tuple[str, str]]:
        """(url, sha256) of media for slots in the next ``days`` days: prefetch these."""
        now = self._now(now_ms)
        needed: set[tuple[str, str]] = set()
        for _, item in self.book.items():
            tz = _zone(item.timezone)
            first = _local_naive(now, tz).date()
            last = _local_naive(now + days * DAY_MS, tz).date()
            # whole local days: a few hours too much at the edges is harmless for a prefetch
            if next(item.dates_between(first, last), None) is not None:
                needed.update(item.media_refs())
        return needed

    def missing_media_alerts(
        self, now_ms: int | None, have: set[str], lead_s: int,
    ) -> list[MediaAlert]:
        """Items with a slot within ``lead_s`` whose media (by sha256) is not cached; the
        caller raises ``media_unavailable`` for them."""
        now = self._now(now_ms)
        have_lower = {h.lower() for h in have}
        alerts: dict[str, MediaAlert] = {}
        for slot in self.book.slots_between(now, now + lead_s * 1000 + 1):
            if slot.key in self.log or slot.source in alerts:
                continue
            missing = tuple(r for r in slot.item.media_refs() if r[1] not in have_lower)
            if missing:
                alerts[slot.source] = MediaAlert(slot.source, slot.due_ms, missing)
        return list(alerts.values())

    def snapshot(self, now_ms: int | None = None) -> dict:
        """For the state topic: revisions per topic and the next item."""
        nxt = next(self.upcoming(now_ms), None)
        return {
            "revisions": self.book.revisions(),
            "next": None if nxt is None else {
                "id": nxt.source, "due": nxt.due_ms, "priority": nxt.priority,
            },
        }
