"""Staff notifications for the relay: grouping, wording, channels, retries (docs/CTL.md).

The relay records *notices* (offline, online, alert raised, alert cleared), in groups
(:func:`group_key`: a device's link, or one of its alerts). When a group is due
(``relay.group_wait_s`` after its first notice, at most every ``relay.group_interval_s``) the
pending ones become one *batch* (:func:`summarise` folds a flapping device into one line), and
the batch gets one *delivery* row per configured channel. The
:class:`Dispatcher` sends due deliveries and records the outcome in the same database, so a
relay restart neither loses a batch nor sends one twice; a failed send is retried with
exponential backoff (``alerts.retry``).

Channels: a generic webhook (JSON POST with an ``Idempotency-Key`` header), the Telegram Bot
API (``sendMessage``; ``base_url`` configurable, e.g. for a local Bot API server) and e-mail
over SMTP (STARTTLS or SSL, optional login). Secrets come from files that must not be readable
by group or others, and never appear in logs or error texts.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import requests

from agent.core.alerts import KNOWN_CODES
from agent.core.mqtt import read_secret
from ctl.config import groups_of
from ctl.sanitize import CODE_MAX, KEY_MAX, device_id, quote, shown, utf16_len

log = logging.getLogger(__name__)

TELEGRAM_MAX = 4096
ALERT_LINES_PER_DEVICE = 10  # in the text; the webhook has every item
REASONS = {"lost": "mất kết nối đột ngột", "shutdown": "tắt có chủ đích",
           "heartbeat": "không nhận được tín hiệu định kỳ"}


class NotifyError(Exception):
    """A send failed; ``permanent`` ones are not retried. The text never holds a secret."""

    def __init__(self, message: str, permanent: bool = False, parts_sent: int = 0) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.parts_sent = parts_sent  # of a message sent in parts: how many went out


@dataclass
class Message:
    key: str  # unique per notification: relay instance id + batch id
    subject: str
    text: str
    payload: dict  # what the webhook receives
    lines: list[str] = field(default_factory=list)  # the text's item lines
    parts_sent: int = 0  # of a message sent in parts, those that went out before (retries)


class Channel(Protocol):
    name: str

    def send(self, msg: Message) -> None: ...


# --- grouping ----------------------------------------------------------------------------

def group_key(n: dict) -> tuple:
    """The group of a notice: one per device's link, one per device's alert (code, key); one
    group is one line of the text."""
    if n["kind"] in ("offline", "online"):
        return (n["device"], "link")
    return (n["device"], "alert", n["code"], n["key"])


def summarise(notices: list[dict]) -> list[dict]:
    """Fold a window's notices (in order) into one item per device connectivity and per alert.
    A notice that cannot be folded is logged and left out: it never holds back the others."""
    items: dict[tuple, dict] = {}
    for n in notices:
        try:
            _fold(items, n)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.error("notice %s left out of the notification: %s: %s", n.get("id"),
                      type(e).__name__, e)
    return list(items.values())


def _fold(items: dict[tuple, dict], n: dict) -> None:
    detail = _loads(n.get("detail"))
    key = group_key(n)
    if n["kind"] in ("offline", "online"):
        _fold_link(items.setdefault(key, {"device": n["device"], "outages": 0}), n, detail)
    else:
        _fold_alert(items.setdefault(key, {"device": n["device"], "kind": "alert",
                                           "code": n["code"], "key": n["key"], "raised": 0,
                                           "cleared": 0, "since": n["ts"], "historical": False,
                                           "device_time_invalid": False}), n, detail)


def _fold_link(item: dict, n: dict, detail: dict) -> None:
    if n["kind"] == "offline":
        item["outages"] += 1
        item.update(kind="offline", since=n["ts"], reason=detail.get("reason"))
        item.setdefault("first_down", n["ts"])
    else:
        item.update(kind="recovered", at=n["ts"])
        item.setdefault("first_down", detail.get("since"))


def _fold_alert(item: dict, n: dict, detail: dict) -> None:
    item["raised" if n["kind"] == "alert" else "cleared"] += 1
    item["state"] = "raised" if n["kind"] == "alert" else "cleared"
    item["last"] = n["ts"]
    item["historical"] = item["historical"] or bool(detail.get("historical"))
    if detail.get("device_time_invalid"):
        item["device_time_invalid"] = True
    if detail.get("detail"):
        item["detail"] = detail["detail"]


def _loads(text: Any) -> dict:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --- wording -----------------------------------------------------------------------------

def render(batch_id: int, body: dict, instance: str, tz: str,
           groups: dict[str, list[str]]) -> Message:
    """The words staff read (Vietnamese) and the webhook's JSON (every item). The text
    tells connectivity first (offline, back), then alerts; at most
    :data:`ALERT_LINES_PER_DEVICE` alert lines per device, the rest counted in one line, so
    no device can bury the others' lines."""
    zone = ZoneInfo(tz)
    items = [{**i, "groups": groups_of(i["device"], groups)} for i in body.get("items", [])]
    lines = _lines(items, zone)
    subject = "[TTCS] " + _headline(items)
    text = subject + "\n\n" + "\n".join(lines)
    payload = {"v": 1, "id": f"{instance}-{batch_id}", "batch": batch_id,
               "created": body.get("created"), "window_s": body.get("window_s"),
               "group_wait_s": body.get("group_wait_s"),
               "group_interval_s": body.get("group_interval_s"),
               "items": items, "text": text}
    return Message(key=payload["id"], subject=subject, text=text, payload=payload,
                   lines=lines)


