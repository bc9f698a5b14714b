"""``ttcs-ctl cap status IDENTIFIER``: proof of dissemination (docs/CAP.md).

For each message with that identifier: the devices it was meant for (its targets: a device,
or a group's members per ``relay.groups`` and the relay's store), and for each whether it
aired — from the devices' own play records (``plays``, by the command id each carries,
stored by the relay) — and when, or why not: refused or failed (its acks), stopped,
expired, offline (the relay's link state), or nothing heard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from ctl.cap.record import CapRecord
from ctl.config import groups_of
from ctl.store import PLAYS_CMD_ID_SINCE

MARGIN_MS = 3600 * 1000  # device clocks may be off: look at records from an hour before


@dataclass
class DeviceLine:
    device: str
    aired: bool
    text: str


def _hms(ms: int | None, zone: ZoneInfo) -> str:
    if not ms:
        return "?"
    try:
        return datetime.fromtimestamp(ms / 1000, zone).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


def _members(target: str, cfg: dict, devices: dict[str, dict]) -> list[str]:
    kind, name = target.split("/", 1)
    if kind == "dev":
        return [name]
    groups = cfg["relay"]["groups"]
    return sorted(d for d in devices if name == "all" or name in groups_of(d, groups))


def report(record: CapRecord, identifier: str, cfg: dict) -> tuple[int, list[str]]:
    zone = ZoneInfo(cfg["relay"]["timezone"])
    alerts = record.alerts_by_identifier(identifier)
    if not alerts:
        return 1, [f"no CAP message with identifier {identifier!r} was handled here"]
    db = record.db
    tables = db.tables()
    devices = {r["device"]: dict(r) for r in db.q(
        "SELECT device, online, since_ms, reason FROM devices")} if "devices" in tables else {}
    lines: list[str] = []
    for a in alerts:
        lines.append(f"{a['identifier']} from {a['sender']} sent {a['sent']}: {a['status']}"
                     f" {a['msg_type']}, {a['action']} ({a['why']}); handled"
                     f" {_hms(a['received_ms'], zone)}")
        commands = [c for c in record.commands_of(a["sender"], a["identifier"])
                    if c["sent"] == a["sent"] and c["type"] in ("play", "say")]
        if not commands:
            lines.append("  no audio command was sent for it")
            continue
        ids = sorted({c["cmd_id"] for c in commands})
        first_ms = min(c["sent_ms"] for c in commands)
        plays = _plays(db, tables, ids, first_ms - MARGIN_MS)
        acks = record.acks_of(ids)
        meant = sorted({d for c in commands for d in _members(c["target"], cfg, devices)})
        heard = {p["device"] for p in plays} | {k["device"] for k in acks}
        result = [_line(d, plays, acks, devices.get(d), zone) for d in sorted(set(meant) | heard)]
        aired = sum(r.aired for r in result)
        lines.append(f"  commands {', '.join(ids)} to"
                     f" {', '.join(sorted({c['target'] for c in commands}))}:"
                     f" aired on {aired} of {len(result)} device(s)")
        lines += [f"  {r.device:<28} {'AIRED' if r.aired else 'not aired'}  {r.text}"
                  for r in result]
    return 0, lines


def _plays(db, tables: set[str], ids: list[str], since_ms: int) -> list[dict]:
    """The play records of commands ``ids``: from ``plays`` by its command id (indexed;
    kept for good), or, for records stored before the store had that column, from the event
    bodies (a scan of the play events since ``since_ms``; emptied after
    ``relay.events_keep_days``)."""
    if "plays" in tables and "cmd_id" in db.columns("plays"):
        since = db.one("SELECT value FROM meta WHERE key=?", PLAYS_CMD_ID_SINCE)
        if since is None or int(since["value"]) <= since_ms:
            return [dict(r) for r in db.q(
                "SELECT device, started, played_ms, result FROM plays WHERE cmd_id IN"
                f" ({', '.join('?' * len(ids))})", *ids)]
    if "events" not in tables:
        return []
    out = []
    wanted = set(ids)
    for row in db.q("SELECT device, body FROM events WHERE type='play' AND ts >= ?", since_ms):
        try:
            body = json.loads(row["body"])
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("id") in wanted:
            out.append({"device": row["device"], **body})
    return out


def _line(device: str, plays: list[dict], acks: list[dict], dev: dict | None,
          zone: ZoneInfo) -> DeviceLine:
    mine = sorted((p for p in plays if p["device"] == device),
                  key=lambda p: p.get("started") or 0)
    aired = [p for p in mine if isinstance(p.get("played_ms"), int) and p["played_ms"] > 0]
    if aired:
        text = "; ".join(f"{_hms(p.get('started'), zone)} for {p['played_ms'] / 1000:.1f} s"
                         f" ({p.get('result')})" for p in aired)
        return DeviceLine(device, True, text)
    stages = {k["stage"]: k for k in acks if k["device"] == device}
    for stage, word in (("rejected", "refused"), ("failed", "failed"),
                        ("expired", "expired before airing"), ("stopped", "stopped (cancelled)"
                                                                " before airing")):
        if stage in stages:
            reason = stages[stage].get("reason")
            return DeviceLine(device, False, word + (f": {reason}" if reason else ""))
    if mine:
        p = mine[-1]
        reason = f": {p['reason']}" if p.get("reason") else ""
        return DeviceLine(device, False, f"play record {p.get('result')}{reason}")
    if dev is not None and dev.get("online") == 0:
        return DeviceLine(device, False, f"offline since {_hms(dev.get('since_ms'), zone)}"
                                         f" ({dev.get('reason') or '?'})")
    if "received" in stages:
        return DeviceLine(device, False, "received; no play record yet (airing later, or its"
                                         " record not in yet)")
    if dev is None:
        return DeviceLine(device, False, "unknown to the relay; nothing heard")
    return DeviceLine(device, False, "nothing heard from it about this alert")
