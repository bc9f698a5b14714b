"""The outbox's ordering and durability rules, against a real SQLite store."""

from __future__ import annotations

import json
import sqlite3

from agent import protocol
from agent.core.clock import FakeClock
from agent.core.outbox import Outbox
from agent.core.store import Store
from tests.conftest import Keys
from tests.fakes import make_core


class Link:
    """Records publishes; PUBACKs are given by the test."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[dict] = []
        self.mid = 0

    def publish(self, topic, payload, qos=1, retain=False):
        self.mid += 1
        self.sent.append(json.loads(payload))
        return self.mid


def make(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    link = Link()
    return store, link, Outbox(store, link, FakeClock())


def test_acks_go_at_once_events_only_after_commit(tmp_path):
    store, link, box = make(tmp_path)
    with store.transaction():
        box.add("t/ack", {"id": "c1", "stage": "started"}, kind="ack")
        assert [m.get("stage") for m in link.sent] == ["started"]  # before the commit
        box.add("t/event", {"type": "play"}, kind="play", event=True)
        assert len(link.sent) == 1  # an event waits: a crash could still undo its seq
    box.pump()  # what the core does after its commit
    assert [m.get("stage") or m["type"] for m in link.sent] == ["started", "play"]
    assert link.sent[1]["seq"] == 1


def test_an_ack_never_overtakes_a_waiting_event(tmp_path):
    store, link, box = make(tmp_path)
    with store.transaction():
        box.add("t/event", {"type": "alert"}, kind="alert", event=True)
        box.add("t/ack", {"id": "c1", "stage": "done"}, kind="ack")
        assert link.sent == []
    box.pump()
    assert [m.get("type") or m["stage"] for m in link.sent] == ["alert", "done"]


def test_an_early_ack_is_sent_once_and_deleted_on_puback(tmp_path):
    store, link, box = make(tmp_path)
    with store.transaction():
        box.add("t/ack", {"id": "c1", "stage": "received"}, kind="ack")
        box.on_published(1)  # the PUBACK can arrive within the same batch
    box.pump()
    assert len(link.sent) == 1 and store.depth() == 0 and store.pending() == []


def test_received_is_published_only_once_the_command_id_is_on_disk(tmp_path):
    keys = Keys()
    core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64})
    core.link.connect()
    core.run_pending()
    db = tmp_path / "state" / "agent.db"
    seen_when_published: dict[str, bool] = {}
    publish = core.link.publish

    def spy(topic, payload, qos=1, retain=False):
        body = json.loads(payload)
        if topic.endswith("/ack") and body.get("stage") == "received":
            other = sqlite3.connect(db)  # another connection sees committed rows only
            row = other.execute("SELECT 1 FROM seen WHERE id=?", (body["id"],)).fetchone()
            other.close()
            seen_when_published[body["id"]] = row is not None
        return publish(topic, payload, qos, retain)

    core.link.publish = spy
    env = keys.command("dev/dev-1", "ping", ts=core.clock.now_ms(), cmd_id="p1")
    core.on_message("ttcs/dev/dev-1/cmd", protocol.canonical(env), False)
    core.run_pending()
    assert seen_when_published == {"p1": True}
    stages = [a["stage"] for a in core.link.json("/ack") if a["id"] == "p1"]
    assert stages == ["received", "done"]
    core.store.close()


def test_pump_sends_a_long_backlog_in_windows(tmp_path):
    store, link, box = make(tmp_path)
    link.connected = False
    for i in range(45):
        box.add("t/event", {"type": "play", "i": i}, kind="play", event=True)
    link.connected = True
    box.on_connected()
    assert len(link.sent) == 20  # the in-flight window
    for mid in range(1, 46):
        box.on_published(mid)
    assert [m["i"] for m in link.sent] == list(range(45)) and store.depth() == 0


def test_health_goes_straight_out_when_connected_and_is_stored_otherwise(tmp_path):
    store, link, box = make(tmp_path)
    box.send_or_store("t/health", {"n": 1}, kind="health")
    assert link.sent == [{"n": 1}] and store.depth() == 0  # no disk write
    link.connected = False
    box.send_or_store("t/health", {"n": 2}, kind="health")
    assert store.depth() == 1  # offline: kept, flagged historical
    link.connected = True
    box.send_or_store("t/health", {"n": 3}, kind="health")
    # an older row waits: this one is stored too and goes after it, in order
    assert store.depth() == 2
    assert [m["n"] for m in link.sent] == [1, 2, 3] and link.sent[1]["historical"] is True