def split(subject: str, lines: list[str], limit: int = TELEGRAM_MAX) -> list[str]:
    """The text in parts of at most ``limit`` UTF-16 units (Telegram's measure), cut at line
    boundaries; each part after a split is headed ``subject (k/n)``. Only a line longer than
    a whole part is cut inside (it cannot happen with the relay's caps on device text)."""
    whole = subject + ("\n\n" + "\n".join(lines) if lines else "")
    if utf16_len(whole) <= limit:
        return [whole]
    if not lines:
        return _cut(subject, limit)
    budget = limit - utf16_len(subject) - len(" (9999/9999)\n\n")
    chunks: list[list[str]] = [[]]
    size = 0
    for line in lines:
        for piece in _cut(line, budget):
            add = utf16_len(piece) + (1 if chunks[-1] else 0)
            if chunks[-1] and size + add > budget:
                chunks.append([])
                add = utf16_len(piece)
                size = 0
            chunks[-1].append(piece)
            size += add
    return [f"{subject} ({k}/{len(chunks)})\n\n" + "\n".join(c)
            for k, c in enumerate(chunks, 1)]


def _cut(line: str, budget: int) -> list[str]:
    pieces, cur, size = [], [], 0
    for ch in line:
        n = utf16_len(ch)
        if size + n > budget:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    return [*pieces, "".join(cur)]


def _lines(items: list[dict], zone: ZoneInfo) -> list[str]:
    order = {"offline": 0, "recovered": 1}
    shown_alerts: dict[str, int] = {}
    lines, more = [], {}
    for i in sorted(items, key=lambda i: order.get(i["kind"], 2)):  # stable: else in order
        if i["kind"] == "alert":
            if shown_alerts.get(i["device"], 0) >= ALERT_LINES_PER_DEVICE:
                more[i["device"]] = more.get(i["device"], 0) + 1
                continue
            shown_alerts[i["device"]] = shown_alerts.get(i["device"], 0) + 1
        lines.append(_line(i, zone))
    for device, n in more.items():
        lines.append(f"{device_id(device) or quote(device, 64)}: … và {n} cảnh báo khác"
                     " (trong webhook và relay.db)")
    return lines


def _headline(items: list[dict]) -> str:
    offline = sum(1 for i in items if i["kind"] == "offline")
    back = sum(1 for i in items if i["kind"] == "recovered")
    alerts = sum(1 for i in items if i["kind"] == "alert" and i["state"] == "raised")
    parts = []
    if offline:
        parts.append(f"{offline} cụm mất kết nối")
    if back:
        parts.append(f"{back} cụm đã kết nối lại")
    if alerts:
        parts.append(f"{alerts} cảnh báo")
    return ", ".join(parts) or "cảnh báo đã hết"


def _line(i: dict, zone: ZoneInfo) -> str:
    """One line per item, starting with the device it is about. What the device sent (its
    id, an alert code or key, a reason) is cleaned to one line; what is not one of ours is
    quoted, so a device can neither break a line nor write words that read as the relay's."""
    where = (device_id(i["device"]) or quote(i["device"], 64)) + \
        (f" [{', '.join(i['groups'])}]" if i["groups"] else "")
    return f"{where}: {_what(i, zone)}"


