"""Standing documents from the console (SPEC §8, §9): a schedule or board content for a
target, edited as YAML, checked with the agent's own validators (:func:`ctl.push.validate`),
shown as a diff against the live retained document, then signed and published retained with
the next ``rev`` — the steps of ``ttcs-ctl schedule push`` (:mod:`ctl.push`), shared."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import yaml

from agent import protocol
from ctl import push
from ctl.sanitize import clean, parse_object

KINDS = ("schedule", "board")
MAX_YAML = 64 * 1024
DAY_VI = {"mon": "T2", "tue": "T3", "wed": "T4", "thu": "T5", "fri": "T6", "sat": "T7",
          "sun": "CN"}
EMPTY = {"schedule": {"items": []}, "board": {"messages": [], "rotate_s": 10}}


@dataclass
class Draft:
    kind: str
    target: str
    text: str  # the YAML as typed
    args: dict | None = None
    problems: list[str] | None = None
    live: push.Live | None = None
    rev: int | None = None  # the rev it would get
    diff: str = ""


def live(link, target: str, kind: str) -> push.Live:
    return push.parse_live(link.document(target, kind), kind)


def as_yaml(args: dict | None, kind: str) -> str:
    return yaml.safe_dump(args if args is not None else EMPTY[kind], allow_unicode=True,
                          sort_keys=False)


def prepare(link, kind: str, target: str, text: str) -> Draft:
    """Parse and check ``text``; diff it against what is live on ``target``."""
    d = Draft(kind, target, text)
    if len(text.encode()) > MAX_YAML:
        d.problems = [f"quá dài: tối đa {MAX_YAML // 1024} KiB"]
        return d
    try:
        args = push.jsonable(yaml.safe_load(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"dòng {mark.line + 1}, cột {mark.column + 1}: " if mark else ""
        d.problems = [f"{where}YAML: {getattr(e, 'problem', None) or e}"]
        return d
    problems = push.validate(args, kind)
    if problems:
        d.problems = problems
        return d
    d.args = args
    d.live = live(link, target, kind)
    d.rev = push.next_rev(d.live, None, int(time.time()))
    d.diff = push.diff(d.live, args, target, kind)
    return d


def publish(link, d: Draft, key, kid: str, prefix: str) -> dict:
    """Sign and publish ``d`` retained; the document sent."""
    doc = push.make_document(d.kind, d.target, d.rev, d.args, int(time.time() * 1000))
    signed = protocol.sign(doc, key, kid)
    link.publish(f"{prefix}/{d.target}/desired/{d.kind}", protocol.canonical(signed),
                 retain=True)
    return signed


def results(db, kind: str, target: str, rev: int | None, since_ms: int) -> list[dict]:
    """Devices' ``schedule``/``board`` events about ``rev`` of ``target``'s document (device
    data: shown cleaned)."""
    if rev is None:
        return []
    with db.lock:
        rows = db.q("SELECT device, ts, body FROM events WHERE type=? AND ts>=? ORDER BY ts DESC"
                    " LIMIT 2000", kind, since_ms)
    out, seen = [], set()
    for r in rows:
        ev = parse_object(r["body"].encode())
        if (ev is None or ev.get("rev") != rev or r["device"] in seen
                or not str(ev.get("topic", "")).endswith(f"{target}/desired/{kind}")):
            continue
        seen.add(r["device"])
        out.append({"device": r["device"], "ts": r["ts"], "result": clean(ev.get("result"), 20),
                    "reason": clean(ev.get("reason"), 60) if ev.get("reason") else ""})
    return out


def items_table(args: dict | None) -> list[dict]:
    """A schedule's items as rows: time, days, content, priority, catch-up."""
    rows = []
    for item in (args or {}).get("items", []):
        if not isinstance(item, dict):
            continue
        if "media" in item:
            media = item["media"] if isinstance(item["media"], list) else [item["media"]]
            content = "bản ghi " + ", ".join(str(m.get("url", "")).rsplit("/", 1)[-1][:60]
                                            for m in media if isinstance(m, dict))
        elif "say" in item:
            say = item["say"]
            content = "đọc: " + (say if isinstance(say, str) else str(say.get("text", "")))[:120]
        elif "live" in item:
            content = "tiếp sóng: " + json.dumps(item["live"], ensure_ascii=False)[:80]
        else:
            content = ""
        rows.append({"id": item.get("id", ""), "times": ", ".join(item.get("times", [])),
                     "days": ", ".join([DAY_VI.get(d, d) for d in item.get("days", [])]
                                       or item.get("dates", [])),
                     "content": content, "priority": item.get("priority", "normal"),
                     "catch_up_s": item.get("catch_up_s", 0)})
    return rows


def edited(link, kind: str, target: str, form) -> str:
    """The live document as YAML with one table edit applied (``op``: ``add`` an item or a
    message from the form's fields, ``remove`` the one named ``item_id``). Not checked here:
    the result goes through :func:`prepare` like typed YAML."""
    args = dict(live(link, target, kind).args or EMPTY[kind])
    key = "items" if kind == "schedule" else "messages"
    entries = [e for e in args.get(key, []) if isinstance(e, dict)]
    name = str(form.get("item_id", "")).strip()
    if form.get("op") == "remove":
        entries = [e for e in entries if e.get("id") != name]
    elif kind == "schedule":
        item: dict = {"id": name, "say": str(form.get("say", "")).strip(),
                      "days": [str(d) for d in form.getlist("days")],
                      "times": [t.strip() for t in str(form.get("times", "")).split(",")
                                if t.strip()],
                      "priority": str(form.get("priority", "normal"))}
        catch_up = str(form.get("catch_up_s", "")).strip()
        if catch_up:
            item["catch_up_s"] = int(catch_up) if catch_up.isdigit() else catch_up
        entries = [e for e in entries if e.get("id") != name] + [item]
    else:
        entries = [e for e in entries if e.get("id") != name] + [
            {"id": name, "text": str(form.get("text", "")).strip()}]
    args[key] = entries
    return as_yaml(args, kind)
