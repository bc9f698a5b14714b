"""``ttcs-ctl schedule push`` / ``ttcs-ctl board push``: standing documents (SPEC §8, §9).

Steps: read the YAML file (the document's ``args``: ``{items: [...]}`` for a schedule,
``{messages: [...], rotate_s: N}`` for a board), validate it with the agent's own validator,
fetch the live retained document for the target, show a readable diff, bump ``rev``, sign and
publish retained (QoS 1); then report the devices' ``schedule``/``board`` events for that rev.

``rev``: one more than the live document's; with no live document, the current Unix time in
seconds, so that a device that still remembers a higher rev from a deleted document does not
ignore the new one. ``--rev`` overrides (it must still be above the live one).
"""

from __future__ import annotations

import difflib
import json
import queue
import time
from dataclasses import dataclass

import yaml

from agent import protocol
from agent.board.content import validate_document_args
from agent.schedule.model import validate_schedule_args
from ctl.sanitize import device_id, parse_object

VALIDATORS = {"schedule": validate_schedule_args, "board": validate_document_args}


class PushError(Exception):
    """The push cannot go ahead; ``problems`` lists why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Live:
    rev: int | None
    args: dict | None
    raw: dict | None


def load_args(path: str, kind: str) -> dict:
    """The document args from YAML, validated; PushError with every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            args = yaml.safe_load(f)
    except OSError as e:
        raise PushError([f"{path}: cannot read: {e}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise PushError([f"{where}: (yaml): {getattr(e, 'problem', None) or e}"]) from None
    args = jsonable(args)
    problems = validate(args, kind)
    if problems:
        raise PushError([f"{path}: {p}" for p in problems])
    return args


def validate(args, kind: str) -> list[str]:
    """Every problem of a document's args, by the agent's own validator (and float-free)."""
    problems = VALIDATORS[kind](args)
    if not problems and protocol._has_float(args):
        problems = ["v1 documents hold no floating-point numbers: write whole numbers"]
    return problems


def jsonable(value):
    """YAML dates and times become the strings the documents use."""
    import datetime as dt

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def parse_live(payload: bytes | None, kind: str) -> Live:
    doc = parse_object(payload) if payload else None
    if doc is None or doc.get("type") != kind:
        return Live(None, None, None)
    rev = doc.get("rev") if isinstance(doc.get("rev"), int) else None
    args = doc.get("args") if isinstance(doc.get("args"), dict) else None
    return Live(rev, args, doc)


def next_rev(live: Live, forced: int | None, now_s: int) -> int:
    if forced is not None:
        if live.rev is not None and forced <= live.rev:
            raise PushError([f"--rev {forced} must be above the live rev {live.rev}"])
        return forced
    return live.rev + 1 if live.rev is not None else now_s


def diff(live: Live, args: dict, target: str, kind: str) -> str:
    """A unified diff of pretty JSON (stable key order, Vietnamese kept as is)."""
    old = _pretty(live.args) if live.args is not None else []
    new = _pretty(args)
    was = live.rev if live.rev is not None else "(none)"
    lines = difflib.unified_diff(old, new, fromfile=f"live {target}/{kind} rev {was}",
                                 tofile=f"new {target}/{kind}", lineterm="")
    return "\n".join(lines)


def _pretty(obj: dict) -> list[str]:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def make_document(kind: str, target: str, rev: int, args: dict, now_ms: int) -> dict:
    return {"v": 1, "type": kind, "target": target, "ts": now_ms, "rev": rev, "args": args}


def fetch_live(session, topic: str, wait_s: float = 1.5) -> bytes | None:
    """The retained message on ``topic`` (the broker sends it right after subscribing)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            t, payload, retained = session.messages.get(timeout=0.1)
        except queue.Empty:
            continue
        if t == topic and retained:
            return payload
    return None


def results(session, kind: str, rev: int, target: str, wait_s: float,
            expect: int | None) -> dict[str, dict]:
    """Device events about this document, by device, until ``expect`` or the time is up."""
    topic_suffix = f"{target}/desired/{kind}"
    seen: dict[str, dict] = {}
    end = time.monotonic() + wait_s
    while time.monotonic() < end and (expect is None or len(seen) < expect):
        try:
            t, payload, _ = session.messages.get(timeout=0.1)
        except queue.Empty:
            continue
        device = device_id(t.split("/")[-2]) if t.endswith("/event") else None
        ev = parse_object(payload) if device else None
        if (ev is not None and ev.get("type") == kind and ev.get("rev") == rev
                and str(ev.get("topic", "")).endswith(topic_suffix)):
            seen[device] = ev
    return seen
