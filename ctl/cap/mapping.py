"""What a CAP message means here: the rules of ``cap:`` in ctl.yaml (docs/CAP.md).

Pure functions of the message, the config and the time, so each rule is a plain unit test:
:func:`decide` (sender, msgType, status, scope, expiry: air, test, cancel, record or refuse),
:func:`priority_of` (urgency × severity × certainty), :func:`timing` (``exp``, ``at``, board
time), :func:`choose_infos` (language order), :func:`spoken` and :func:`board_text` (what is
said and shown). Turning a decision into commands is :mod:`ctl.cap.plan`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime

from agent.protocol import Priority
from ctl.cap.parse import Alert, Info

# Decisions
AIR = "air"          # Alert or Update with status Actual: sent to the areas
TEST = "test"        # Test/Exercise with cap.test_group: sent there, marked, never urgent
CANCEL = "cancel"    # Cancel: the referenced alert's commands are stopped
RECORD = "record"    # kept and shown, nothing sent
REFUSE = "refuse"    # kept, nothing sent, and the caller is told why (exit 1)

MAX_AT_AHEAD_MS = 7 * 86400 * 1000  # the agents' limit on `at` (agent/args.py)
SAY_MAX = 5000                       # the agents' limit on spoken text (agent/args.py SAY_TEXT)
BOARD_MAX = 1000                     # and on a board command's text (docs/BOARD.md)


@dataclass(frozen=True)
class Decision:
    action: str
    why: str


def decide(alert: Alert, cap: dict, now_ms: int) -> Decision:
    """What to do with ``alert``, by the rules in this order: sender, msgType Ack/Error,
    status, scope, then Cancel, then expiry."""
    if cap["senders"] and alert.sender not in cap["senders"]:
        return Decision(REFUSE, f"sender {alert.sender!r} is not in cap.senders")
    if alert.msg_type in ("Ack", "Error"):
        return Decision(RECORD, f"msgType {alert.msg_type}: recorded only")
    if alert.status in ("System", "Draft"):
        return Decision(RECORD, f"status {alert.status}: never aired")
    test = alert.status in ("Test", "Exercise")
    if test and not cap["test_group"]:
        return Decision(RECORD, f"status {alert.status}: recorded only (cap.test_group is not"
                                " set)")
    if alert.scope != "Public" and alert.sender not in cap["scopes"][alert.scope]:
        return Decision(REFUSE, f"scope {alert.scope}: sender {alert.sender!r} is not in"
                                f" cap.scopes.{alert.scope}")
    if alert.msg_type == "Cancel":
        return Decision(CANCEL, f"Cancel of {len(alert.references)} referenced message(s)")
    if not alert.infos:
        return Decision(RECORD, "no info block: nothing to air")
    if all(timing(i, cap, now_ms).expired for i in alert.infos):
        return Decision(REFUSE, "expired: every info block's expires is past")
    return Decision(TEST if test else AIR, f"status {alert.status}, msgType {alert.msg_type}")


def priority_of(info: Info, rules: list[dict]) -> Priority:
    """The first rule whose lists all hold the block's value (an empty list: any); else
    normal."""
    for rule in rules:
        if all(not rule[k] or getattr(info, k) in rule[k]
               for k in ("urgency", "severity", "certainty")):
            return Priority(rule["priority"])
    return Priority.NORMAL


@dataclass(frozen=True)
class Timing:
    exp_ms: int          # the commands' exp
    at_ms: int | None    # a future onset/effective: when to air
    board_s: int         # board display time (until expires, at most a day)
    expired: bool
    too_far: bool        # at more than 7 days ahead: the agents would refuse it


def _ms(t: datetime | None) -> int | None:
    return int(t.timestamp() * 1000) if t is not None else None


def timing(info: Info, cap: dict, now_ms: int) -> Timing:
    exp = _ms(info.expires)
    start = max((t for t in (_ms(info.onset), _ms(info.effective)) if t is not None),
                default=None)
    at = start if start is not None and start > now_ms else None
    if exp is None:
        exp = max(now_ms, at or now_ms) + int(cap["default_ttl_s"]) * 1000
    board_s = max(1, min(86400, (exp - now_ms) // 1000))
    return Timing(exp, at, board_s, exp <= now_ms,
                  at is not None and at - now_ms > MAX_AT_AHEAD_MS)


def lang_of(tag: str) -> str:
    return tag.split("-")[0].lower()


def choose_infos(infos: list[Info], languages: list[str]) -> list[Info]:
    """The blocks to air, one per language in ``languages`` order (the first block of each);
    when none is in those languages, the first block (airing something beats silence)."""
    chosen = []
    for lang in dict.fromkeys(languages):
        block = next((i for i in infos if i.lang == lang), None)
        if block is not None:
            chosen.append(block)
    return chosen or infos[:1]


def _clean(text: str) -> str:
    """One paragraph: NFC, white space runs made single spaces, controls dropped."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if c.isspace() else c for c in text
                   if c.isspace() or unicodedata.category(c)[0] != "C")
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _sentence(text: str) -> str:
    text = _clean(text)
    return text if not text or text[-1] in ".!?…" else text + "."


def spoken(info: Info, marker: str | None = None) -> str:
    """headline, description, instruction, as sentences; a test starts and ends with the
    marker so it cannot be mistaken for a real warning."""
    parts = [_sentence(p) for p in (info.headline or info.event, info.description,
                                    info.instruction) if _clean(p)]
    text = " ".join(parts)
    if marker:
        m = _sentence(marker)
        return _cut(f"{m} {text}", SAY_MAX - len(m) - 1) + " " + m
    return _cut(text, SAY_MAX)


def board_text(info: Info, max_chars: int, marker: str | None = None) -> str:
    """The headline, and the instruction when both fit in ``max_chars``."""
    head = _clean(info.headline or info.event)
    if marker:
        head = f"[{_clean(marker).upper()}] {head}"
    instr = _clean(info.instruction)
    if instr and len(head) + 3 + len(instr) <= max_chars:
        return f"{head} — {instr}"
    return _cut(head, min(max_chars, BOARD_MAX))
