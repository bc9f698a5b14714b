"""``ttcs-ctl watch``: the live fleet table, from every device's status, state, health and
event topics. What devices send is hostile input (ctl/sanitize.py): the fleet keeps only
bounded, cleaned values, and the table shows them as text (no rich markup, no terminal
control characters, one line per device)."""

from __future__ import annotations

import queue
import time

from ctl.config import groups_of
from ctl.sanitize import CODE_MAX, REASON_MAX, as_int, clean, device_id, parse_object, shown
from ctl.session import Session

VERSION_MAX = 32  # a device's version string as shown

ALERTS_MAX = 20  # alert codes kept per device
PLAYING_MAX = 40


class Fleet:
    """What ``watch`` knows of each device, from status, state, health and event topics."""

    def __init__(self, groups: dict[str, list[str]] | None = None) -> None:
        self.devices: dict[str, dict] = {}
        self.groups = groups or {}

    def update(self, topic: str, payload: bytes, now: float | None = None) -> None:
        parts = topic.split("/")
        if len(parts) < 4 or parts[-3] != "dev" or not device_id(parts[-2]):
            return
        device, leaf = parts[-2], parts[-1]
        body = parse_object(payload)
        if body is None:
            return
        d = self.devices.setdefault(device, {"online": None, "last_seen": None, "playing": None,
                                             "alerts": {}, "volume": None,
                                             "health_volume": None, "reason": None,
                                             "version": None})
        d["last_seen"] = now if now is not None else time.time()
        handler = getattr(self, f"_{leaf}", None)
        if handler is not None:
            handler(d, body)

    @staticmethod
    def _status(d: dict, body: dict) -> None:
        d["online"] = body.get("state") == "online"
        reason = body.get("reason")
        d["reason"] = clean(reason, REASON_MAX) if reason is not None else None

    @staticmethod
    def _version(d: dict, body: dict) -> None:
        version = body.get("version")
        if isinstance(version, str) and version:
            d["version"] = clean(version, VERSION_MAX)

    @classmethod
    def _state(cls, d: dict, body: dict) -> None:
        cls._version(d, body)
        playing = body.get("playing")
        if isinstance(playing, dict):
            playing = playing.get("id") or playing.get("source") or "yes"
        d["playing"] = clean(playing, PLAYING_MAX) if playing else None
        if "volume" in body:
            d["volume"] = _volume(body["volume"])
        alerts = body.get("alerts")
        if isinstance(alerts, list):
            codes = [a["code"] for a in alerts[:ALERTS_MAX]
                     if isinstance(a, dict) and isinstance(a.get("code"), str)]
            d["alerts"] = {clean(c, CODE_MAX): True for c in codes}

    @classmethod
    def _health(cls, d: dict, body: dict) -> None:
        cls._version(d, body)
        audio = body.get("audio")
        d["health_volume"] = _volume(audio.get("volume")) if isinstance(audio, dict) else None

    @staticmethod
    def _event(d: dict, body: dict) -> None:
        code = body.get("code")
        if body.get("type") != "alert" or not isinstance(code, str):
            return
        code = clean(code, CODE_MAX)
        if body.get("state") != "raised":
            d["alerts"].pop(code, None)
        elif code in d["alerts"] or len(d["alerts"]) < ALERTS_MAX:
            d["alerts"][code] = True

    def groups_of(self, device: str) -> list[str]:
        return groups_of(device, self.groups)

    def selected(self, group: str | None = None, alert: str | None = None) -> list[str]:
        """Device names passing the filters; ``alert``: a code, or ``any``."""
        out = []
        for name in sorted(self.devices):
            d = self.devices[name]
            if group and group != "all" and group not in self.groups_of(name):
                continue
            if alert and not (d["alerts"] if alert == "any" else alert in d["alerts"]):
                continue
            out.append(name)
        return out

    def table(self, group: str | None = None, alert: str | None = None,
              now: float | None = None):
        from rich.table import Table

        now = now if now is not None else time.time()
        names = self.selected(group, alert)
        online = sum(1 for n in names if self.devices[n]["online"])
        t = Table(title=f"ttcs fleet: {online}/{len(names)} online{self._versions(names)}",
                  title_justify="left")
        for col in ("DEVICE", "GROUPS", "STATUS", "LAST SEEN", "PLAYING", "VOLUME", "VERSION",
                    "ALERTS"):
            t.add_column(col, no_wrap=col in ("DEVICE", "STATUS"))
        for name in names:
            t.add_row(*self._row(name, now))
        return t

    def _row(self, name: str, now: float) -> list[str]:
        """The row's cells as rich markup: every value a device sent is escaped."""
        d = self.devices[name]
        reason = _esc(shown(d["reason"], REASON_MAX)) if d["reason"] else ""
        status = {True: "[green]online[/]", None: "?"}.get(
            d["online"], f"[red]OFFLINE[/] {reason}".rstrip())
        seen = f"{int(now - d['last_seen'])} s" if d["last_seen"] else "-"
        # the state snapshot's volume, else the last health sample's
        volume = d["volume"] if d["volume"] is not None else d["health_volume"]
        alerts = ", ".join(shown(c, CODE_MAX) for c in sorted(d["alerts"]))
        return [name, ",".join(self.groups_of(name)) or "-", status, seen,
                _esc(shown(d["playing"], PLAYING_MAX)) if d["playing"] else "-",
                "-" if volume is None else str(volume),
                _esc(shown(d["version"], VERSION_MAX)) if d["version"] else "-",
                f"[yellow]{_esc(alerts)}[/]" if alerts else "-"]

    def _versions(self, names: list[str]) -> str:
        """The fleet's versions with their counts (an update rolling out, or stuck)."""
        counts: dict[str, int] = {}
        for n in names:
            v = self.devices[n]["version"]
            if v:
                counts[v] = counts.get(v, 0) + 1
        if not counts:
            return ""
        return "; versions: " + ", ".join(f"{_esc(shown(v, VERSION_MAX))} ({c})"
                                           for v, c in sorted(counts.items()))


def _volume(value) -> int | None:
    v = as_int(value)
    return v if v is not None and 0 <= v <= 100 else None


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def watch(cfg: dict, once: float | None, group: str | None = None,
          alert: str | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    prefix = cfg["mqtt"]["topic_prefix"]
    session = Session(cfg, [f"{prefix}/dev/+/{leaf}"
                            for leaf in ("status", "state", "health", "event")])
    session.open()
    fleet = Fleet(cfg.get("relay", {}).get("groups"))
    try:
        if once:
            _drain(session, fleet, time.monotonic() + once)
            Console(width=160).print(fleet.table(group, alert))
            return 0
        with Live(fleet.table(group, alert), refresh_per_second=1, screen=False) as live:
            while True:
                _drain(session, fleet, time.monotonic() + 1)
                live.update(fleet.table(group, alert))
    except KeyboardInterrupt:
        return 0
    finally:
        session.close()


def _drain(session: Session, fleet: Fleet, until: float) -> None:
    while time.monotonic() < until:
        try:
            topic, payload, _ = session.messages.get(timeout=0.2)
        except queue.Empty:
            continue
        fleet.update(topic, payload)

