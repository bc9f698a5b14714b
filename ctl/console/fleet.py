"""What the console reads from the relay's store: the fleet (kept in memory and refreshed by
:class:`FleetWatcher`, so a page with 2,000 devices is not 2,000 rows of JSON per request) and
the per-device, alert and health queries. Everything a device sent is device data: shown as
text (the templates escape it), numbers checked before they are drawn."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctl.config import groups_of, location_of
from ctl.db import Database
from ctl.sanitize import as_int, clean

log = logging.getLogger(__name__)


@dataclass
class DeviceRow:
    device: str
    groups: list[str]
    online: bool | None
    since_ms: int | None
    reason: str | None
    last_seen_ms: int | None
    playing: str | None = None  # the id of what airs
    priority: str | None = None
    volume: int | None = None
    version: str | None = None
    alerts: list[str] = field(default_factory=list)
    location: tuple[float, float] | None = None

    @property
    def status(self) -> str:
        """``playing``, ``online``, ``offline`` or ``unknown``."""
        if self.online is None:
            return "unknown"
        if not self.online:
            return "offline"
        return "playing" if self.playing else "online"

    def public(self) -> dict[str, Any]:
        return {"device": self.device, "groups": self.groups, "status": self.status,
                "since_ms": self.since_ms, "reason": self.reason,
                "last_seen_ms": self.last_seen_ms, "playing": self.playing,
                "priority": self.priority, "volume": self.volume, "version": self.version,
                "alerts": self.alerts}


def parse_state(raw: str | None) -> dict[str, Any]:
    """The parts of a device's ``state`` the fleet shows, checked (a device may send anything)."""
    out: dict[str, Any] = {"playing": None, "priority": None, "volume": None,
                           "version": None, "alerts": []}
    if not raw:
        return out
    try:
        state = json.loads(raw)
    except ValueError:
        return out
    if not isinstance(state, dict):
        return out
    cur = state.get("playing")
    if isinstance(cur, dict):
        out["playing"] = clean(cur.get("id"), 64) if isinstance(cur.get("id"), str) else "?"
        if cur.get("priority") in ("emergency", "priority", "normal"):
            out["priority"] = cur["priority"]
    vol = as_int(state.get("volume"))
    out["volume"] = vol if vol is not None and 0 <= vol <= 100 else None
    if isinstance(state.get("version"), str):
        out["version"] = clean(state["version"], 32)
    alerts = state.get("alerts")
    if isinstance(alerts, list):
        out["alerts"] = [clean(a["code"], 40) for a in alerts[:20]
                         if isinstance(a, dict) and isinstance(a.get("code"), str)]
    return out


def counts(rows: list[DeviceRow]) -> dict[str, int]:
    """What a district reports: total, playing, online (playing included), offline."""
    out = {"total": len(rows), "playing": 0, "online": 0, "offline": 0, "unknown": 0}
    for r in rows:
        s = r.status
        if s == "playing":
            out["playing"] += 1
            out["online"] += 1
        else:
            out[s] += 1
    return out


class FleetWatcher:
    """The fleet in memory, re-read every ``interval_s``; each device whose link, state or
    alerts changed is handed to ``on_change`` (the live updates)."""

    def __init__(self, db: Database, cfg: dict, interval_s: float = 0.5,
                 on_change: Callable[[list[DeviceRow]], None] | None = None) -> None:
        self.db = db
        self.cfg = cfg
        self.interval_s = interval_s
        self.on_change = on_change
        self.rows: dict[str, DeviceRow] = {}
        self._keys: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshed = threading.Event()

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="console-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # the page keeps its last view; the next round retries
                log.exception("console: reading the fleet failed")

    def refresh(self) -> list[DeviceRow]:
        with self.db.lock:
            rows = self.db.q("SELECT device, online, since_ms, reason, last_seen_ms, state"
                             " FROM devices")
        groups = self.cfg["relay"]["groups"]
        changed = []
        for r in rows:
            name = r["device"]
            key = (r["online"], r["since_ms"], r["reason"], r["state"])
            known = self.rows.get(name)
            if known is not None and self._keys.get(name) == key:
                known.last_seen_ms = r["last_seen_ms"]
                continue
            self._keys[name] = key
            row = DeviceRow(name, groups_of(name, groups),
                            None if r["online"] is None else bool(r["online"]), r["since_ms"],
                            r["reason"], r["last_seen_ms"], location=location_of(name, self.cfg),
                            **parse_state(r["state"]))
            self.rows[name] = row
            changed.append(row)
        self.refreshed.set()
        if changed and self.on_change is not None:
            self.on_change(changed)
        return changed

    def visible(self, user) -> list[DeviceRow]:
        """The devices ``user`` sees (an operator: those in their groups), by name."""
        rows = list(self.rows.values())
        if user.role == "operator":
            mine = set(user.groups)
            rows = [r for r in rows if mine.intersection(r.groups)]  # groups resolved once
        return sorted(rows, key=lambda r: r.device)


