"""``ttcs-ctl watch``: the live fleet table, from every device's status, state, health and
event topics."""

from __future__ import annotations

import json
import queue
import time

from ctl.config import groups_of
from ctl.session import Session


class Fleet:
    """What ``watch`` knows of each device, from status, state, health and event topics."""

    def __init__(self, groups: dict[str, list[str]] | None = None) -> None:
        self.devices: dict[str, dict] = {}
        self.groups = groups or {}

    def update(self, topic: str, payload: bytes, now: float | None = None) -> None:
        parts = topic.split("/")
        if len(parts) < 4 or parts[-3] != "dev":
            return
        device, leaf = parts[-2], parts[-1]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        d = self.devices.setdefault(device, {"online": None, "last_seen": None, "playing": None,
                                             "alerts": {}, "health": None, "reason": None})
        d["last_seen"] = now if now is not None else time.time()
        handler = getattr(self, f"_{leaf}", None)
        if handler is not None:
            handler(d, body)

    @staticmethod
    def _status(d: dict, body: dict) -> None:
        d["online"] = body.get("state") == "online"
        d["reason"] = body.get("reason")

    @staticmethod
    def _state(d: dict, body: dict) -> None:
        d["playing"] = body.get("playing")
        if isinstance(body.get("volume"), int):
            d["volume"] = body["volume"]
        alerts = body.get("alerts")
        if isinstance(alerts, list):
            d["alerts"] = {a["code"]: True for a in alerts
                           if isinstance(a, dict) and isinstance(a.get("code"), str)}

    @staticmethod
    def _health(d: dict, body: dict) -> None:
        d["health"] = body

    @staticmethod
    def _event(d: dict, body: dict) -> None:
        code = body.get("code")
        if body.get("type") != "alert" or not isinstance(code, str):
            return
        if body.get("state") == "raised":
            d["alerts"][code] = True
        else:
            d["alerts"].pop(code, None)

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
        t = Table(title=f"ttcs fleet: {online}/{len(names)} online", title_justify="left")
        for col in ("DEVICE", "GROUPS", "STATUS", "LAST SEEN", "PLAYING", "VOLUME", "ALERTS"):
            t.add_column(col, no_wrap=col in ("DEVICE", "STATUS"))
        for name in names:
            t.add_row(*self._row(name, now))
        return t

    def _row(self, name: str, now: float) -> list[str]:
        d = self.devices[name]
        status = {True: "[green]online[/]", None: "?"}.get(
            d["online"], f"[red]OFFLINE[/] {d.get('reason') or ''}".rstrip())
        seen = f"{int(now - d['last_seen'])} s" if d["last_seen"] else "-"
        playing = d["playing"]
        if isinstance(playing, dict):
            playing = playing.get("id") or playing.get("source") or "yes"
        audio = (d["health"] or {}).get("audio") if isinstance(d["health"], dict) else None
        volume = d.get("volume")  # the state snapshot's, else the last health sample's
        if volume is None and isinstance(audio, dict):
            volume = audio.get("volume")
        alerts = ", ".join(sorted(d["alerts"]))
        return [name, ",".join(self.groups_of(name)) or "-", status, seen,
                _esc(str(playing or "-")), "-" if volume is None else str(volume),
                f"[yellow]{_esc(alerts)}[/]" if alerts else "-"]


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

