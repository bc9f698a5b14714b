"""Telling staff that a CAP alert went out, through the relay's channels (``alerts:`` in
ctl.yaml: webhook, Telegram, e-mail; :mod:`ctl.notify`). Sent once, at once, each channel on
its own; a channel that fails is logged and said, never stops the alert."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from ctl.sanitize import clean

if TYPE_CHECKING:
    from ctl.notify import Channel

log = logging.getLogger(__name__)

WHAT = {"air": "ĐÃ PHÁT cảnh báo", "test": "ĐÃ PHÁT tin thử nghiệm",
        "cancel": "ĐÃ HỦY cảnh báo"}


class Notifier:
    def __init__(self, channels: Iterable[Channel], timezone: str) -> None:
        self.channels = list(channels)
        self.zone = ZoneInfo(timezone)
        self.errors: list[str] = []

    def sent(self, alert, decision, commands: list, acks: list, now_s: float) -> None:
        if not self.channels:
            return
        from ctl.notify import Message, NotifyError  # with channels only: a shorter start

        headline = clean(next((i.headline or i.event for i in alert.infos), alert.identifier),
                         200)
        verb = WHAT.get(decision.action, decision.action)
        if alert.msg_type == "Update":
            verb = "ĐÃ CẬP NHẬT cảnh báo"
        when = datetime.fromtimestamp(now_s, self.zone).strftime("%H:%M %d/%m")
        subject = f"[TTCS] CAP: {verb}: {headline}"[:200]
        targets = sorted({c.target for c in commands})
        devices = sorted({a[1] for a in acks if a[2] == "received"})
        lines = [f"{verb} lúc {when}: {headline}",
                 f"Nguồn: {clean(alert.sender, 200)}, mã {clean(alert.identifier, 200)}"
                 f" ({alert.status}"
                 f" {alert.msg_type})",
                 f"Gửi tới: {', '.join(targets)}",
                 f"Đã nhận: {len(devices)} cụm" + (f" ({', '.join(devices[:20])})"
                                                   if devices else "")]
        text = "\n".join([subject, "", *lines])
        payload = {"v": 1, "kind": "cap", "action": decision.action,
                   "sender": alert.sender, "identifier": alert.identifier,
                   "sent": alert.sent_text, "status": alert.status,
                   "msg_type": alert.msg_type, "headline": headline, "targets": targets,
                   "commands": [c.cmd_id for c in commands], "received": devices,
                   "text": text}
        msg = Message(key=f"cap-{commands[0].cmd_id}" if commands else "cap", subject=subject,
                      text=text, payload=payload, lines=lines)
        for ch in self.channels:
            try:
                ch.send(msg)
            except NotifyError as e:
                log.warning("CAP notice via %s failed: %s", ch.name, e)
                self.errors.append(f"{ch.name}: {e}")
