"""Argument schema: one rule per field for command arguments, schedule items and board content.

Each rule is defined once here and used by the audio commands (:mod:`agent.audio.commands`),
the schedule (:mod:`agent.schedule.model`) and the board (:mod:`agent.board.content`), so the
same value gets the same verdict and the same words wherever it comes in: a ``say`` text is
checked alike as a command argument and inside a schedule item, a priority alike for audio and
the board.

The rules are the config schema's classes (:mod:`agent.config`): a rule is a
:class:`~agent.config.Field` whose ``check(value, path, errors)`` appends ``(path, what)`` for
each problem, and an object is an :class:`Obj`, a :class:`~agent.config.Section` that takes
only the keys given and refuses unknown ones with the config's "unknown key (did you mean
'x'?)". :func:`problems` returns the lines ``path: what`` (``args.volume: must be an integer
0–100``); an empty list means valid. Nothing here raises, whatever the input.
See docs/ARCHITECTURE.md, "Argument schema".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from agent.config import Field, Section, did_you_mean, type_name
from agent.protocol import CMD_ID_RE, Priority

Problems = list[tuple[str, str]]
Rule = Callable[[dict, str, Problems], None]  # a check across the keys of one object

MAX_URL = 2048
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def clean_text(text: str) -> str:
    """NFC, white space folded: the form a board shows, records and compares."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def problems(rule: Field, value: Any, path: str = "args") -> list[str]:
    """Every problem of ``value`` under ``rule`` as ``path: what`` (empty: valid)."""
    errors: Problems = []
    rule.check(value, path, errors)
    return [f"{p}: {what}" for p, what in errors]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- rules -----------------------------------------------------------------------------------

@dataclass
class Int(Field):
    """An integer from ``lo`` to ``hi``; durations, volumes and counts (v1 is float-free)."""

    lo: int = 0
    hi: int = 0

    def check(self, value, path, errors):
        if not (is_int(value) and self.lo <= value <= self.hi):
            errors.append((path, f"must be an integer {self.lo}–{self.hi}"))
        return value


@dataclass
class Choice(Field):
    """One of a few words."""

    choices: tuple[str, ...] = ()

    def check(self, value, path, errors):
        if isinstance(value, str) and value in self.choices:
            return value
        given = f"{value!r}{did_you_mean(value, self.choices)}" if isinstance(value, str) \
            else type_name(value)
        errors.append((path, f"must be one of {', '.join(self.choices)}, not {given}"))
        return value


@dataclass
class IsTrue(Field):
    def check(self, value, path, errors):
        if value is not True:
            errors.append((path, "must be true"))
        return value


@dataclass
class Pattern(Field):
    """A string matching ``regex`` as a whole; ``what`` names it in the message."""

    regex: str = ""
    what: str = ""

    def check(self, value, path, errors):
        if not (isinstance(value, str) and re.fullmatch(self.regex, value)):
            errors.append((path, f"must be {self.what}"))
        return value


@dataclass
class At(Field):
    """An instant in epoch milliseconds, at most ``ahead_days`` after ``now_ms`` when that is
    known."""

    now_ms: int | None = None
    ahead_days: int = 7

    def check(self, value, path, errors):
        limit = 2**53 if self.now_ms is None else self.now_ms + self.ahead_days * 86_400_000
        if not (is_int(value) and 0 <= value <= limit):
            errors.append((path, f"must be epoch milliseconds, at most {self.ahead_days} days "
                                 "ahead"))
        return value


@dataclass
class Parsed(Field):
    """A value that ``parse`` makes sense of (returns other than None); ``what`` names it."""

    parse: Callable[[object], object] = lambda value: value
    what: str = ""

    def check(self, value, path, errors):
        if self.parse(value) is None:
            errors.append((path, f"must be {self.what}"))
        return value


def parse_date(value: object) -> date | None:
    """The date a ``YYYY-MM-DD`` string names, or None."""
    if not (isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value)):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


@dataclass
class Text(Field):
    """A non-empty text of at most ``max_len`` characters, counted after Unicode NFC
    normalisation and without the white space around it (``fold``: white space inside folded
    too, as a board stores it)."""

    max_len: int = 0
    fold: bool = False

    def check(self, value, path, errors):
        if isinstance(value, str):
            text = clean_text(value) if self.fold else unicodedata.normalize("NFC", value).strip()
            if 0 < len(text) <= self.max_len:
                return value
        errors.append((path, f"must be a non-empty text of at most {self.max_len} characters"))
        return value


@dataclass
class Url(Field):
    """An absolute URL with one of ``schemes`` and a host, at most 2048 characters, without
    white space or control characters."""

    schemes: tuple[str, ...] = ("http", "https")

    def check(self, value, path, errors):
        if not self.ok(value):
            names = ", ".join(self.schemes[:-1]) + f" or {self.schemes[-1]}"
            errors.append((path, f"must be an {names} URL of at most {MAX_URL} characters"))
        return value

    def ok(self, value: object) -> bool:
        if not (isinstance(value, str) and 0 < len(value) <= MAX_URL):
            return False
        if any(c.isspace() or ord(c) < 32 for c in value):
            return False
        try:
            parts = urlsplit(value)
            return parts.scheme.lower() in self.schemes and bool(parts.hostname)
        except ValueError:  # e.g. a broken [IPv6] host
            return False


