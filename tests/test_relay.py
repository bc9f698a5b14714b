"""The relay: its logic driven by an injected clock, then as a process against a real
mosquitto, real agents and a local webhook server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctl.config import groups_of
from ctl.notify import Dispatcher, Message, NotifyError, render
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.conftest import ROOT, Watcher, agent_config, wait_online, wait_until
from tests.relay_support import (  # noqa: F401 - fixtures
    http_fixture,
    relay_config,
    relay_proc_fixture,
    watcher_fixture,
    webhook_fixture,
)

T0 = 1_764_000_000_000  # 2025-11-24 16:00 UTC
S = 1000
DEV = "krongpa-phutuc-c03"


def msg(leaf: str, device: str = DEV, **body) -> tuple[str, bytes]:
    return f"ttcs/dev/{device}/{leaf}", json.dumps({"v": 1, **body}).encode()


class Harness:
    """A relay over a real SQLite file, fed messages at chosen times."""

    def __init__(self, path: Path, wait_s: float = 60, interval_s: float = 60,
                 channels=("test",), codes=()) -> None:
        self.path = path
        self.settings = RelaySettings(heartbeat_default_s=60, missed_beats=3,
                                      group_wait_s=wait_s, group_interval_s=interval_s,
                                      alert_codes=list(codes), channels=list(channels))
        self.open()

    def open(self) -> None:
        self.store = RelayStore(str(self.path))
        self.relay = Relay(self.store, self.settings)

    def reopen(self) -> None:
        self.store.close()
        self.open()

    def feed(self, at_ms: int, leaf: str, device: str = DEV, retained: bool = False, **body):
        topic, payload = msg(leaf, device, **body)
        self.relay.handle(topic, payload, retained, at_ms)

    def online(self, at_ms: int, session: int = 1, device: str = DEV, retained: bool = False):
        self.feed(at_ms, "status", device, retained, state="online", ts=at_ms, session=session)

    def offline(self, at_ms: int, reason: str = "lost", session: int = 1, device: str = DEV,
                retained: bool = False):
        self.feed(at_ms, "status", device, retained, state="offline", ts=at_ms,
                  session=session, reason=reason)

    def device(self, device: str = DEV) -> dict:
        return dict(self.store.one("SELECT * FROM devices WHERE device=?", device))

    def batches(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.store.q("SELECT body FROM batches ORDER BY id")]

    def items(self) -> list[dict]:
        return [i for b in self.batches() for i in b["items"]]


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "relay.db")
    yield harness
    harness.store.close()


# --- offline detection -------------------------------------------------------------------

def test_will_marks_offline_and_notifies_after_the_window(h):
    h.online(T0)
    assert h.relay.tick(T0 + 1 * S) is None  # first sighting of an up device: nothing to say
    h.offline(T0 + 10 * S, reason="lost")
    assert h.device()["online"] == 0 and h.device()["reason"] == "lost"
    assert h.relay.tick(T0 + 60 * S) is None  # the window (60 s) is still open
    assert h.relay.tick(T0 + 70 * S) == 1
    [item] = h.items()
    assert item["kind"] == "offline" and item["device"] == DEV and item["reason"] == "lost"
    assert item["since"] == T0 + 10 * S and item["outages"] == 1
    rows = h.store.q("SELECT online, ts FROM transitions ORDER BY rowid")
    assert [(r["online"], r["ts"]) for r in rows] == [(1, T0), (0, T0 + 10 * S)]


def test_missed_heartbeats_with_learned_interval(h):
    h.online(T0)
    for i in range(3):  # health every 20 s: the relay learns 20 s
        h.feed(T0 + i * 20 * S, "health", ts=T0 + i * 20 * S)
    assert h.device()["interval_ms"] == 20 * S
    last = T0 + 40 * S
    h.relay.tick(last + 60 * S)  # exactly three intervals: not yet
    assert h.device()["online"] == 1
    h.relay.tick(last + 61 * S)
    d = h.device()
    assert d["online"] == 0 and d["reason"] == "heartbeat"
    assert d["since_ms"] == last  # the outage began at the last sign of life
    # a live health sample brings it back; the gap across the outage is not learned
    h.feed(last + 300 * S, "health", ts=last + 300 * S)
    assert h.device()["online"] == 1 and h.device()["interval_ms"] == 20 * S
    h.relay.tick(last + 310 * S)
    [item] = h.items()
    assert item["kind"] == "recovered" and item["outages"] == 1 and item["at"] == last + 300 * S


def test_default_heartbeat_when_nothing_learned(h):
    h.online(T0)
    h.relay.tick(T0 + 180 * S)
    assert h.device()["online"] == 1
    h.relay.tick(T0 + 181 * S)
    assert h.device()["online"] == 0


def test_historical_and_retained_messages_are_no_sign_of_life(h):
    h.online(T0)
    h.relay.tick(T0 + 200 * S)
    assert h.device()["online"] == 0
    h.feed(T0 + 210 * S, "health", ts=T0 + 5 * S, historical=True)
    h.feed(T0 + 211 * S, "state", retained=True, ts=T0)
    assert h.device()["online"] == 0
    h.feed(T0 + 212 * S, "event", seq=1, ts=T0 + 212 * S, type="config", result="applied")
    assert h.device()["online"] == 1


def test_relay_downtime_is_not_the_devices_silence(h):
    h.online(T0)
    h.relay.connected(T0 + 3600 * S)  # the relay (re)connected an hour later
    h.relay.tick(T0 + 3600 * S + 100 * S)
    assert h.device()["online"] == 1
    h.relay.tick(T0 + 3600 * S + 181 * S)
    assert h.device()["online"] == 0


def test_late_will_of_an_older_session_is_ignored(h):
    h.online(T0, session=4)
    h.offline(T0 + 5 * S, session=3)
    assert h.device()["online"] == 1 and h.device()["session"] == 4


def test_shutdown_then_will_does_not_notify_twice(h):
    h.online(T0)
    h.offline(T0 + S, reason="shutdown")
    h.offline(T0 + 2 * S, reason="lost")
    h.relay.tick(T0 + 100 * S)
    [item] = h.items()
    assert item["kind"] == "offline" and item["reason"] == "shutdown"


# --- grouping ----------------------------------------------------------------------------

def test_flapping_device_is_one_line_per_window(h):
    h.online(T0)
    for i in range(5):  # five outages within a minute
        h.offline(T0 + (10 * i + 1) * S)
        h.online(T0 + (10 * i + 5) * S)
    h.offline(T0 + 55 * S)
    h.online(T0 + 56 * S, device="other-dev")
    h.offline(T0 + 57 * S, device="other-dev")
    assert h.relay.tick(T0 + 60 * S) is None
    assert h.relay.tick(T0 + 61 * S) == 1
    items = {i["device"]: i for i in h.items()}
    assert set(items) == {DEV, "other-dev"}
    assert items[DEV]["kind"] == "offline" and items[DEV]["outages"] == 6
    assert items["other-dev"]["kind"] == "offline"
    # the device comes back in the next window: one recovery line
    h.online(T0 + 100 * S)
    h.relay.tick(T0 + 161 * S)
    assert h.batches()[-1]["items"] == [
        {"device": DEV, "outages": 0, "kind": "recovered", "at": T0 + 100 * S,
         "first_down": T0 + 55 * S}]
    msg = render(2, h.batches()[-1], "inst", "Asia/Ho_Chi_Minh", {"krongpa": ["krongpa-*"]})
    assert "krongpa-phutuc-c03 [krongpa]: 🟢 ĐÃ KẾT NỐI LẠI lúc 23:01 24/11" in msg.text
    assert "mất từ 23:00 24/11" in msg.text


def test_alerts_grouped_filtered_and_deduplicated(tmp_path):
    h = Harness(tmp_path / "r.db", wait_s=300, codes=("door_open", "disk_low"))
    h.online(T0)
    seq = 0
    for _ in range(4):  # a door chattering: raised/cleared four times
        for state in ("raised", "cleared"):
            seq += 1
            h.feed(T0 + seq * S, "event", seq=seq, ts=T0 + seq * S, type="alert",
                   state=state, code="door_open", since=T0)
    seq += 1
    h.feed(T0 + 20 * S, "event", seq=seq, ts=T0 + 20 * S, type="alert", state="raised",
           code="cpu_temp")  # not in alerts.codes
    seq += 1
    h.feed(T0 + 21 * S, "event", seq=seq, ts=T0 + 21 * S, type="alert", state="raised",
           code="disk_low", key="cache", historical=True)
    h.feed(T0 + 22 * S, "event", seq=seq, ts=T0 + 21 * S, type="alert", state="raised",
           code="disk_low", key="cache", historical=True)  # QoS 1 duplicate
    assert h.relay.counters.duplicates == 1
    h.relay.tick(T0 + 400 * S)
    items = {i["code"]: i for i in h.items() if i["kind"] == "alert"}
    assert set(items) == {"door_open", "disk_low"}
    assert [i["kind"] for i in h.items() if "code" not in i] == ["offline"]  # silent 180 s
    assert items["door_open"]["raised"] == 4 and items["door_open"]["state"] == "cleared"
    assert items["disk_low"]["key"] == "cache" and items["disk_low"]["historical"] is True
    text = render(1, h.batches()[0], "i", "Asia/Ho_Chi_Minh", {}).text
    assert f"{DEV}: ✅ HẾT CẢNH BÁO door_open lúc" in text and "báo 4 lần" in text
    assert f"{DEV}: ⚠️ CẢNH BÁO disk_low/cache từ" in text
    assert "ghi nhận khi mất kết nối" in text
    h.store.close()


def test_default_timing_first_notice_after_30_s(tmp_path):
    h = Harness(tmp_path / "d.db")
    h.settings = RelaySettings(channels=["test"])  # the defaults: wait 30 s, interval 300 s
    h.relay = Relay(h.store, h.settings)
    h.online(T0)
    h.offline(T0 + S)
    assert h.relay.tick(T0 + 30 * S) is None
    assert h.relay.tick(T0 + 31 * S) == 1  # not after five minutes
    h.store.close()


def test_a_new_group_is_not_held_by_another_groups_interval(tmp_path):
    h = Harness(tmp_path / "g.db", wait_s=30, interval_s=300)
    h.settings.heartbeat_default_s = 10**6  # no heartbeat outages in this story
    for d in (DEV, "dev-b", "dev-c", "dev-d"):
        h.online(T0, device=d)
    # a burst: three cabinets of a commune lose power within 20 s: one message
    for i, d in enumerate((DEV, "dev-b", "dev-c")):
        h.offline(T0 + (10 + 10 * i) * S, device=d)
    assert h.relay.tick(T0 + 39 * S) is None
    assert h.relay.tick(T0 + 40 * S) == 1
    assert {i["device"] for i in h.batches()[0]["items"]} == {DEV, "dev-b", "dev-c"}
    # DEV comes back at once: a change to a notified group waits for the interval ...
    h.online(T0 + 60 * S)
    # ... but another cabinet going down is a new group: after group_wait, on its own
    h.offline(T0 + 100 * S, device="dev-d")
    assert h.relay.tick(T0 + 129 * S) is None
    assert h.relay.tick(T0 + 130 * S) == 2
    assert [(i["device"], i["kind"]) for i in h.batches()[1]["items"]] == [("dev-d", "offline")]
    assert h.relay.tick(T0 + 339 * S) is None
    assert h.relay.tick(T0 + 340 * S) == 3  # 300 s after the first batch
    assert [(i["device"], i["kind"]) for i in h.batches()[2]["items"]] == [(DEV, "recovered")]
    assert h.batches()[2]["group_wait_s"] == 30 and h.batches()[2]["group_interval_s"] == 300
    h.store.close()


def test_group_window_s_the_old_key_is_still_read(tmp_path):
    from ctl import config

    assert config.grouping({}) == (30.0, 300.0, None)
    assert config.grouping({"group_wait_s": 5, "group_interval_s": 60}) == (5.0, 60.0, None)
    wait, interval, note = config.grouping({"group_window_s": 120})
    assert (wait, interval) == (30.0, 120.0) and "old name of group_interval_s" in note
    assert config.grouping({"group_window_s": 0})[:2] == (0.0, 0.0)  # still "at once"
    wait, interval, note = config.grouping({"group_window_s": 120, "group_interval_s": 90})
    assert (wait, interval) == (30.0, 90.0) and "ignored" in note
    old = tmp_path / "old.yaml"
    old.write_text("relay:\n  group_window_s: 120\n")
    settings = RelaySettings.from_config(config.load(str(old)), [])
    assert (settings.group_wait_s, settings.group_interval_s) == (30.0, 120.0)


def test_a_flood_of_notices_still_makes_a_batch(h):
    """Forty thousand distinct alerts of one cabinet pending at once (more than SQLite takes
    as variables of one statement): still one batch, every notice in it."""
    import sqlite3

    h.store.db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766)  # SQLite's own default
    with h.store.tx():
        h.store.db.executemany(
            "INSERT INTO notices(device, kind, code, key, ts, received_ms, detail)"
            " VALUES(?, 'alert', 'disk_low', ?, ?, ?, '{}')",
            [("krongpa-evil-c09", f"k{n}", T0, T0) for n in range(40_000)])
    assert h.relay.tick(T0 + 61 * S) == 1
    assert h.store.one("SELECT COUNT(*) AS n FROM notices WHERE batch IS NULL")["n"] == 0
    assert len(h.items()) == 40_000


# --- events ------------------------------------------------------------------------------

def test_events_deduplicated_and_gaps_noticed(h):
    for seq in (1, 2, 5, 5, 2):
        h.feed(T0 + seq * S, "event", seq=seq, ts=T0 + seq * S, type="play", played_ms=10)
    assert h.store.one("SELECT COUNT(*) n FROM events")["n"] == 3
    assert h.relay.counters.duplicates == 2 and h.relay.counters.gaps == 1
    gap = dict(h.store.one("SELECT * FROM gaps"))
    assert (gap["first_seq"], gap["last_seq"], gap["filled_ms"]) == (3, 4, None)
    h.feed(T0 + 10 * S, "event", seq=3, ts=T0 + 3 * S, type="play", historical=True)
    assert h.store.one("SELECT filled_ms FROM gaps")["filled_ms"] is None
    h.feed(T0 + 11 * S, "event", seq=4, ts=T0 + 4 * S, type="play", historical=True)
    assert h.store.one("SELECT filled_ms FROM gaps")["filled_ms"] == T0 + 11 * S
    assert h.device()["max_seq"] == 5


@settings(max_examples=300, deadline=None)
@given(leaf=st.sampled_from(["status", "state", "health", "event", "ack", "x"]),
       device=st.sampled_from([DEV, "UPPER", "a/b", "", "ok-dev"]),
       payload=st.one_of(
           st.binary(max_size=200),
           st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(
                            st.sampled_from(["state", "session", "ts", "seq", "type", "code",
                                             "historical", "reason", "key", "detail"]), c,
                            max_size=6), max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_garbage_never_crashes_the_relay(tmp_path_factory, leaf, device, payload):
    store = RelayStore(":memory:")
    relay = Relay(store, RelaySettings(group_wait_s=0, group_interval_s=0, channels=["x"]))
    relay.handle(f"ttcs/dev/{device}/{leaf}", payload, False, T0)
    relay.handle(f"ttcs/dev/{device}/{leaf}", payload, True, T0 + 1)
    relay.tick(T0 + 10**9)
    Dispatcher(store, [], {"attempts": 1, "backoff_s": 0, "backoff_max_s": 0}, {}).run_due(T0)
    store.close()


def test_device_times_out_of_window_are_replaced_and_flagged(h):
    year_33658 = 10**15
    h.feed(T0, "event", seq=1, ts=year_33658, type="alert", state="raised", code="door_open")
    h.feed(T0 + S, "health", ts=-5)
    h.feed(T0 + 2 * S, "event", seq=2, ts=T0 - 300 * 86_400 * S, type="play",
           historical=True)  # 300 days in the outbox: still in the window
    h.feed(T0 + 3 * S, "event", seq=3, ts=T0 + 2 * 3600 * S, type="config")  # 2 h ahead
    rows = {r["seq"]: dict(r) for r in h.store.q("SELECT seq, ts, flags, body FROM events")}
    assert (rows[1]["ts"], rows[1]["flags"]) == (T0, "device_time")
    assert json.loads(rows[1]["body"])["ts"] == year_33658  # the body as received
    assert (rows[2]["ts"], rows[2]["flags"]) == (T0 - 300 * 86_400 * S, None)
    assert (rows[3]["ts"], rows[3]["flags"]) == (T0 + 3 * S, "device_time")
    health = h.store.one("SELECT ts, flags FROM health_latest")
    assert (health["ts"], health["flags"]) == (T0 + S, "device_time")
    assert h.relay.counters.device_time == 3
    h.relay.tick(T0 + 100 * S)
    [item] = [i for i in h.items() if i.get("code")]
    assert item["since"] == T0 and item["device_time_invalid"] is True
    text = render(1, h.batches()[0], "i", "Asia/Ho_Chi_Minh", {}).text
    assert "giờ thiết bị gửi không hợp lệ" in text and "23:00 24/11" in text


def test_an_older_database_gets_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE events (device TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER"
                     " NOT NULL, type TEXT NOT NULL, historical INTEGER NOT NULL, received_ms"
                     " INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (device, seq));"
                     "INSERT INTO events VALUES ('d', 1, 5, 'play', 0, 5, '{}');")
    db.close()
    store = RelayStore(str(path))
    assert dict(store.one("SELECT * FROM events"))["flags"] is None
    store.close()


def test_a_batch_that_cannot_be_rendered_does_not_block_the_queue(h):
    rec = Recorder()
    h.store.x("INSERT INTO batches(created_ms, body) VALUES(?, ?)", T0,
              json.dumps({"items": [{"kind": "offline", "since": "x"}]}))  # no device
    h.store.x("INSERT INTO deliveries(batch, channel, next_ms) VALUES(1, 'test', ?)", T0)
    h.online(T0)
    h.offline(T0 + S)
    assert h.relay.tick(T0 + 100 * S) == 2
    d = Dispatcher(h.store, [rec], RETRY, {})
    assert d.run_due(T0 + 100 * S) == 1
    assert [m.key.split("-")[-1] for m in rec.sent] == ["2"]
    bad = h.store.one("SELECT * FROM deliveries WHERE batch=1")
    assert bad["failed"] == 1 and bad["error"] == "render: KeyError"
    assert d.run_due(T0 + 10**7) == 0


# --- restart and delivery ----------------------------------------------------------------

class Recorder:
    name = "test"

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[Message] = []
        self.fail = fail

    def send(self, m: Message) -> None:
        if self.fail:
            self.fail -= 1
            raise NotifyError("HTTP 503")
        self.sent.append(m)


RETRY = {"attempts": 5, "backoff_s": 10, "backoff_max_s": 60}


def test_restart_does_not_duplicate_notifications(h):
    rec = Recorder()
    h.online(T0)
    h.offline(T0 + S)
    h.relay.tick(T0 + 100 * S)
    Dispatcher(h.store, [rec], RETRY, {}).run_due(T0 + 100 * S)
    assert len(rec.sent) == 1
    # the relay restarts: the broker re-delivers the retained offline status, and the
    # persistent session may re-deliver a QoS 1 alert event it already stored
    h.feed(T0 + 2 * S, "event", seq=1, ts=T0 + 2 * S, type="alert", state="raised",
           code="door_open")
    h.relay.tick(T0 + 200 * S)
    Dispatcher(h.store, [rec], RETRY, {}).run_due(T0 + 200 * S)
    assert len(rec.sent) == 2
    h.reopen()
    h.relay.connected(T0 + 300 * S)
    h.offline(T0 + 300 * S, retained=True)
    h.feed(T0 + 301 * S, "event", seq=1, ts=T0 + 2 * S, type="alert", state="raised",
           code="door_open")
    assert h.relay.tick(T0 + 1000 * S) is None
    Dispatcher(h.store, [rec], RETRY, {}).run_due(T0 + 1000 * S)
    assert len(rec.sent) == 2


def test_unsent_batch_survives_restart_and_retries_with_backoff(h):
    h.online(T0)
    h.offline(T0 + S)
    h.relay.tick(T0 + 100 * S)
    flaky = Recorder(fail=2)
    d = Dispatcher(h.store, [flaky], RETRY, {})
    assert d.run_due(T0 + 100 * S) == 0  # attempt 1 fails: retry in 10 s
    assert d.run_due(T0 + 109 * S) == 0 and flaky.fail == 1  # not due yet: not tried
    h.reopen()  # a restart between attempts
    d = Dispatcher(h.store, [flaky], RETRY, {})
    assert d.run_due(T0 + 110 * S) == 0 and flaky.fail == 0  # attempt 2 fails: retry in 20 s
    assert d.run_due(T0 + 129 * S) == 0
    assert d.run_due(T0 + 130 * S) == 1
    row = h.store.one("SELECT * FROM deliveries")
    assert row["attempts"] == 3 and row["sent_ms"] == T0 + 130 * S
    assert len(flaky.sent) == 1 and "MẤT KẾT NỐI" in flaky.sent[0].text
    assert d.run_due(T0 + 10**7) == 0


def test_gives_up_after_attempts_and_on_permanent_errors(h):
    class Broken:
        name = "test"

        def send(self, m):
            raise NotifyError("HTTP 400", permanent=True)

    h.online(T0)
    h.offline(T0 + S)
    h.relay.tick(T0 + 100 * S)
    Dispatcher(h.store, [Broken()], RETRY, {}).run_due(T0 + 100 * S)
    row = h.store.one("SELECT * FROM deliveries")
    assert row["failed"] == 1 and row["attempts"] == 1 and row["error"] == "HTTP 400"


def test_groups_rule():
    groups = {"krongpa": ["krongpa-*"], "phutuc": ["krongpa-phutuc-*", "other-dev"]}
    assert groups_of(DEV, groups) == ["krongpa", "phutuc"]
    assert groups_of("other-dev", groups) == ["phutuc"]
    assert groups_of("krongpa", groups) == []


# --- as a process ------------------------------------------------------------------------

def test_relay_process_will_restart_and_recovery(broker, keys, tmp_path, agent_factory,
                                                 webhook, relay_proc):
    w = Watcher(broker.port, ["ttcs/#"])
    try:
        agent = agent_factory(agent_config(tmp_path, broker.port, keys))
        wait_online(w, DEV)
        relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url))
        # garbage on device topics does not stop it
        for payload in (b"\xff\xfe", b"[1,2]", b'{"state": 7}', b"{" * 3000):
            for leaf in ("status", "health", "event", "state"):
                w.publish(f"ttcs/dev/{DEV}/{leaf}", payload)
        w.publish("ttcs/dev/evil-dev/event", b'{"seq": "x"}')
        agent.kill()  # SIGKILL: the broker publishes the will
        wait_until(lambda: webhook.items(), 20, what="offline notification")
        [item] = webhook.items()
        assert item["kind"] == "offline" and item["reason"] == "lost"
        assert item["device"] == DEV and item["groups"] == ["krongpa"]
        assert "MẤT KẾT NỐI" in webhook.received[0]["text"]
        assert relay.proc.poll() is None
        # restart the relay: the retained will is delivered again, nothing new is sent
        assert relay.stop() == 0
        relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url))
        time.sleep(4)  # two grouping windows
        assert len(webhook.received) == 1
        # the agent comes back: one recovery
        agent.start()
        wait_until(lambda: len(webhook.received) >= 2, 20, what="recovery notification")
        time.sleep(3)
        assert len(webhook.received) == 2
        assert [i["kind"] for i in webhook.received[1]["items"]] == ["recovered"]
        assert len(set(webhook.keys)) == 2
    finally:
        w.close()


def test_relay_process_missed_heartbeats(broker, keys, tmp_path, agent_factory, webhook,
                                         relay_proc):
    w = Watcher(broker.port, ["ttcs/#"])
    try:
        agent = agent_factory(agent_config(tmp_path, broker.port, keys,
                                           health={"interval_s": 5}))
        wait_online(w, DEV)
        relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url,
                                        heartbeat_default_s=5, missed_beats=2))
        wait_until(lambda: len(w.json(f"dev/{DEV}/health")) >= 2, 30, what="two health samples")
        agent.signal(signal.SIGSTOP)  # frozen: the TCP link stays up, no will for 90 s
        try:
            wait_until(lambda: webhook.items(), 40, what="heartbeat offline notification")
            [item] = webhook.items()
            assert item["kind"] == "offline" and item["reason"] == "heartbeat"
        finally:
            agent.signal(signal.SIGCONT)
        wait_until(lambda: any(i["kind"] == "recovered" for i in webhook.items()), 30,
                   what="recovery after SIGCONT")
        assert relay.proc.poll() is None
    finally:
        w.close()


def test_a_relay_stopped_past_the_heartbeat_limit_does_not_call_live_devices_silent(
        w, broker, tmp_path, webhook, relay_proc):
    """SIGSTOP the relay longer than a device's heartbeat limit while the device goes on
    (the broker holds its samples for the relay's session): at the thaw the relay's first
    tick must not take the samples it has not read yet for silence (found by
    scripts/bench/loadgen.py --pause-s: hundreds of live devices declared offline)."""
    import sqlite3
    import threading

    relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url,
                                    heartbeat_default_s=1, missed_beats=2))
    w.publish(f"ttcs/dev/{DEV}/status", {"v": 1, "state": "online", "ts": int(time.time() * 1000),
                                         "session": 1}, retain=True)
    beating = threading.Event()
    beating.set()

    def beat() -> None:
        while beating.is_set():
            w.publish(f"ttcs/dev/{DEV}/health", {"v": 1, "ts": int(time.time() * 1000)})
            time.sleep(1.0)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    db = tmp_path / "relay.db"

    def transitions() -> list[tuple]:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            return c.execute("SELECT online, reason FROM transitions WHERE device=?"
                             " ORDER BY id", (DEV,)).fetchall()

    def interval() -> int | None:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            row = c.execute("SELECT interval_ms FROM devices WHERE device=?", (DEV,)).fetchone()
        return row[0] if row else None

    try:
        wait_until(lambda: interval() is not None, 20, what="the interval learned")
        relay.proc.send_signal(signal.SIGSTOP)
        time.sleep(8)  # the limit is 2 × ~1 s; the device keeps publishing
        relay.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "stopped or starved" in relay.log(), 10, what="the stall noticed")
        time.sleep(2)
        assert transitions() == [(1, "online")], relay.log()
        beating.clear()  # now silent for real: noticed
        wait_until(lambda: (0, "heartbeat") in transitions(), 20, what="offline when silent")
    finally:
        beating.clear()
        relay.proc.send_signal(signal.SIGCONT)


# --- watch (the live fleet table shares the relay's group rule) ----------------------------

def test_watch_fleet_filters_by_group_and_alert():
    from rich.console import Console

    from ctl.watch import Fleet

    fleet = Fleet({"krongpa": ["krongpa-*"]})
    fleet.update(f"ttcs/dev/{DEV}/status", b'{"state":"online"}', now=100)
    fleet.update("ttcs/dev/other-dev/status", b'{"state":"offline","reason":"lost"}', now=100)
    fleet.update("ttcs/dev/other-dev/event", b'{"type":"alert","state":"raised","code":"door_open"}',
                 now=101)
    fleet.update(f"ttcs/dev/{DEV}/health", b'{"audio":{"volume":70},"version":"0.2.0"}', now=102)
    fleet.update("ttcs/dev/other-dev/state", b'{"version":"[red]0.1.0\\n"}', now=102)
    fleet.update(f"ttcs/dev/{DEV}/state", b"\xff garbage", now=103)
    assert fleet.selected() == [DEV, "other-dev"]
    assert fleet.selected(group="krongpa") == [DEV]
    assert fleet.selected(alert="any") == ["other-dev"]
    assert fleet.selected(alert="door_open", group="krongpa") == []
    console = Console(width=160, record=True)
    console.print(fleet.table(now=110))
    text = console.export_text()
    assert "1/2 online" in text and "OFFLINE lost" in text and "door_open" in text
    assert "krongpa" in text and " 70 " in text
    # the fleet's versions (an update rolling out), device text shown as data
    assert 'versions: 0.2.0 (1), "[red]0.1.0 " (1)' in text and " 0.2.0 " in text


def test_watch_once_with_group_filter(broker, keys, tmp_path, agent_factory):
    w = Watcher(broker.port, ["ttcs/#"])
    try:
        agent_factory(agent_config(tmp_path, broker.port, keys))
        wait_online(w, DEV)
        cfg = relay_config(tmp_path, broker.port, "http://127.0.0.1:9/")
        base = [sys.executable, "-m", "ctl", "--config", str(cfg), "watch", "--once", "1.5"]
        out = subprocess.run([*base, "--group", "krongpa"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and DEV in out.stdout and "online" in out.stdout
        other = subprocess.run([*base, "--group", "elsewhere"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30)
        assert other.returncode == 0 and DEV not in other.stdout and "0/0 online" in other.stdout
    finally:
        w.close()


def test_example_config_is_valid_and_typos_are_named(tmp_path):
    from agent.config import ConfigError
    from ctl import config

    cfg = config.load(str(ROOT / "config" / "ctl.example.yaml"))
    assert groups_of(DEV, cfg["relay"]["groups"]) == ["gialai", "krongpa", "phutuc"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("relay:\n  missed_beat: 3\n  groups: {krongpa: [Bad*]}\n"
                   "alerts:\n  telegram: {chat_id: '1'}\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(bad))
    text = "\n".join(e.value.problems)
    assert "relay.missed_beat: unknown key (did you mean 'missed_beats'?)" in text
    assert "relay.groups.krongpa[0]" in text and "alerts.telegram.bot_token_file: is required" in text


def test_relay_process_group_wait_and_interval(w, broker, keys, tmp_path, agent_factory,
                                               webhook, relay_proc):
    """A new group goes out after group_wait_s; a change to a notified group waits for
    group_interval_s; another device's new trouble is not held back by that."""
    agent = agent_factory(agent_config(tmp_path, broker.port, keys))
    wait_online(w, DEV)
    relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url, group_wait_s=1,
                                    group_interval_s=10))
    assert "a new group waits 1 s, changes to it 10 s" in relay.log()
    killed = time.monotonic()
    agent.kill()
    wait_until(lambda: webhook.items(), 10, what="the offline notice")
    assert webhook.times[0] - killed < 4  # group_wait_s (1 s) and a tick, not 300 s
    agent.start()  # back at once: its recovery waits for the interval
    wait_online(w, DEV, timeout=20, session=2)
    w.publish("ttcs/dev/krongpa-other-c01/status", {"v": 1, "state": "online", "session": 1})
    w.publish("ttcs/dev/krongpa-other-c01/status",
              {"v": 1, "state": "offline", "session": 1, "reason": "lost"})
    down = time.monotonic()
    wait_until(lambda: len(webhook.received) >= 2, 10, what="the other device's notice")
    assert webhook.times[1] - down < 4
    assert [(i["device"], i["kind"]) for i in webhook.received[1]["items"]] == [
        ("krongpa-other-c01", "offline")]
    wait_until(lambda: len(webhook.received) >= 3, 20, what="the recovery")
    assert [(i["device"], i["kind"]) for i in webhook.received[2]["items"]] == [
        (DEV, "recovered")]
    assert 9 <= webhook.times[2] - webhook.times[0] < 13


def test_relay_process_logs_its_stop_on_sigterm_and_closes_cleanly(w, broker, tmp_path, webhook,
                                                                    relay_proc):
    relay = relay_proc(relay_config(tmp_path, broker.port, webhook.url))
    w.publish(f"ttcs/dev/{DEV}/status", {"v": 1, "state": "online", "session": 1})
    w.publish(f"ttcs/dev/{DEV}/health", {"v": 1, "ts": int(time.time() * 1000)})
    wait_until(lambda: Path(tmp_path / "relay.db-wal").exists(), 10, what="a write")
    time.sleep(0.5)
    assert relay.stop(signal.SIGTERM) == 0
    log = relay.log()
    assert "relay: SIGTERM received, stopping" in log
    assert "relay stopped: 2 messages, 0 dropped" in log and "database closed" in log
    wal = tmp_path / "relay.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # everything checkpointed
    store = RelayStore(str(tmp_path / "relay.db"))
    assert store.one("SELECT COUNT(*) AS n FROM health_latest")["n"] == 1
    store.close()
