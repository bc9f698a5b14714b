"""Notification channels against local stand-ins: a webhook and a Telegram Bot API server
(http.server on 127.0.0.1) and an SMTP server (aiosmtpd)."""

from __future__ import annotations

import logging
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
from aiosmtpd.controller import Controller

from ctl.notify import (
    TELEGRAM_MAX,
    Dispatcher,
    EmailChannel,
    NotifyError,
    TelegramChannel,
    WebhookChannel,
    backoff_ms,
    channels_from_config,
    render,
    split,
)
from ctl.relay import Relay, RelaySettings
from ctl.sanitize import utf16_len
from ctl.store import RelayStore
from tests.conftest import free_port
from tests.relay_support import http_fixture  # noqa: F401 - a fixture

T0 = 1_764_000_000_000
TOKEN = "123456:SECRET-token-do-not-log"
BATCH = {"created": T0, "window_s": 60, "items": [
    {"device": "krongpa-phutuc-c03", "kind": "offline", "since": T0, "reason": "lost",
     "outages": 2, "first_down": T0}]}


class Inbox:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    ctl = Controller(inbox, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield ctl, inbox
    ctl.stop()


def message():
    return render(7, BATCH, "abcd", "Asia/Ho_Chi_Minh", {"krongpa": ["krongpa-*"]})


def test_render_is_vietnamese_and_structured():
    m = message()
    assert m.key == "abcd-7" and m.subject == "[TTCS] 1 cụm mất kết nối"
    assert "krongpa-phutuc-c03 [krongpa]: 🔴 MẤT KẾT NỐI từ 23:00 24/11" in m.text
    assert "mất kết nối đột ngột" in m.text and "2 lần mất" in m.text
    assert m.payload["items"][0]["groups"] == ["krongpa"] and m.payload["id"] == "abcd-7"


def test_webhook_posts_json_with_idempotency_key(http):
    hook = http()
    WebhookChannel(hook.base + "/alerts", 5).send(message())
    [(path, data, headers)] = hook.requests
    assert path == "/alerts" and data["batch"] == 7 and data["items"][0]["kind"] == "offline"
    assert headers["Idempotency-Key"] == "abcd-7"


def test_webhook_errors_classified(http):
    hook = http(statuses=[503, 404])
    with pytest.raises(NotifyError) as e:
        WebhookChannel(hook.base, 5).send(message())
    assert not e.value.permanent
    with pytest.raises(NotifyError) as e:
        WebhookChannel(hook.base, 5).send(message())
    assert e.value.permanent
    with pytest.raises(NotifyError) as e:  # nobody listening
        WebhookChannel(f"http://127.0.0.1:{free_port()}/", 2).send(message())
    assert not e.value.permanent


def test_telegram_send_message(http):
    tg = http()
    TelegramChannel(tg.base, TOKEN, "-1001234", 5).send(message())
    [(path, data, _)] = tg.requests
    assert path == f"/bot{TOKEN}/sendMessage"
    assert data["chat_id"] == "-1001234" and "MẤT KẾT NỐI" in data["text"]


def test_telegram_never_leaks_the_token(http, caplog):
    tg = http(statuses=[500], body={"ok": False})
    chan = TelegramChannel(tg.base, TOKEN, "1", 5)
    with pytest.raises(NotifyError) as e:
        chan.send(message())
    assert TOKEN not in str(e.value) and TOKEN not in repr(chan)
    dead = TelegramChannel(f"http://127.0.0.1:{free_port()}", TOKEN, "1", 2)
    with pytest.raises(NotifyError) as e:
        dead.send(message())
    assert TOKEN not in str(e.value)
    # through the dispatcher, whose log lines carry the error
    store = RelayStore(":memory:")
    relay = Relay(store, RelaySettings(group_wait_s=0, group_interval_s=0, channels=["telegram"]))
    relay.handle("ttcs/dev/d1/status", b'{"state":"offline","session":1,"ts":1}', False, T0)
    relay.tick(T0)
    with caplog.at_level(logging.DEBUG):
        Dispatcher(store, [dead], {"attempts": 3, "backoff_s": 1, "backoff_max_s": 1},
                   {}).run_due(T0)
    assert "failed" in caplog.text and TOKEN not in caplog.text
    assert TOKEN not in store.one("SELECT error FROM deliveries")["error"]


def test_telegram_ok_false_is_an_error(http):
    tg = http(body={"ok": False, "description": "chat not found"})
    with pytest.raises(NotifyError):
        TelegramChannel(tg.base, TOKEN, "1", 5).send(message())


def test_email_over_smtp(smtp):
    ctl, inbox = smtp
    cfg = {"smtp_host": "127.0.0.1", "smtp_port": ctl.port, "starttls": False, "ssl": False,
           "username": None, "from": "relay@huyen.gov.vn", "to": ["a@x.vn", "b@x.vn"]}
    EmailChannel(cfg, None, 5).send(message())
    [(sender, rcpts, content)] = inbox.mails
    assert sender == "relay@huyen.gov.vn" and rcpts == ["a@x.vn", "b@x.vn"]
    mail = message_from_bytes(content, policy=default_policy)
    assert mail["Subject"] == "[TTCS] 1 cụm mất kết nối"
    assert "krongpa-phutuc-c03 [krongpa]: 🔴 MẤT KẾT NỐI" in mail.get_content()


def test_email_unreachable_is_retryable():
    cfg = {"smtp_host": "127.0.0.1", "smtp_port": free_port(), "starttls": False, "ssl": False,
           "username": None, "from": "r@x.vn", "to": ["a@x.vn"]}
    with pytest.raises(NotifyError) as e:
        EmailChannel(cfg, None, 2).send(message())
    assert not e.value.permanent


def _alerts(tmp_path, **over) -> dict:
    tok = tmp_path / "bot.token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(0o600)
    cfg = {"webhook_url": None, "timeout_s": 5,
           "telegram": {"bot_token_file": str(tok), "chat_id": "1", "base_url": "http://x"},
           "email": None, "retry": {"attempts": 3, "backoff_s": 1, "backoff_max_s": 4}}
    cfg.update(over)
    return cfg


def test_secret_files_must_be_private(tmp_path):
    alerts = _alerts(tmp_path)
    [chan] = channels_from_config(alerts)
    assert isinstance(chan, TelegramChannel) and chan._token == TOKEN
    (tmp_path / "bot.token").chmod(0o640)
    with pytest.raises(PermissionError, match="chmod 600") as e:
        channels_from_config(alerts)
    assert TOKEN not in str(e.value)
    pw = tmp_path / "smtp.pw"
    pw.write_text("hunter2")
    pw.chmod(0o604)
    mail = {"smtp_host": "h", "smtp_port": 25, "starttls": True, "ssl": False,
            "username": "u", "password_file": str(pw), "from": "a@b.c", "to": ["d@e.f"]}
    with pytest.raises(PermissionError):
        channels_from_config({**alerts, "telegram": None, "email": mail})
    pw.chmod(0o600)
    [chan] = channels_from_config({**alerts, "telegram": None, "email": mail})
    assert "hunter2" not in repr(chan)


def test_all_three_channels_one_batch_each_with_backoff(tmp_path, http, smtp):
    """A batch goes to every channel once; a failing channel is retried on its own."""
    ctl, inbox = smtp
    hook, tg = http(statuses=[500, 502]), http()
    (tmp_path / "bot.token").write_text(TOKEN)
    (tmp_path / "bot.token").chmod(0o600)
    alerts = _alerts(tmp_path, webhook_url=hook.base + "/h",
                     telegram={"bot_token_file": str(tmp_path / "bot.token"), "chat_id": "42",
                               "base_url": tg.base},
                     email={"smtp_host": "127.0.0.1", "smtp_port": ctl.port, "starttls": False,
                            "ssl": False, "username": None, "password_file": None,
                            "from": "r@x.vn", "to": ["staff@x.vn"]})
    channels = channels_from_config(alerts)
    store = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(store, RelaySettings(group_wait_s=0, group_interval_s=0, channels=[c.name for c in channels]))
    relay.handle("ttcs/dev/d1/status", b'{"state":"offline","session":1,"ts":1}', False, T0)
    relay.tick(T0)
    d = Dispatcher(store, channels, alerts["retry"], {})
    assert d.run_due(T0) == 2  # telegram and e-mail; the webhook got 500
    assert d.run_due(T0 + 999) == 0  # backoff 1 s
    assert d.run_due(T0 + 1000) == 0  # 502; next in 2 s
    assert d.run_due(T0 + 2999) == 0
    assert d.run_due(T0 + 3000) == 1
    assert d.run_due(T0 + 100_000) == 0
    assert len(hook.requests) == 3 and len(tg.requests) == 1 and len(inbox.mails) == 1
    assert {r["channel"]: r["attempts"] for r in store.q("SELECT * FROM deliveries")} == \
        {"webhook": 3, "telegram": 1, "email": 1}
    store.close()


def test_backoff_doubles_and_caps():
    assert [backoff_ms(n, 5, 60) for n in range(1, 7)] == [5000, 10000, 20000, 40000, 60000,
                                                            60000]


# --- Telegram: long texts in several messages ---------------------------------------------

def test_split_keeps_short_texts_whole():
    assert split("[TTCS] x", ["a", "b"]) == ["[TTCS] x\n\na\nb"]
    assert split("[TTCS] x", []) == ["[TTCS] x"]


def test_split_at_line_boundaries_under_telegrams_limit():
    lines = [f"krongpa-c{n:03d} [krongpa]: 🔴 MẤT KẾT NỐI từ 23:00 24/11 " + "ệ" * (n % 90)
             for n in range(300)]
    parts = split("[TTCS] 300 cụm mất kết nối", lines)
    assert len(parts) > 2
    assert all(utf16_len(p) <= TELEGRAM_MAX for p in parts)
    assert [p.split("\n", 1)[0] for p in parts] == [
        f"[TTCS] 300 cụm mất kết nối ({k}/{len(parts)})" for k in range(1, len(parts) + 1)]
    assert [ln for p in parts for ln in p.split("\n")[2:]] == lines  # whole lines, in order


def test_split_cuts_only_a_line_longer_than_a_message():
    parts = split("[TTCS] x", ["🔴" * 5000, "short"])
    assert all(utf16_len(p) <= TELEGRAM_MAX for p in parts)
    assert "".join(p.split("\n\n", 1)[1].replace("\nshort", "") for p in parts) == "🔴" * 5000
    assert parts[-1].endswith("\nshort")


def test_telegram_retry_resumes_at_the_part_that_failed(http):
    tg = http(statuses=[200, 500])
    store = RelayStore(":memory:")
    relay = Relay(store, RelaySettings(group_wait_s=0, group_interval_s=0, channels=["telegram"]))
    for n in range(60):
        relay.handle(f"ttcs/dev/krongpa-c{n:03d}/status",
                     b'{"state":"offline","session":1,"ts":1,"reason":"' + b"x" * 30 + b'"}',
                     False, T0)
    relay.tick(T0)
    d = Dispatcher(store, [TelegramChannel(tg.base, TOKEN, "1", 5)],
                   {"attempts": 5, "backoff_s": 1, "backoff_max_s": 1}, {})
    assert d.run_due(T0) == 0  # part 1 went out, part 2 got 500
    row = store.one("SELECT * FROM deliveries")
    assert (row["parts_sent"], row["attempts"], row["sent_ms"]) == (1, 1, None)
    assert d.run_due(T0 + 1000) == 1
    texts = [data["text"] for _, data, _ in tg.requests]
    assert len(texts) == 3 and texts[1] == texts[2] and texts[0] != texts[1]
    assert texts[0].startswith("[TTCS] 60 cụm mất kết nối (1/2)")
    assert sum(t.count("MẤT KẾT NỐI") for t in (texts[0], texts[2])) == 60
    store.close()
