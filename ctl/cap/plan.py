"""The commands a CAP message becomes (docs/CAP.md, "What is sent").

Per target, the info blocks covering it are aired in the target's language order
(``cap.languages`` of its group, else ``cap.default_languages``): each as ``play`` of its
verified recording, or else ``say`` of its text, repeated ``cap.repeat`` times; then one
``board`` command with the headline until ``expires``. A command has the same id on every
target, so a device reached through two targets (its group and a polygon) airs it once (the
second is ``replayed``). ``Cancel`` and ``Update`` stop the referenced message's commands by
id (``stop {"id": …}`` ends the audio and withdraws the board text) on the targets they went to.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from agent.protocol import Priority
from ctl.cap import mapping as m
from ctl.cap.areas import Targets
from ctl.cap.parse import Alert, Info
from ctl.config import groups_of
from ctl.media import Media

LANG_RE = re.compile(r"[a-z]{2,3}")


@dataclass(frozen=True)
class Planned:
    cmd_id: str
    target: str
    type: str          # play | say | board | stop
    args: dict
    lang: str | None
    priority: str | None
    at_ms: int | None
    exp_ms: int | None


def base_id(alert: Alert) -> str:
    """``cap-<12 hex of sender|identifier|sent>-<4 random hex>``: readable in logs, unique."""
    digest = hashlib.sha256("|".join(alert.key).encode()).hexdigest()[:12]
    return f"cap-{digest}-{secrets.token_hex(2)}"


def languages_for(target: str, cfg: dict) -> list[str]:
    cap = cfg["cap"]
    name = target.split("/", 1)[1]
    groups = [name] if target.startswith("grp/") else groups_of(name, cfg["relay"]["groups"])
    for g in groups:
        if g in cap["languages"]:
            return cap["languages"][g]
    return cap["default_languages"]


def airing(alert: Alert, targets: list[Targets], media: list[Media | None], cfg: dict,
           now_ms: int, *, test: bool, base: str) -> list[Planned]:
    """Commands for an Alert/Update (``targets[k]``, ``media[k]``: of ``alert.infos[k]``)."""
    cap = cfg["cap"]
    marker = cap["test_marker"] if test else None
    out: list[Planned] = []
    every = sorted({t for ts in targets for t in ts})
    for target in every:
        covering = [i for i, ts in enumerate(targets) if target in ts.why]
        chosen = m.choose_infos([alert.infos[i] for i in covering], languages_for(target, cfg))
        board_done = False
        for info in chosen:
            k = alert.infos.index(info)
            tm = m.timing(info, cap, now_ms)
            if tm.expired:
                continue
            prio = Priority.NORMAL if test else m.priority_of(info, cap["priority"])
            out.append(_audio(info, media[k], target, prio, tm, cap, marker, f"{base}-a{k}"))
            if not board_done:
                out.append(Planned(f"{base}-b{k}", target, "board", {
                    "text": m.board_text(info, cap["board_chars"], marker),
                    "priority": str(prio), "duration_s": tm.board_s, "effect": "scroll"},
                    info.lang, str(prio), None, tm.exp_ms))
                board_done = True
    return out


def _audio(info: Info, media: Media | None, target: str, prio: Priority, tm: m.Timing,
           cap: dict, marker: str | None, cmd_id: str) -> Planned:
    args: dict = {"priority": str(prio), "repeat": int(cap["repeat"]),
                  "board_text": m.board_text(info, min(cap["board_chars"], 500), marker)}
    if tm.at_ms is not None:
        args["at"] = tm.at_ms
    # CAP allows any xs:language ("x-klingon"); the agents take a 2-3 letter primary tag
    lang = info.lang if LANG_RE.fullmatch(info.lang) else cap["default_languages"][0]
    if media is not None and marker is None:
        kind = "play"
        args["media"] = media.ref(lang)
    else:  # a test is always spoken: its marker must be heard
        kind = "say"
        args.update(text=m.spoken(info, marker), lang=lang)
    return Planned(cmd_id, target, kind, args, lang, str(prio), tm.at_ms, tm.exp_ms)


def stops(previous: list[dict], base: str, now_ms: int, ttl_s: int) -> list[Planned]:
    """``stop {"id": X}`` on each target for each audio or board command ``X`` of a referenced
    message (rows of ``cap_commands``)."""
    out = []
    seen = set()
    for row in previous:
        if row["type"] not in ("play", "say", "board") or (row["cmd_id"], row["target"]) in seen:
            continue
        seen.add((row["cmd_id"], row["target"]))
        out.append(Planned(f"{base}-s{len(out)}", row["target"], "stop", {"id": row["cmd_id"]},
                           None, None, None, now_ms + ttl_s * 1000))
    return out
