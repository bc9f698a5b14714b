"""The console's tables and queries on both stores the relay supports: SQLite and a real
PostgreSQL (the same SQL, through ctl/db.py). Users, lock-out, sessions, the audit with
commands and their acks, open alerts with acknowledgements, the fleet snapshot."""

from __future__ import annotations

import json
import time

import pytest

from ctl.console import tables
from ctl.console.audit import Audit
from ctl.console.fleet import FleetWatcher, alerts
from ctl.console.sessions import SessionStore
from ctl.console.users import LoginPolicy, LoginRefused, User, UserStore
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.pg_support import pg_url_fixture, postgres_fixture  # noqa: F401

PW = "một mật khẩu dài"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    target = str(tmp_path / "relay.db") if request.param == "sqlite" else \
        request.getfixturevalue("pg_url")
    s = RelayStore(target)
    tables.ensure(s)
    tables.ensure(s)  # idempotent
    yield s
    s.close()


def test_users_sessions_and_lock_out(store):
    users = UserStore(store, LoginPolicy(lockout_after=2, lockout_s=60, per_minute=100))
    users.add("op", "operator", PW, ["phutuc"], emergency=True)
    with pytest.raises(LoginRefused):
        users.login("op", "sai-sai-sai", "1.2.3.4")
    with pytest.raises(LoginRefused):
        users.login("op", "sai-sai-sai", "1.2.3.4")
    with pytest.raises(LoginRefused) as e:
        users.login("op", PW, "1.2.3.4")
    assert e.value.reason == "locked"
    store.x("UPDATE console_users SET locked_until_ms=1 WHERE name='op'")  # the time passed
    user = users.login("op", PW, "1.2.3.4")
    assert user == User("op", "operator", ("phutuc",), True)
    sessions = SessionStore(store, 3600)
    now = int(time.time() * 1000)
    token, s = sessions.create("op", now)
    assert sessions.get(token, now) == s and sessions.get(token + "x", now) is None
    assert sessions.get(token, now + 3_600_001) is None  # expired
    users.passwd("op", PW + "!")
    assert sessions.get(token, now) is None  # a new password ends the sessions


def test_audit_commands_and_acks(store):
    audit = Audit(store)
    env = {"id": "c-1", "ts": 1, "target": "grp/phutuc", "type": "say", "args": {"text": "x"}}
    audit.command(env, "b-1", "op")
    line = audit.record("op", "bulletin say", "ok", target="grp/phutuc", cmd_id="c-1")
    assert line > 0
    first, final = audit.ack("c-1", "d1", {"stage": "received", "ts": 2}, 3)
    assert final is None
    assert audit.ack("c-1", "d1", {"stage": "done", "ts": 4}, 5) == (first + 1, "done")
    assert audit.ack("c-1", "d2", {"stage": "failed", "reason": "audio_fault"}, 6)[1] == \
        "done 1, failed 1"
    trail = audit.trail()
    assert trail[0]["cmd_id"] == "c-1" and trail[0]["final"] == "done 1, failed 1"
    assert [a["stage"] for a in audit.batch("b-1")[0]["acks"]] == ["received", "done", "failed"]
    assert audit.known_commands(0) == {"c-1"}
    assert audit.trail(user="someone else") == []
    audit.command({**env, "id": "c-2"}, "b-2", "op")
    audit.unsent("c-2", "the console is not connected to the broker")
    assert audit.batch("b-2")[0]["final"].startswith("not sent: the console is not connected")


def test_open_alerts_and_fleet(store):
    relay = Relay(store, RelaySettings(), "ttcs")
    now = int(time.time() * 1000)

    def event(seq: int, state: str, code: str, key: str | None = "k") -> None:
        body = {"v": 1, "seq": seq, "ts": now + seq, "type": "alert", "state": state,
                "code": code}
        if key:
            body["key"] = key
        relay.handle("ttcs/dev/d1/event", json.dumps(body).encode(), False, now)

    event(1, "raised", "door_open")
    event(2, "raised", "disk_low", None)
    event(3, "cleared", "door_open")
    event(4, "raised", "cpu_temp")
    open_ = alerts(store, open_only=True)
    assert sorted(a["code"] for a in open_) == ["cpu_temp", "disk_low"]
    store.x("INSERT INTO console_alert_acks(device, seq, username, note, ts) VALUES(?, ?, ?, ?,"
            " ?)", "d1", 4, "op", "đã xem", now)
    acked = {a["code"]: a for a in alerts(store, "d1", open_only=True)}
    assert acked["cpu_temp"]["ack_note"] == "đã xem" and acked["disk_low"]["ack_user"] is None
    relay.handle("ttcs/dev/d1/state", json.dumps({"v": 1, "ts": now, "volume": 300,
                                                  "playing": {"id": "<b>x</b>"},
                                                  "alerts": "not a list"}).encode(), False, now)
    seen = []
    fleet = FleetWatcher(store, {"relay": {"groups": {"g": ["d*"]}}}, on_change=seen.extend)
    fleet.refresh()
    row = fleet.rows["d1"]
    assert row.volume is None and row.playing == "<b>x</b>" and row.alerts == []  # checked
    assert row.groups == ["g"] and [r.device for r in seen] == ["d1"]
    assert fleet.refresh() == []  # nothing changed: nothing sent
