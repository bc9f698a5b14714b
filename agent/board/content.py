"""What the board shows, and when: standing content (SPEC §9) and ad-hoc ``board`` commands.

Plain domain logic: no threads, no I/O, time from an injected :class:`agent.core.clock.Clock`.
The caller (the core) feeds documents and commands in, calls :meth:`BoardContent.update`
whenever something may have changed (at the latest after :meth:`next_deadline_s` seconds) and
publishes what ``update`` returns: board show records (events) and command stages (acks).

Rules:

- Standing content is the union of the documents of the device topic and its group topics;
  each topic's document is replaced only by a higher ``rev`` (no rollback by replay). The
  device's messages come first, then each group's (topics in name order); a message id seen
  twice keeps its first (most specific) definition.
- A standing message is shown only inside its windows (``from``/``until`` dates inclusive,
  ``days``, ``times`` as ``HH:MM-HH:MM`` local times in the device timezone; a window whose end
  is before its start runs over midnight and belongs to the day it starts). Windowed messages
  are held back while the wall clock is untrusted; unwindowed ones always show.
- Active standing messages rotate in turn, each for its document's ``rotate_s``.
- Ad-hoc messages override standing content: highest priority first, and within a priority in
  arrival order (as the audio queue does), except that the text of the audio item on air
  (``front``) goes ahead of the other messages of its priority: it belongs to what airs.
  An ad-hoc message is shown for ``duration_s`` of *display* time: while another covers it,
  its time stands still, and it resumes after.
  Emergency is the highest priority, so it overrides everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent import args as a
from agent.args import DAY_NAMES, Obj, clean_text, problems
from agent.core.clock import Clock
from agent.protocol import Priority

EFFECTS = ("scroll", "static")
MAX_MESSAGES = 100
DEFAULT_ROTATE_S = 10
MAX_ROTATE_S = 3600
DEFAULT_DURATION_S = 300

# HH:MM-HH:MM, 24:00 allowed as an end
_SPAN = r"([01][0-9]|2[0-3]):([0-5][0-9])-(([01][0-9]|2[0-3]):([0-5][0-9])|24:00)"


# --- values handed to the caller ---------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """What the board shows now. ``effect``: scroll | static | auto (standing content)."""

    message_id: str
    text: str
    effect: str
    source: str  # "command" | "standing"
    priority: str
    since_ms: int
    topic: str | None = None  # the document's topic, for standing content
    image: dict | None = None  # {"url", "sha256"}: a page board shows it (``layout``)
    layout: str = "text"

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.source, self.topic, self.message_id)

    def to_dict(self) -> dict:
        d = {
            "id": self.message_id,
            "text": self.text,
            "effect": self.effect,
            "source": self.source,
            "priority": self.priority,
            "since": self.since_ms,
        }
        if self.topic is not None:
            d["topic"] = self.topic
        if self.image is not None:
            d.update(image=self.image, layout=self.layout)
        return d


@dataclass(frozen=True)
class ShowRecord:
    """One completed showing: the board's proof-of-display, published as an event.

    ``result``: done (an ad-hoc message ran its duration), preempted, stopped, rotated (the
    next standing message took its turn), withdrawn (its window closed or its document was
    replaced).
    """

    message_id: str
    text: str
    source: str
    priority: str
    started_ms: int
    ended_ms: int
    result: str
    topic: str | None = None
    image: dict | None = None

    def to_event(self) -> dict:
        event = {
            "type": "board",
            "id": self.message_id,
            "source": self.source,
            "priority": self.priority,
            "text": self.text,
            "started": self.started_ms,
            "ended": self.ended_ms,
            "result": self.result,
        }
        if self.topic is not None:
            event["topic"] = self.topic
        if self.image is not None:
            event["image"] = self.image
        return event


@dataclass(frozen=True)
class CommandStage:
    """An ack stage for an ad-hoc command: queued, started, preempted, resumed, done, stopped."""

    cmd_id: str
    stage: str
    ts_ms: int


@dataclass
class Changes:
    shown: Shown | None
    changed: bool = False
    records: list[ShowRecord] = field(default_factory=list)
    stages: list[CommandStage] = field(default_factory=list)


# --- standing messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class StandingMessage:
    id: str
    text: str
    topic: str
    rotate_s: float
    from_date: date | None = None
    until_date: date | None = None
    days: frozenset[int] | None = None
    times: tuple[tuple[int, int], ...] = ()
    image: dict | None = None
    layout: str = "text"

    @property
    def windowed(self) -> bool:
        return bool(self.from_date or self.until_date or self.days is not None or self.times)

    def active_at(self, local: datetime) -> bool:
        today = local.date()
        if not self.times:
            return self._day_ok(today)
        minute = local.hour * 60 + local.minute
        for start, end in self.times:
            if start < end and start <= minute < end and self._day_ok(today):
                return True
            if (
                start >= end
            ):  # over midnight: the evening part today, the morning part for yesterday
                if minute >= start and self._day_ok(today):
                    return True
                if minute < end and self._day_ok(today - timedelta(days=1)):
                    return True
        return False

    def _day_ok(self, day: date) -> bool:
        if self.days is not None and day.weekday() not in self.days:
            return False
        if self.from_date and day < self.from_date:
            return False
        return not (self.until_date and day > self.until_date)


@dataclass
class _Layer:
    topic: str
    rev: int
    args: dict
    messages: tuple[StandingMessage, ...]


@dataclass
class _AdHoc:
    cmd_id: str
    text: str
    priority: Priority
    effect: str
    remaining_s: float
    seq: int
    started: bool = False
    front: bool = False  # an airing audio item's text: ahead of the rest of its priority
    image: dict | None = None
    layout: str = "text"

    @property
    def order(self) -> tuple[int, bool, int]:
        return (self.priority.order, not self.front, self.seq)


# --- validation ----------------------------------------------------------------------------

PAGE = {"image": a.IMAGE, "layout": a.LAYOUT}  # what page boards show beside or for the text
MESSAGE = Obj(required=("id", "text"), rules=(a.from_until,), fields={
    "id": a.ID, "text": a.BOARD_MESSAGE, **a.WINDOW, **PAGE,
    "rotate_s": a.Int(lo=1, hi=MAX_ROTATE_S),
    "times": a.ListOf(noun="time spans", item=a.Pattern(
        regex=_SPAN, what="a time span HH:MM-HH:MM"))})
DOCUMENT = Obj(required=("messages",), fields={
    "messages": a.ListOf(item=MESSAGE, noun="messages", max=MAX_MESSAGES, unique_by="id"),
    "rotate_s": a.Int(lo=1, hi=MAX_ROTATE_S)})
COMMAND = Obj(required=("text",), fields={
    "text": a.BOARD_MESSAGE, "priority": a.PRIORITY, "duration_s": a.DURATION,
    "effect": a.Choice(choices=EFFECTS), **PAGE})


def validate_document_args(args) -> list[str]:
    """Errors in the args of a ``desired/board`` document (empty list: valid)."""
    return problems(DOCUMENT, args)


def validate_command_args(args) -> list[str]:
    """Errors in the args of a ``board`` command (empty list: valid)."""
    return problems(COMMAND, args)


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _image(args: dict) -> tuple[dict | None, str]:
    """The page image ``{"url", "sha256"}`` (sha256 lower-case) and its layout: ``beside``
    by default with an image, ``text`` without one."""
    image = args.get("image")
    if image is None:
        return None, "text"
    image = {"url": image["url"], "sha256": image["sha256"].lower()}
    return image, args.get("layout", "beside")


def _parse_message(msg: dict, topic: str, rotate_s: float) -> StandingMessage:
    spans = tuple(
        (_minutes(span.split("-")[0]), _minutes(span.split("-")[1]))
        for span in msg.get("times", [])
    )
    days = frozenset(DAY_NAMES.index(d) for d in msg["days"]) if "days" in msg else None
    image, layout = _image(msg)
    return StandingMessage(
        id=msg["id"],
        text=clean_text(msg["text"]),
        topic=topic,
        rotate_s=float(msg.get("rotate_s", rotate_s)),
        image=image,
        layout=layout,
        from_date=date.fromisoformat(msg["from"]) if "from" in msg else None,
        until_date=date.fromisoformat(msg["until"]) if "until" in msg else None,
        days=days,
        times=spans,
    )


def _topic_order(topic: str) -> tuple[int, str]:
    return (0 if topic.startswith("dev/") else 1, topic)


# --- the content model ---------------------------------------------------------------------


class BoardContent:
    """Decides what the board shows. See the module docstring for the rules.

    ``tz``: a zoneinfo name (``device.timezone``). ``trusted``: whether the wall clock can be
    believed (``ClockTrust.trusted``); windowed standing messages wait for it. ``has_image``:
    whether a page image (by sha256) is ready to show; a standing message with an image
    waits for it (by default every image is: boards that show no images show the text).
    """

    def __init__(
        self, clock: Clock, tz: str = "Asia/Ho_Chi_Minh", trusted: Callable[[], bool] | None = None,
        has_image: Callable[[str], bool] | None = None,
    ) -> None:
        try:
            self._tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {tz!r}") from exc
        self._clock = clock
        self._trusted = trusted or (lambda: True)
        self._has_image = has_image or (lambda sha: True)
        self._layers: dict[str, _Layer] = {}
        self._adhoc: list[_AdHoc] = []
        self._seq = 0
        self._pending: list[CommandStage] = []
        self._stopped: set[str] = set()
        self._shown: Shown | None = None
        self._last_mono = clock.monotonic()
        self._rot_key: tuple[str, str] | None = None  # (topic, id) of the standing message in turn
        self._rot_since = 0.0

    # -- inputs --

    def apply_document(self, topic: str, rev: int, args: dict) -> tuple[bool, str]:
        """Replace ``topic``'s standing document if ``rev`` is higher than the one held.

        Returns ``(applied, reason)``; reason is ``applied``, ``stale_rev`` or ``bad_args``.
        Call :meth:`update` afterwards.
        """
        if validate_document_args(args) or isinstance(rev, bool) or not isinstance(rev, int):
            return False, "bad_args"
        held = self._layers.get(topic)
        if held is not None and rev <= held.rev:
            return False, "stale_rev"
        rotate_s = args.get("rotate_s", DEFAULT_ROTATE_S)
        messages = tuple(_parse_message(m, topic, rotate_s) for m in args["messages"])
        self._layers[topic] = _Layer(topic, rev, args, messages)
        return True, "applied"

    def add_message(self, cmd_id: str, args: dict, *, front: bool = False) -> None:
        """Queue an ad-hoc ``board`` command (args already validated). Call :meth:`update`.
        ``front``: the text of the audio item on air, shown at once ahead of the older
        messages of its priority (not above a higher one)."""
        errors = validate_command_args(args)
        if errors:
            raise ValueError("; ".join(errors))
        self._seq += 1
        image, layout = _image(args)
        self._adhoc.append(
            _AdHoc(
                cmd_id=cmd_id,
                text=clean_text(args["text"]),
                priority=Priority(args.get("priority", "normal")),
                effect=args.get("effect", "scroll"),
                remaining_s=float(args.get("duration_s", DEFAULT_DURATION_S)),
                seq=self._seq,
                front=front,
                image=image,
                layout=layout,
            )
        )
        self._adhoc.sort(key=lambda a: a.order)
        self._pending.append(CommandStage(cmd_id, "queued", self._clock.now_ms()))

    def kept(self) -> list[dict]:
        """The ad-hoc messages to keep across a restart, in order (not the text of an audio
        item: that goes with its audio). Each has its ``remaining_s`` of display time; the one
        on show also its ``end``, when that runs out (epoch ms), the others ``end: None``
        (their time stands still while they wait)."""
        now_ms, unpaid = self._clock.now_ms(), self._clock.monotonic() - self._last_mono
        shown = self._shown.message_id if self._shown and self._shown.source == "command" \
            else None
        out = []
        for item in self._adhoc:
            if item.front:
                continue
            on_show = item.cmd_id == shown
            remaining = max(0.0, item.remaining_s - (unpaid if on_show else 0.0))
            out.append({"id": item.cmd_id, "text": item.text, "priority": item.priority,
                        "effect": item.effect, "started": item.started,
                        "remaining_s": round(remaining, 3),
                        "end": now_ms + round(remaining * 1000) if on_show else None,
                        "image": item.image, "layout": item.layout})
        return out

    def restore(self, kept: list[dict]) -> list[str]:
        """Take back messages :meth:`kept` listed before a restart, with the display time they
        had left: the one on show less the time the agent was off (it would have shown: it
        never outlives its ``end``, and is dropped when that has passed), the waiting ones all
        of it. Returns the ids taken back. No ``queued`` stage: they had theirs; a message
        that had started shows again as ``resumed``."""
        now_ms = self._clock.now_ms()
        back = []
        for msg in kept:
            remaining = float(msg["remaining_s"])
            if msg.get("end") is not None:
                remaining = min(remaining, (msg["end"] - now_ms) / 1000)
            if remaining <= 0 or any(a.cmd_id == msg["id"] for a in self._adhoc):
                continue
            self._seq += 1
            self._adhoc.append(_AdHoc(msg["id"], msg["text"], Priority(msg["priority"]),
                                      msg["effect"], remaining, self._seq,
                                      started=bool(msg["started"]), image=msg.get("image"),
                                      layout=msg.get("layout", "text")))
            back.append(msg["id"])
        self._adhoc.sort(key=lambda a: a.order)
        return back

    def remove(self, cmd_id: str) -> bool:
        """Withdraw an ad-hoc message (a ``stop`` by id). Call :meth:`update`."""
        before = len(self._adhoc)
        self._adhoc = [a for a in self._adhoc if a.cmd_id != cmd_id]
        if len(self._adhoc) == before:
            return False
        if self._shown is not None and self._shown.key == ("command", None, cmd_id):
            self._stopped.add(cmd_id)  # its show record ends as "stopped" at the next update
        self._pending.append(CommandStage(cmd_id, "stopped", self._clock.now_ms()))
        return True

    def clear_commands(self) -> list[str]:
        """Withdraw every ad-hoc message (a ``stop`` with ``all``); returns their ids."""
        ids = [a.cmd_id for a in self._adhoc]
        for cmd_id in ids:
            self.remove(cmd_id)
        return ids

    # -- outputs --

    def current(self) -> Shown | None:
        """What the last :meth:`update` decided to show (None: a blank board)."""
        return self._shown

    def update(self) -> Changes:
        """Advance time, decide what to show, and return what changed since the last call."""
        now_mono = self._clock.monotonic()
        changes = Changes(shown=self._shown, stages=self._pending)
        self._pending = []
        finished = self._account(now_mono)
        target = self._target(now_mono)
        held = self._shown.key if self._shown is not None else None
        if (target[0] if target is not None else None) == held:
            return changes
        self._switch(target, finished, changes)
        return changes

    def next_deadline_s(self) -> float:
        """Seconds until :meth:`update` may change something without any new input."""
        now = self._clock.monotonic()
        waits = [60.0 - (self._clock.now_ms() / 1000.0) % 60.0]  # windows move by the minute
        shown = self._shown
        if shown and shown.source == "command" and self._adhoc:
            waits.append(self._adhoc[0].remaining_s - (now - self._last_mono))
        elif shown and shown.source == "standing" and self._rot_key:
            msg = self._find_standing(self._rot_key)
            if msg is not None:
                waits.append(msg.rotate_s - (now - self._rot_since))
        return max(0.0, min(waits))

    def snapshot(self) -> dict:
        """For the ``state`` topic: what is shown, document revisions, the ad-hoc queue."""
        return {
            "showing": self._shown.to_dict() if self._shown else None,
            "documents": {
                t: {"rev": layer.rev, "messages": len(layer.messages)}
                for t, layer in sorted(self._layers.items())
            },
            "queue": [
                {"id": a.cmd_id, "priority": a.priority, "remaining_s": round(a.remaining_s, 1)}
                for a in self._adhoc
            ],
        }

    def documents(self) -> dict[str, dict]:
        """The documents held, ``{topic: {"rev", "args"}}``: persist these to show standing
        content after a restart before the broker re-delivers them."""
        return {t: {"rev": layer.rev, "args": layer.args} for t, layer in self._layers.items()}

    # -- internals --

    def _account(self, now_mono: float) -> set[str]:
        """Charge display time to the ad-hoc message on show; return the ids that finished."""
        elapsed, self._last_mono = now_mono - self._last_mono, now_mono
        shown = self._shown
        if not shown or shown.source != "command":
            return set()
        finished = set()
        for item in self._adhoc:
            if item.cmd_id == shown.message_id:
                item.remaining_s -= elapsed
                if item.remaining_s <= 1e-9:
                    finished.add(item.cmd_id)
        self._adhoc = [a for a in self._adhoc if a.cmd_id not in finished]
        return finished

    def _standing(self) -> list[StandingMessage]:
        seen: set[str] = set()
        union = []
        for topic in sorted(self._layers, key=_topic_order):
            for msg in self._layers[topic].messages:
                if msg.id not in seen:
                    seen.add(msg.id)
                    union.append(msg)
        return union

    def _find_standing(self, key: tuple[str, str]) -> StandingMessage | None:
        return next((m for m in self._standing() if (m.topic, m.id) == key), None)

    def _active(self) -> tuple[list[StandingMessage], list[StandingMessage]]:
        union = self._standing()
        local = datetime.fromtimestamp(self._clock.now_ms() / 1000.0, self._tz)
        trusted = self._trusted()
        active = [m for m in union if (trusted or not m.windowed) and m.active_at(local)
                  and (m.image is None or self._has_image(m.image["sha256"]))]
        return union, active

    def _target(self, now_mono: float):
        """``(key, payload)`` of what should show now, or None for a blank board."""
        if self._adhoc:
            item = self._adhoc[0]
            return ("command", None, item.cmd_id), item
        msg = self._standing_turn(now_mono)
        if msg is None:
            return None
        return ("standing", msg.topic, msg.id), msg

    def _standing_turn(self, now_mono: float) -> StandingMessage | None:
        union, active = self._active()
        if not active:
            self._rot_key = None
            return None
        keys = [(m.topic, m.id) for m in active]
        showing_standing = self._shown is not None and self._shown.source == "standing"
        if self._rot_key in keys:
            msg = active[keys.index(self._rot_key)]
            if not showing_standing:  # back from an override: its turn starts afresh
                self._rot_since = now_mono
                return msg
            if now_mono - self._rot_since < msg.rotate_s:
                return msg
            nxt = active[(keys.index(self._rot_key) + 1) % len(active)]
        else:
            nxt = self._after(union, active)
        self._rot_key, self._rot_since = (nxt.topic, nxt.id), now_mono
        return nxt

    def _after(
        self, union: list[StandingMessage], active: list[StandingMessage]
    ) -> StandingMessage:
        """The first active message after the one whose turn it was (in the union order)."""
        order = [(m.topic, m.id) for m in union]
        if self._rot_key not in order:
            return active[0]
        position = order.index(self._rot_key)
        later = [m for m in active if order.index((m.topic, m.id)) > position]
        return later[0] if later else active[0]

    def _switch(self, target, finished: set[str], changes: Changes) -> None:
        now_ms = self._clock.now_ms()
        prev = self._shown
        if prev is not None:
            result = self._end_result(prev, finished, target)
            changes.records.append(ShowRecord(prev.message_id, prev.text, prev.source,
                                              prev.priority, prev.since_ms, now_ms, result,
                                              prev.topic, prev.image))
            if prev.source == "command" and result in ("done", "preempted"):
                changes.stages.append(CommandStage(prev.message_id, result, now_ms))
        self._shown = self._shown_for(target, now_ms, changes) if target else None
        changes.shown = self._shown
        changes.changed = True

    def _end_result(self, prev: Shown, finished: set[str], target) -> str:
        if prev.source == "command":
            if prev.message_id in finished:
                return "done"
            if prev.message_id in self._stopped:
                self._stopped.discard(prev.message_id)
                return "stopped"
            return "preempted"
        if target is not None and target[0][0] == "command":
            return "preempted"
        if target is not None and self._find_standing((prev.topic, prev.message_id)):
            _, active = self._active()
            if any((m.topic, m.id) == (prev.topic, prev.message_id) for m in active):
                return "rotated"
        return "withdrawn"

    def _shown_for(self, target, now_ms: int, changes: Changes) -> Shown:
        (source, topic, _), item = target
        if source == "command":
            changes.stages.append(
                CommandStage(item.cmd_id, "resumed" if item.started else "started", now_ms)
            )
            item.started = True
            return Shown(item.cmd_id, item.text, item.effect, "command", item.priority, now_ms,
                         image=item.image, layout=item.layout)
        return Shown(item.id, item.text, "auto", "standing", "normal", now_ms, topic,
                     image=item.image, layout=item.layout)