def _what(i: dict, zone: ZoneInfo) -> str:
    if i["kind"] == "offline":
        flaps = f"; {i['outages']} lần mất trong đợt này" if i["outages"] > 1 else ""
        reason = REASONS.get(i.get("reason") or "") or f"lý do {quote(i.get('reason'), 32)}"
        return f"🔴 MẤT KẾT NỐI từ {_hm(i['since'], zone)} ({reason}){flaps}"
    if i["kind"] == "recovered":
        down = f", mất từ {_hm(i['first_down'], zone)}" if i.get("first_down") else ""
        flaps = f"; {i['outages']} lần mất trong đợt này" if i["outages"] > 1 else ""
        return f"🟢 ĐÃ KẾT NỐI LẠI lúc {_hm(i['at'], zone)}{down}{flaps}"
    code = i["code"] if i["code"] in KNOWN_CODES else f"mã lạ {quote(i['code'], CODE_MAX)}"
    if i.get("key"):
        code += f"/{shown(i['key'], KEY_MAX)}"
    old = " (ghi nhận khi mất kết nối)" if i.get("historical") else ""
    if i.get("device_time_invalid"):
        old += " (giờ thiết bị gửi không hợp lệ: theo giờ relay nhận)"
    if i["state"] == "raised":
        again = f"; báo {i['raised']} lần" if i["raised"] > 1 else ""
        return f"⚠️ CẢNH BÁO {code} từ {_hm(i['since'], zone)}{again}{old}"
    return (f"✅ HẾT CẢNH BÁO {code} lúc {_hm(i['last'], zone)}"
            f" (báo {i['raised']} lần trong đợt này){old}")


def _hm(ms: int | None, zone: ZoneInfo) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "?"
    try:
        return datetime.fromtimestamp(ms / 1000, zone).strftime("%H:%M %d/%m")
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return "?"


# --- channels ----------------------------------------------------------------------------

def _http_error(resp: requests.Response) -> NotifyError:
    permanent = 400 <= resp.status_code < 500 and resp.status_code not in (408, 429)
    return NotifyError(f"HTTP {resp.status_code}", permanent=permanent)


class WebhookChannel:
    name = "webhook"

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout

    def send(self, msg: Message) -> None:
        try:
            resp = requests.post(self.url, json=msg.payload, timeout=self.timeout,
                                 headers={"Idempotency-Key": msg.key,
                                          "User-Agent": "ttcs-ctl-relay"})
        except requests.RequestException as e:
            raise NotifyError(f"{type(e).__name__}") from None
        if not 200 <= resp.status_code < 300:
            raise _http_error(resp)


class TelegramChannel:
    name = "telegram"

    def __init__(self, base_url: str, token: str, chat_id: str, timeout: float) -> None:
        self.base_url, self._token, self.chat_id = base_url.rstrip("/"), token, chat_id
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"TelegramChannel({self.base_url!r}, chat_id={self.chat_id!r})"

    def send(self, msg: Message) -> None:
        """A long text goes as several messages (:func:`split`); a retry starts at the first
        part that did not go out (``msg.parts_sent``)."""
        parts = split(msg.subject, msg.lines) if msg.lines else split(msg.text, [])
        for k in range(msg.parts_sent, len(parts)):
            try:
                self._send_one(parts[k])
            except NotifyError as e:
                e.parts_sent = k
                raise

    def _send_one(self, text: str) -> None:
        url = f"{self.base_url}/bot{self._token}/sendMessage"
        body = {"chat_id": self.chat_id, "text": text, "disable_web_page_preview": True}
        try:
            resp = requests.post(url, json=body, timeout=self.timeout)
        except requests.RequestException as e:
            # the exception text holds the URL, and so the token: name only its type
            raise NotifyError(f"{type(e).__name__} talking to {self.base_url}") from None
        if not 200 <= resp.status_code < 300:
            raise _http_error(resp)
        try:
            ok = resp.json().get("ok") is True
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise NotifyError("Telegram answered without ok: true")


class EmailChannel:
    name = "email"

    def __init__(self, cfg: dict, password: str | None, timeout: float) -> None:
        self.cfg, self._password, self.timeout = cfg, password, timeout

    def __repr__(self) -> str:
        return f"EmailChannel({self.cfg['smtp_host']!r}, to={self.cfg['to']!r})"

    def send(self, msg: Message) -> None:
        mail = EmailMessage()
        mail["From"], mail["To"] = self.cfg["from"], ", ".join(self.cfg["to"])
        mail["Subject"] = msg.subject
        mail["Message-ID"] = f"<{msg.key}@ttcs-relay>"
        mail.set_content(msg.text)
        try:
            with self._open() as smtp:
                if self.cfg.get("username"):
                    smtp.login(self.cfg["username"], self._password or "")
                smtp.send_message(mail)
        except smtplib.SMTPAuthenticationError:
            raise NotifyError("SMTP login refused", permanent=True) from None
        except (smtplib.SMTPException, OSError) as e:
            raise NotifyError(f"SMTP: {type(e).__name__}") from None

    def _open(self) -> smtplib.SMTP:
        host, port = self.cfg["smtp_host"], int(self.cfg["smtp_port"])
        if self.cfg.get("ssl"):
            return smtplib.SMTP_SSL(host, port, timeout=self.timeout,
                                    context=ssl.create_default_context())
        smtp = smtplib.SMTP(host, port, timeout=self.timeout)
        if self.cfg.get("starttls"):
            smtp.starttls(context=ssl.create_default_context())
        return smtp


