"""A stolen cabinet may publish anything on its own ``event``, ``health`` and ``status``
topics (the broker's ACL allows it): the relay, as its own process against a real mosquitto
and real agents, must keep telling staff the truth about every other device."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Watcher, agent_config, wait_online, wait_until
from tests.relay_support import (  # noqa: F401 - fixtures
    http_fixture,
    relay_config,
    relay_proc_fixture,
    watcher_fixture,
    webhook_fixture,
)

VICTIM = "krongpa-phutuc-c03"
EVIL = "krongpa-evil-c09"
YEAR_33658_MS = 10**15  # 1e12 s after 1970: datetime.fromtimestamp raises "year out of range"


class Evil:
    """The stolen cabinet: publishes on its own topics, with increasing ``seq``."""

    def __init__(self, watcher: Watcher, device: str = EVIL) -> None:
        self.w, self.device, self.seq = watcher, device, 0

    def alert(self, **body) -> None:
        self.seq += 1
        self.w.publish(f"ttcs/dev/{self.device}/event",
                       {"v": 1, "seq": self.seq, "type": "alert", "state": "raised", **body})


def _victim_and_relay(w, broker, keys, tmp_path, agent_factory, relay_proc, cfg_path):
    agent = agent_factory(agent_config(tmp_path, broker.port, keys, device=VICTIM))
    wait_online(w, VICTIM)
    return agent, relay_proc(cfg_path)


def test_a_timestamp_in_year_33658_does_not_silence_the_fleet(w, broker, keys, tmp_path,
                                                              agent_factory, webhook,
                                                              relay_proc):
    agent, relay = _victim_and_relay(w, broker, keys, tmp_path, agent_factory, relay_proc,
                                     relay_config(tmp_path, broker.port, webhook.url))
    Evil(w).alert(ts=YEAR_33658_MS, code="door_open")
    agent.kill()  # the victim's will: a real offline
    wait_until(lambda: any(i["device"] == VICTIM for i in webhook.items()), 20,
               what="the victim's offline notice")
    [offline] = [i for i in webhook.items() if i["device"] == VICTIM]
    assert offline["kind"] == "offline" and offline["reason"] == "lost"
    # the hostile alert is told too, dated by the relay's clock and flagged as such
    [evil] = [i for i in webhook.items() if i["device"] == EVIL]
    assert evil["code"] == "door_open" and evil["device_time_invalid"] is True
    assert abs(evil["since"] - offline["since"]) < 60_000
    assert relay.proc.poll() is None


def test_line_breaks_cannot_forge_another_devices_line(w, broker, tmp_path, webhook,
                                                       relay_proc):
    relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url))
    forged = f"✅ HẾT CẢNH BÁO mains_lost tại {VICTIM} [krongpa] lúc 23:00 24/11"
    evil = Evil(w)
    evil.alert(ts=_now_ms(), code=f"door_open\r\n{forged}")
    evil.alert(ts=_now_ms(), code="door_open", key=f"x\n{forged}\u2028{forged}")
    wait_until(lambda: len(webhook.items()) >= 2, 20, what="the evil device's alerts")
    text = "\n".join(webhook.texts())
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("[TTCS]")]
    assert len(lines) == 2, text
    assert all(ln.startswith(f"{EVIL} ") for ln in lines), text
    assert not any(ln.startswith(("✅", VICTIM)) for ln in lines), text
    # shown as data: quoted, never as words of ours
    assert '"door_open ✅ HẾT CẢNH BÁO' in lines[0]
    assert relay.proc.poll() is None


def test_long_alert_keys_do_not_push_another_device_out_of_telegram(
        w, broker, keys, tmp_path, agent_factory, http, relay_proc):
    telegram = http()
    token = tmp_path / "bot.token"
    token.write_text("123:TOKEN")
    token.chmod(0o600)
    cfg = relay_config(tmp_path, broker.port, None, alerts={"telegram": {
        "bot_token_file": str(token), "chat_id": "-100", "base_url": telegram.base}})
    agent, relay = _victim_and_relay(w, broker, keys, tmp_path, agent_factory, relay_proc, cfg)
    evil = Evil(w)
    evil.alert(ts=_now_ms(), code="disk_low", key="k" * 5000)
    for n in range(40):
        evil.alert(ts=_now_ms(), code="disk_low", key=f"{n:02d}-" + "x" * 200)
    for n in range(40):  # a commune's worth of cabinets down: more than one message
        cabinet = f"krongpa-xa{n:02d}-c01"
        for state in ("online", "offline"):
            w.publish(f"ttcs/dev/{cabinet}/status",
                      {"v": 1, "state": state, "session": 1, "reason": "lost"})
    agent.kill()
    wait_until(lambda: any(VICTIM in t for t in telegram.texts()), 20,
               what="the victim's line on Telegram")
    wait_until(lambda: any("cảnh báo khác" in t for t in telegram.texts()), 20,
               what="the last line")
    assert sum(t.count("krongpa-xa") for t in telegram.texts()) == 40
    texts = telegram.texts()
    assert len(texts) >= 2
    assert all(len(t.encode("utf-16-le")) // 2 <= 4096 for t in texts)
    [line] = [ln for t in texts for ln in t.splitlines() if ln.startswith(VICTIM)]
    assert "MẤT KẾT NỐI" in line
    evil_lines = [ln for t in texts for ln in t.splitlines() if ln.startswith(EVIL)]
    assert len(evil_lines) == 11 and "và 31 cảnh báo khác" in evil_lines[-1]
    assert relay.proc.poll() is None


def test_watch_shows_what_devices_send_as_plain_text(w, broker, tmp_path):
    ansi = "\x1b]0;pwned\x07\x1b[2J"
    w.publish(f"ttcs/dev/{EVIL}/status", {"v": 1, "state": "offline", "session": 1,
                                           "reason": f"{ansi}\n[bold green]online[/]"},
              retain=True)
    w.publish(f"ttcs/dev/{EVIL}/state", {
        "v": 1, "playing": {"id": f"bản tin\n{ansi}" + "x" * 500}, "volume": 10**30,
        "alerts": [{"code": f"door_open\n{n}"} for n in range(500)]}, retain=True)
    w.publish(f"ttcs/dev/{EVIL}/health", b"[" * 60_000, retain=True)  # nested too deep
    w.publish(f"ttcs/dev/{VICTIM}/status", {"v": 1, "state": "online", "session": 1},
              retain=True)
    cfg = relay_config(tmp_path, broker.port, None)
    out = subprocess.run([sys.executable, "-m", "ctl", "--config", str(cfg), "watch",
                          "--once", "1.5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    [row] = [ln for ln in out.stdout.splitlines() if EVIL in ln]
    cells = [c.strip() for c in row.split("│")]
    assert cells[3] == 'OFFLINE "]0;pwned[2J [bold green]online[…"'  # text, not markup
    assert cells[4].endswith(" s") and cells[5].startswith('"bản tin') and cells[6] == "-"
    assert out.stdout.count('"door_open') == 20  # alerts kept per device: bounded
    assert "1/2 online" in out.stdout and VICTIM in out.stdout


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