# --- per device --------------------------------------------------------------------------

def _json(raw: str | None) -> dict:
    try:
        v = json.loads(raw) if raw else None
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def device_detail(db: Database, device: str) -> dict[str, Any] | None:
    with db.lock:
        row = db.one("SELECT * FROM devices WHERE device=?", device)
        if row is None:
            return None
        health = db.one("SELECT ts, body FROM health_latest WHERE device=?", device)
    return {"row": dict(row), "state": _json(row["state"]),
            "health": _json(health["body"]) if health else {},
            "health_ts": health["ts"] if health else None}


def plays(db: Database, device: str, limit: int = 20) -> list[dict[str, Any]]:
    """Recent proof-of-play records: what aired, played vs requested (docs/AUDIO.md)."""
    with db.lock:
        rows = db.q("SELECT seq, ts, body, historical FROM events WHERE device=? AND type='play'"
                    " ORDER BY seq DESC LIMIT ?", device, limit)
    out = []
    for r in rows:
        b = _json(r["body"])
        out.append({"seq": r["seq"], "ts": r["ts"], "historical": bool(r["historical"]),
                    "id": clean(b.get("id"), 64) if isinstance(b.get("id"), str) else "",
                    "result": clean(b.get("result"), 20) if isinstance(b.get("result"), str)
                    else "", "priority": clean(b.get("priority"), 12)
                    if isinstance(b.get("priority"), str) else "",
                    "started": as_int(b.get("started")), "ended": as_int(b.get("ended")),
                    "played_ms": as_int(b.get("played_ms")),
                    "requested_ms": as_int(b.get("requested_ms"))})
    return out


def alerts(db: Database, device: str | None = None, *, open_only: bool = False,
           limit: int = 200) -> list[dict[str, Any]]:
    """Alerts, newest first; ``open_only``: each (device, code, key) whose latest event
    is ``raised``, with the acknowledgement when one was made."""
    where, args = ("WHERE a.device=?", (device,)) if device else ("", ())
    if open_only:
        sql = ("SELECT a.device, a.seq, a.ts, a.state, a.code, a.key, k.username AS ack_user,"
               " k.note AS ack_note, k.ts AS ack_ts FROM alerts a JOIN (SELECT device, code,"
               " COALESCE(key, '') AS k, MAX(seq) AS seq FROM alerts GROUP BY device, code,"
               " COALESCE(key, '')) m ON m.device = a.device AND m.seq = a.seq"
               " LEFT JOIN console_alert_acks k ON k.device = a.device AND k.seq = a.seq"
               f" {where}{' AND' if where else ' WHERE'} a.state = 'raised'"
               " ORDER BY a.ts DESC LIMIT ?")
    else:
        sql = ("SELECT a.device, a.seq, a.ts, a.state, a.code, a.key, k.username AS ack_user,"
               " k.note AS ack_note, k.ts AS ack_ts FROM alerts a LEFT JOIN console_alert_acks k"
               f" ON k.device = a.device AND k.seq = a.seq {where} ORDER BY a.ts DESC LIMIT ?")
    with db.lock:
        return [dict(r) for r in db.q(sql, *args, limit)]


def health_series(db: Database, device: str, since_ms: int) -> list[dict[str, Any]]:
    """The 5-minute aggregates since ``since_ms``: CPU temperature mean/max, load, signal."""
    with db.lock:
        rows = db.q("SELECT bucket_ms, n, cpu_temp_sum, cpu_temp_n, cpu_temp_max, load1_max,"
                    " signal_sum, signal_n, mem_avail_min FROM health_5m WHERE device=? AND"
                    " bucket_ms>=? ORDER BY bucket_ms", device, since_ms)
    return [{"t": r["bucket_ms"],
             "temp": r["cpu_temp_sum"] / r["cpu_temp_n"] if r["cpu_temp_n"] else None,
             "temp_max": r["cpu_temp_max"], "load": r["load1_max"],
             "signal": r["signal_sum"] / r["signal_n"] if r["signal_n"] else None,
             "mem": r["mem_avail_min"]} for r in rows]


def now_ms() -> int:
    return int(time.time() * 1000)