def channels_from_config(alerts: dict) -> list[Channel]:
    """The configured channels; a secret file readable by others raises PermissionError."""
    timeout = float(alerts["timeout_s"])
    out: list[Channel] = []
    if alerts.get("webhook_url"):
        out.append(WebhookChannel(alerts["webhook_url"], timeout))
    tg = alerts.get("telegram")
    if tg:
        token = read_secret(_expand(tg["bot_token_file"]))
        out.append(TelegramChannel(tg["base_url"], token, str(tg["chat_id"]), timeout))
    mail = alerts.get("email")
    if mail:
        password = read_secret(_expand(mail["password_file"])) if mail.get("password_file") \
            else None
        out.append(EmailChannel(mail, password, timeout))
    return out


def _expand(path: str) -> str:
    import os

    return os.path.expanduser(path)


# --- delivery ----------------------------------------------------------------------------

def backoff_ms(attempts: int, base_s: float, cap_s: float) -> int:
    """Delay before retry number ``attempts`` (1-based): base·2^(n-1), capped."""
    return int(min(cap_s, base_s * 2 ** min(attempts - 1, 30)) * 1000)


class Dispatcher:
    """Sends due deliveries, one channel call at a time, and records each outcome."""

    def __init__(self, store: Any, channels: Iterable[Channel], retry: dict,
                 relay_cfg: dict) -> None:
        self.store = store
        self.channels = {c.name: c for c in channels}
        self.retry = retry
        self.tz = relay_cfg.get("timezone", "Asia/Ho_Chi_Minh")
        self.groups = relay_cfg.get("groups") or {}
        self.instance = store.instance_id()

    def run_due(self, now_ms: int) -> int:
        """Try every due delivery once; returns how many were sent. Each is tried on its
        own: one that cannot even be rendered is logged and given up, never blocking the
        queue."""
        with self.store.lock:
            due = [dict(r) for r in self.store.q(
                "SELECT d.batch, d.channel, d.attempts, d.parts_sent, b.body FROM deliveries d"
                " JOIN batches b"
                " ON b.id = d.batch WHERE d.sent_ms IS NULL AND d.failed = 0 AND d.next_ms <= ?"
                " ORDER BY d.batch, d.channel", now_ms)]
        sent = 0
        for row in due:
            sent += self._deliver(row, now_ms)
        return sent

    def _deliver(self, row: dict, now_ms: int) -> int:
        channel = self.channels.get(row["channel"])
        if channel is None:
            self._record(row, now_ms, NotifyError("channel no longer configured", True))
            return 0
        try:
            msg = render(row["batch"], json.loads(row["body"]), self.instance, self.tz,
                         self.groups)
        except Exception as e:  # a bad batch must not stop the ones after it
            log.exception("notification %d cannot be rendered", row["batch"])
            self._record(row, now_ms, NotifyError(f"render: {type(e).__name__}", True))
            return 0
        msg.parts_sent = row["parts_sent"]
        try:
            channel.send(msg)
        except NotifyError as e:
            self._record(row, now_ms, e)
            return 0
        except Exception as e:  # noqa: BLE001 - a channel bug must not stop the others
            self._record(row, now_ms, NotifyError(type(e).__name__))
            return 0
        self._record(row, now_ms, None)
        return 1

    def _record(self, row: dict, now_ms: int, error: NotifyError | None) -> None:
        attempts = row["attempts"] + 1
        with self.store.tx():
            if error is None:
                self.store.x("UPDATE deliveries SET attempts=?, sent_ms=?, error=NULL"
                             " WHERE batch=? AND channel=?", attempts, now_ms, row["batch"],
                             row["channel"])
                log.info("notification %d sent by %s", row["batch"], row["channel"])
                return
            give_up = error.permanent or attempts >= int(self.retry["attempts"])
            next_ms = now_ms + backoff_ms(attempts, float(self.retry["backoff_s"]),
                                          float(self.retry["backoff_max_s"]))
            self.store.x("UPDATE deliveries SET attempts=?, next_ms=?, failed=?, error=?,"
                         " parts_sent=MAX(parts_sent, ?) WHERE batch=? AND channel=?", attempts,
                         next_ms, int(give_up), str(error), error.parts_sent, row["batch"],
                         row["channel"])
        log.warning("notification %d by %s failed (attempt %d%s): %s", row["batch"],
                    row["channel"], attempts, ", giving up" if give_up else "", error)