@dataclass
class ListOf(Field):
    """A list of ``min``–``max`` entries (no upper limit when ``max`` is None), each checked by
    ``item``. ``unique``: no entry twice; ``unique_by``: no two object entries with the same
    value of that key."""

    item: Field = field(default_factory=Field)
    noun: str = "entries"
    min: int = 0
    max: int | None = None
    unique: bool = False
    unique_by: str | None = None

    def check(self, value, path, errors):
        too_many = self.max is not None and isinstance(value, list) and len(value) > self.max
        if not isinstance(value, list) or len(value) < self.min or too_many:
            errors.append((path, f"must be a list of {self._size()}{self.noun}"))
            return value
        good: list = []
        seen: set[str] = set()
        for i, entry in enumerate(value):
            own: Problems = []
            self.item.check(entry, f"{path}[{i}]", own)
            errors += own
            if self.unique and not own:
                good.append(entry)
            key = entry.get(self.unique_by) if self.unique_by and isinstance(entry, dict) else None
            if isinstance(key, str):
                if key in seen:
                    errors.append((f"{path}[{i}].{self.unique_by}",
                                   f"duplicate {self.unique_by} {key!r}"))
                seen.add(key)
        if len(set(good)) != len(good):
            errors.append((path, "has duplicates"))
        return value

    def _size(self) -> str:
        if self.max is None:
            return ""
        return f"{self.min}–{self.max} " if self.min else f"at most {self.max} "


class OneOrList(ListOf):
    """One entry, or a list of them (a media file, or its language variants)."""

    def check(self, value, path, errors):
        if isinstance(value, list):
            return super().check(value, path, errors)
        return self.item.check(value, path, errors)


@dataclass
class Obj(Section):
    """A JSON object: only the keys of ``fields`` (unknown ones are problems, with a "did you
    mean"), ``required`` ones present, then each of ``rules`` across keys. ``shape`` sketches
    it for the message when the value is not an object at all."""

    shape: str = ""
    rules: tuple[Rule, ...] = ()
    sparse: bool = True

    def check(self, value, path, errors):
        if not isinstance(value, dict):
            errors.append((path, f"must be an object{' ' if self.shape else ''}{self.shape}"))
            return value
        out = super().check(value, path, errors)
        for rule in self.rules:
            rule(value, path, errors)
        return out


@dataclass
class Either(Field):
    """An object, or a short form of it (a URL for a live source, a text for speech)."""

    short: Field = field(default_factory=Field)
    full: Obj = field(default_factory=Obj)

    def check(self, value, path, errors):
        return (self.full if isinstance(value, dict) else self.short).check(value, path, errors)


# --- rules across keys -------------------------------------------------------------------------

def exactly_one(*keys: str) -> Rule:
    def rule(obj: dict, path: str, errors: Problems) -> None:
        if sum(k in obj for k in keys) != 1:
            errors.append((path, f"must have exactly one of {', '.join(keys)}"))
    return rule


def at_most_one(*keys: str) -> Rule:
    def rule(obj: dict, path: str, errors: Problems) -> None:
        if sum(k in obj for k in keys) > 1:
            errors.append((path, f"must have at most one of {', '.join(keys)}"))
    return rule


def required_with(key: str, trigger: str, what: str) -> Rule:
    """``key`` must be given when ``trigger`` is (``what`` names such an object)."""
    def rule(obj: dict, path: str, errors: Problems) -> None:
        if trigger in obj and key not in obj:
            errors.append((f"{path}.{key}", f"is required for {what}"))
    return rule


def from_until(obj: dict, path: str, errors: Problems) -> None:
    """A ``from``/``until`` window (dates, both inclusive) must not end before it starts."""
    start, end = parse_date(obj.get("from")), parse_date(obj.get("until"))
    if start and end and start > end:
        errors.append((f"{path}.until", "must not be before from"))


# --- the fields, once ------------------------------------------------------------------------

PRIORITY = Choice(choices=tuple(p.value for p in Priority))
VOLUME = Int(lo=0, hi=100)
REPEAT = Int(lo=1, hi=10)
DURATION = Int(lo=1, hi=86_400)  # duration_s: a day at most
ID = Pattern(regex=CMD_ID_RE.pattern, what="1–64 of [A-Za-z0-9._:-]")
LANG = Pattern(regex=r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,2}", what="a language tag such as 'vi'")
SHA256 = Pattern(regex=r"[0-9a-fA-F]{64}", what="64 hexadecimal digits")
MEDIA_URL = Url(schemes=("http", "https"))
STREAM_URL = Url(schemes=("http", "https", "rtsp"))

SAY_TEXT = Text(max_len=5000)  # spoken text, a command's or a schedule item's
BOARD_TEXT = Text(max_len=500)  # board_text: shown on the board while audio airs
BOARD_MESSAGE = Text(max_len=1000, fold=True)  # a board message: a command or standing content

MEDIA = OneOrList(noun="media objects", min=1, max=8, item=Obj(
    shape="{url, sha256, lang?}", required=("url", "sha256"),
    fields={"url": MEDIA_URL, "sha256": SHA256, "lang": LANG}))
IMAGE = Obj(shape="{url, sha256}", required=("url", "sha256"),  # a board page's picture
            fields={"url": MEDIA_URL, "sha256": SHA256})
PAGE_LAYOUTS = ("text", "beside", "image")  # a page board's body: text, image and text, image
LAYOUT = Choice(choices=PAGE_LAYOUTS)
BACKUPS = ListOf(item=STREAM_URL, noun="URLs", max=8)
LIVE = {"url": STREAM_URL, "backups": BACKUPS, "fallback": MEDIA}  # a live source's keys

DAYS = ListOf(item=Choice(choices=DAY_NAMES), noun="days", min=1, max=7, unique=True)
DATE = Parsed(parse=parse_date, what="a date YYYY-MM-DD")
WINDOW = {"from": DATE, "until": DATE, "days": DAYS}  # when a schedule item or message runs
