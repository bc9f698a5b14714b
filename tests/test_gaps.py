"""The relay's gap filling (ctl/gaps.py): its logic with an injected clock, then end to end
with a real agent, a real relay process and mosquitto."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from agent import protocol
from ctl.db import Database, driver_errors
from ctl.gaps import GapFiller, GapSettings, covered_ranges, holes
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.conftest import Broker, Keys, Watcher, agent_config, wait_until
from tests.pg_support import pg_url_fixture, postgres_fixture  # noqa: F401
from tests.relay_support import RelayProcess, relay_config, watcher_fixture  # noqa: F401

T0 = 1_764_000_000_000
S = 1000
DEV = "krongpa-phutuc-c03"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh store's target, on each engine: ``db("name")`` (the same name: the same
    database)."""
    made: dict[str, str] = {}

    def target(name: str = "r") -> str:
        if name not in made:
            made[name] = str(tmp_path / f"{name}.db") if request.param == "sqlite" \
                else request.getfixturevalue("postgres").new_db()
        return made[name]

    return target


class Rig:
    def __init__(self, path, **settings) -> None:
        self.sent: list[dict] = []
        self.keys = Keys()
        self.store = RelayStore(str(path))
        self.gaps = GapFiller(self.store, GapSettings(**settings), "ttcs", publish=self.publish,
                              sign=lambda env: protocol.sign(env, self.keys.private, "k"))
        self.relay = Relay(self.store, RelaySettings(channels=[]), gaps=self.gaps)

    def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append({"topic": topic, **json.loads(payload)})

    def event(self, at: int, seq: int, device: str = DEV, **extra) -> None:
        body = {"v": 1, "type": "play", "ts": at, "seq": seq, **extra}
        self.relay.handle(f"ttcs/dev/{device}/event", json.dumps(body).encode(), False, at)

    def status(self, at: int, state: str, device: str = DEV) -> None:
        body = {"v": 1, "state": state, "ts": at, "session": 1}
        self.relay.handle(f"ttcs/dev/{device}/status", json.dumps(body).encode(), False, at)

    def ack(self, at: int, cmd: dict, missing: list, device: str = DEV) -> None:
        body = {"v": 1, "id": cmd["id"], "stage": "done", "ts": at,
                "detail": {"sent": 0, "missing": missing}}
        self.relay.handle(f"ttcs/dev/{device}/ack", json.dumps(body).encode(), False, at)

    def asks(self) -> list[tuple[int, int]]:
        return [(c["args"]["from_seq"], c["args"]["to_seq"]) for c in self.sent]


def test_ranges():
    assert covered_ranges([1, 2, 3, 7], [(4, 5)]) == [(1, 5), (7, 7)]
    assert holes(0, covered_ranges([1, 2, 3, 7], [(4, 5)])) == [(6, 6)]
    assert holes(0, [(2500, 2500)]) == [(1, 1000), (1001, 2000), (2001, 2499)]


def test_a_gap_is_asked_for_after_the_settle_time_and_filled(db):
    r = Rig(db(), wait_s=10)
    for seq in (1, 2, 3, 6, 7):
        r.event(T0, seq)
    r.gaps.tick(T0 + 5 * S)
    r.event(T0 + 6 * S, 5)  # late, out of order
    r.gaps.tick(T0 + 9 * S)
    assert r.sent == []  # still settling
    r.gaps.tick(T0 + 10 * S)
    assert r.asks() == [(4, 4)]
    cmd = r.sent[0]
    assert cmd["topic"] == f"ttcs/dev/{DEV}/cmd" and cmd["type"] == "resend"
    assert cmd["target"] == f"dev/{DEV}" and cmd["sig"]["kid"] == "k"
    assert protocol.verify(protocol.parse_envelope({k: v for k, v in cmd.items()
                                                    if k != "topic"}, "cmd"),
                           {"k": r.keys.private.public_key()}, True) is None
    r.event(T0 + 11 * S, 4, resent=True)
    r.gaps.tick(T0 + 30 * S)
    assert r.gaps.open_asks() == 0 and r.gaps.counters.filled == 1
    r.gaps.tick(T0 + 300 * S)
    assert r.asks() == [(4, 4)]  # never again


def test_retries_back_off_and_wait_while_the_device_is_offline(db):
    r = Rig(db(), wait_s=1, retry_s=10, retry_max_s=40)
    r.status(T0, "online")
    r.event(T0, 1)
    r.event(T0, 3)
    for t in range(1, 200):
        r.gaps.tick(T0 + t * S)
    # asked at 1 s, then 10, 20, 40, 40 s later
    assert [c["ts"] - T0 for c in r.sent] == [1 * S, 11 * S, 31 * S, 71 * S, 111 * S, 151 * S,
                                              191 * S]
    r.status(T0 + 200 * S, "offline")
    for t in range(200, 600):
        r.gaps.tick(T0 + t * S)
    assert len(r.sent) == 7  # not while it is offline
    r.status(T0 + 600 * S, "online")
    r.gaps.tick(T0 + 601 * S)
    assert len(r.sent) == 8  # at once when it is back


def test_ranges_the_device_no_longer_holds_are_recorded_lost(db):
    r = Rig(db(), wait_s=1)
    r.event(T0, 1)
    r.event(T0, 2500)
    r.gaps.tick(T0 + 2 * S)
    assert r.asks() == [(2, 1001), (1002, 2001), (2002, 2499)]  # at most 1000 seqs each
    r.ack(T0 + 3 * S, r.sent[0], [[2, 1001]])
    r.ack(T0 + 3 * S, r.sent[1], [[1002, 1500]])
    for seq in range(1501, 2500):
        r.event(T0 + 3 * S, seq, resent=True)
    r.gaps.tick(T0 + 5 * S)
    assert r.gaps.open_asks() == 0
    assert r.gaps.counters.lost == 1499 and r.gaps.lost_total() == 1499
    n = r.store.one("SELECT COUNT(*) AS n FROM events")["n"]
    assert n + r.gaps.lost_total() == 2500  # every seq present or recorded lost


def test_after_a_reconnect_every_device_is_asked_past_its_newest_seq(db):
    r = Rig(db(), wait_s=2)
    for seq in (1, 2, 3):
        r.event(T0, seq)
    for seq in range(1, 8):
        r.event(T0, seq, device="krongpa-other-c01")
    r.relay.connected(T0 + 10 * S)  # back after an outage: the tails may be lost
    r.gaps.tick(T0 + 11 * S)
    assert r.sent == []  # the backlog settles first
    r.gaps.tick(T0 + 12 * S)
    assert sorted((c["target"], c["args"]["from_seq"], c["args"]["to_seq"]) for c in r.sent) \
        == [("dev/krongpa-other-c01", 8, 1007), (f"dev/{DEV}", 4, 1003)]
    probe = next(c for c in r.sent if c["target"] == f"dev/{DEV}")
    r.event(T0 + 13 * S, 4, resent=True)
    r.event(T0 + 13 * S, 5, resent=True)
    body = {"v": 1, "id": probe["id"], "stage": "done", "ts": T0,
            "detail": {"sent": 2, "missing": [], "last_seq": 5}}
    r.relay.handle(f"ttcs/dev/{DEV}/ack", json.dumps(body).encode(), False, T0 + 13 * S)
    r.gaps.tick(T0 + 20 * S)
    assert r.gaps.lost_total() == 0 and r.gaps.open_asks() == 0
    assert r.gaps.counters.probes == 2


def test_a_tail_the_device_resent_but_that_was_dropped_again_is_asked_for(db):
    r = Rig(db(), wait_s=2)
    for seq in (1, 2, 3):
        r.event(T0, seq)
    r.relay.connected(T0)
    r.gaps.tick(T0 + 2 * S)
    probe = r.sent[0]
    body = {"v": 1, "id": probe["id"], "stage": "done", "ts": T0,
            "detail": {"sent": 3, "missing": [], "last_seq": 6}}
    r.relay.handle(f"ttcs/dev/{DEV}/ack", json.dumps(body).encode(), False, T0 + 3 * S)
    r.event(T0 + 3 * S, 5, resent=True)  # 4 and 6 were dropped on the way once more
    r.gaps.tick(T0 + 6 * S)
    assert r.asks()[1:] == [(4, 4), (6, 6)]
    r.event(T0 + 7 * S, 4, resent=True)
    r.event(T0 + 7 * S, 6, resent=True)
    r.gaps.tick(T0 + 10 * S)
    assert r.gaps.open_asks() == 0


def test_seqs_below_the_first_stored_are_asked_for_from_seq_1_unless_limited(db):
    r = Rig(db(), wait_s=1)
    r.event(T0, 5)
    r.event(T0, 6)
    r.gaps.tick(T0 + 2 * S)
    assert r.asks() == [(1, 4)]  # the device's first events were lost
    limited = Rig(db("l"), wait_s=1, backfill=0)
    limited.event(T0, 5)
    limited.event(T0, 7)
    limited.gaps.tick(T0 + 2 * S)
    assert limited.asks() == [(6, 6)]


def test_duplicates_are_dropped_by_device_and_seq(db):
    r = Rig(db(), wait_s=1)
    r.event(T0, 1)
    r.event(T0, 1, resent=True)
    assert r.relay.counters.duplicates == 1
    assert r.store.one("SELECT COUNT(*) AS n FROM events")["n"] == 1


def test_open_asks_survive_a_restart_and_another_process_sees_the_fill(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=1, retry_s=5)
    r.event(T0, 1)
    r.event(T0, 4)
    r.gaps.tick(T0 + 2 * S)
    assert r.asks() == [(2, 3)]
    r.store.close()
    r2 = Rig(tmp_path / "r.db", wait_s=1, retry_s=5)
    r2.gaps.tick(T0 + 3 * S)
    assert r2.sent == []  # the ask made before the restart is not due yet
    other = sqlite3.connect(tmp_path / "r.db")  # another relay process stores the fill
    other.execute("INSERT INTO events(device, seq, ts, type, historical, received_ms, body)"
                  " VALUES(?, 2, 0, 'play', 0, 0, '{}'), (?, 3, 0, 'play', 0, 0, '{}')",
                  (DEV, DEV))
    other.commit()
    other.close()
    r2.gaps.tick(T0 + 10 * S)
    assert r2.sent == [] and r2.gaps.open_asks() == 0


def test_an_ack_that_is_not_ours_is_not_counted_as_dropped(tmp_path):
    r = Rig(tmp_path / "r.db")
    r.relay.handle(f"ttcs/dev/{DEV}/ack", b'{"v":1,"id":"c-1","stage":"done","ts":1}', False,
                   T0)
    assert r.relay.counters.dropped == 0
    time.sleep(0)


# --- end to end: a real agent, mosquitto, relay processes ----------------------------------

def _signed_relay_config(tmp_path, port: int, keys: Keys, name: str = "relay",
                         **relay) -> object:
    key_file = tmp_path / f"{name}.key"
    key_file.write_bytes(keys.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(key_file, 0o600)
    path = relay_config(tmp_path, port, None, **{"gap_wait_s": 1, "gap_retry_s": 2,
                                                 "gap_retry_max_s": 4, **relay})
    cfg = yaml.safe_load(path.read_text())
    cfg["signing"] = {"kid": keys.kid, "key_file": str(key_file)}
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _seqs(target, device: str) -> list[int]:
    """The seqs stored for ``device`` in the store at ``target`` (a SQLite path or a
    PostgreSQL URL)."""
    return [r["seq"] for r in _read(target, "SELECT seq FROM events WHERE device=? ORDER BY seq",
                                    device)]


def _lost(target, device: str) -> list[tuple[int, int]]:
    return [(r["lo"], r["hi"]) for r in _read(
        target, "SELECT lo, hi FROM seq_lost WHERE device=? ORDER BY lo", device)]


def _read(target, sql: str, *args) -> list:
    try:
        db = Database(str(target), read_only=True)
    except (OSError, *driver_errors()):
        return []
    try:
        return db.q(sql, *args)
    except db.errors:
        return []
    finally:
        db.conn.close()


def _events(agent, n: int) -> None:
    """``n`` events from the agent: each SIGHUP records a ``config`` event."""
    for _ in range(n):
        agent.signal(signal.SIGHUP)
        time.sleep(0.08)


@pytest.fixture
def small_queue_broker(tmp_path):
    """A broker that queues at most 3 messages for an absent session: the rest are dropped,
    as a full max_queued_messages drops them in the field."""
    b = Broker(tmp_path / "broker", extra="max_queued_messages 3").start()
    yield b
    b.stop()


def _rig(tmp_path, broker, agent_factory, keys, **agent):
    cfg = agent_config(tmp_path, broker.port, keys, **agent)
    a = agent_factory(cfg)
    wait_until(lambda: "mqtt: connected" in a.log(), 15, what="agent connected")
    relay_cfg = _signed_relay_config(tmp_path, broker.port, keys)
    r = RelayProcess(relay_cfg, tmp_path / "relay.log").start().wait_connected()
    return a, r, yaml.safe_load(relay_cfg.read_text())["relay"]["db_path"]


def test_events_dropped_by_the_broker_are_asked_for_and_every_seq_arrives(
        tmp_path, small_queue_broker, agent_factory):
    keys = Keys()
    dev = "krongpa-phutuc-c03"
    agent, relay, db = _rig(tmp_path, small_queue_broker, agent_factory, keys)
    try:
        _events(agent, 2)
        wait_until(lambda: _seqs(db, dev) == [1, 2], 10, what="events 1, 2")
        relay.stop()
        _events(agent, 15)  # the broker keeps 3 for the absent relay and drops the rest
        wait_until(lambda: "dropped" in small_queue_broker.log(), 5, what="broker drops")
        relay.start().wait_connected(2)
        _events(agent, 1)  # the next event shows the gap
        wait_until(lambda: _seqs(db, dev) == list(range(1, 19)), 30,
                   what=f"every seq (have {_seqs(db, dev)})")
    finally:
        relay.stop()
    log = relay.log()
    assert "resend" in log and "asked" in log
    assert _lost(db, dev) == []
    rdb = sqlite3.connect(db)
    resent = [json.loads(b)["seq"] for (b,) in rdb.execute(
        "SELECT body FROM events WHERE device=? AND body LIKE '%\"resent\":true%'", (dev,))]
    rdb.close()
    assert len(resent) >= 10  # most of 3..17 came back through resend
    assert "relay seq gaps:" in log and ", 0 lost" in log


def test_events_lost_at_the_tail_are_found_when_the_relay_reconnects(
        tmp_path, small_queue_broker, agent_factory):
    """The last events before the relay came back were dropped and nothing came after them:
    no gap shows, but the relay asks each device past its newest seq when it connects."""
    keys = Keys()
    dev = "krongpa-phutuc-c03"
    agent, relay, db = _rig(tmp_path, small_queue_broker, agent_factory, keys)
    try:
        _events(agent, 2)
        wait_until(lambda: _seqs(db, dev) == [1, 2], 10, what="events 1, 2")
        relay.stop()
        _events(agent, 12)  # 3..5 queued for the relay, 6..14 dropped
        wait_until(lambda: "dropped" in small_queue_broker.log(), 5, what="broker drops")
        relay.start().wait_connected(2)
        wait_until(lambda: _seqs(db, dev) == list(range(1, 15)), 30,
                   what=f"every seq (have {_seqs(db, dev)})")
    finally:
        relay.stop()
    assert "1 tail probe(s)" in relay.log()


def test_seqs_past_the_keep_window_are_reported_missing_and_recorded_lost(
        tmp_path, small_queue_broker, agent_factory):
    keys = Keys()
    dev = "krongpa-phutuc-c03"
    # kept for under a second: by the time the relay asks, the outage's events are gone
    agent, relay, db = _rig(tmp_path, small_queue_broker, agent_factory, keys,
                            outbox={"keep_days": 0.00001})
    try:
        _events(agent, 2)
        wait_until(lambda: _seqs(db, dev) == [1, 2], 10, what="events 1, 2")
        relay.stop()
        _events(agent, 10)
        time.sleep(1.5)
        relay.start().wait_connected(2)
        _events(agent, 1)
        def settled():
            seqs, lost = _seqs(db, dev), _lost(db, dev)
            covered = set(seqs) | {s for lo, hi in lost for s in range(lo, hi + 1)}
            return lost and covered == set(range(1, 14))
        wait_until(settled, 30, what=f"seqs {_seqs(db, dev)} lost {_lost(db, dev)}")
    finally:
        relay.stop()
    lost = _lost(db, dev)
    assert sum(hi - lo + 1 for lo, hi in lost) >= 5
    log = relay.log()
    assert "are lost (the device no longer holds them)" in log
    n = sum(hi - lo + 1 for lo, hi in lost)
    assert f", {n} lost" in log  # the counters at the stop


def _devices(db_path) -> dict[str, int | None]:
    db = sqlite3.connect(db_path)
    try:
        return dict(db.execute("SELECT device, online FROM devices"))
    except sqlite3.Error:
        return {}
    finally:
        db.close()


@pytest.mark.parametrize("reread_s", [1, 0])
def test_statuses_dropped_in_a_burst_are_read_again(tmp_path, small_queue_broker, reread_s):
    """40 births while the relay cannot read (stopped: 20 in flight, 3 queued, the rest
    dropped by the broker). With the re-read every device ends online; without it (0) the
    devices whose birth was dropped stay unknown (online NULL) although they send health."""
    keys = Keys()
    cfg = _signed_relay_config(tmp_path, small_queue_broker.port, keys, status_reread_s=reread_s)
    relay = RelayProcess(cfg, tmp_path / "relay.log").start().wait_connected()
    db = yaml.safe_load(cfg.read_text())["relay"]["db_path"]
    devices = [f"krongpa-burst-{i:02d}" for i in range(40)]
    w = Watcher(small_queue_broker.port, ["nothing/#"])
    try:
        relay.proc.send_signal(signal.SIGSTOP)
        now = int(time.time() * 1000)
        for d in devices:
            w.publish(f"ttcs/dev/{d}/status", {"v": 1, "state": "online", "ts": now,
                                               "session": 1}, retain=True)
        wait_until(lambda: "dropped" in small_queue_broker.log(), 5, what="broker drops")
        relay.proc.send_signal(signal.SIGCONT)
        time.sleep(1)
        for d in devices:
            w.publish(f"ttcs/dev/{d}/health", {"v": 1, "ts": int(time.time() * 1000)})
            time.sleep(0.01)
        # (this broker's tiny queue may drop a health sample too, under the re-read)
        wait_until(lambda: len(_devices(db)) >= 35, 10, what="the devices known")
        if reread_s:
            wait_until(lambda: set(_devices(db).values()) == {1}, 15,
                       what=f"every device online ({_devices(db)})")
            assert "re-reading the retained status" in relay.log()
        else:
            time.sleep(3)
            assert None in _devices(db).values()  # what the re-read is for
    finally:
        w.close()
        relay.stop()


def test_two_relay_processes_share_the_load_and_together_store_everything(
        tmp_path, broker, w):
    keys = Keys()
    dev = "krongpa-share-c01"
    procs = []
    for name in ("ra", "rb"):
        cfg = _signed_relay_config(tmp_path, broker.port, keys, name=name,
                                   shared_group="relays", client_id=f"ttcs-relay-{name}")
        procs.append(RelayProcess(cfg, tmp_path / f"{name}.log").start().wait_connected())
    db = yaml.safe_load(cfg.read_text())["relay"]["db_path"]
    try:
        w.publish(f"ttcs/dev/{dev}/status", {"v": 1, "state": "online",
                                             "ts": int(time.time() * 1000), "session": 1},
                  retain=True)
        for seq in range(1, 201):
            w.publish(f"ttcs/dev/{dev}/event", {"v": 1, "type": "play", "seq": seq,
                                                "ts": int(time.time() * 1000)})
        wait_until(lambda: _seqs(db, dev) == list(range(1, 201)), 20, what="all 200 events")
        time.sleep(3)  # past gap_wait_s: nothing is missing, nothing is asked
    finally:
        for p in procs:
            p.stop()
    counts = []
    for p in procs:
        log = p.log()
        assert "resend" not in log.replace("0 resend(s)", "")
        counts.append(int(log.split("relay stopped: ")[1].split(" messages")[0]))
    probes = [int(p.log().split(" tail probe")[0].rsplit(" ", 1)[-1]) for p in procs]
    assert sum(probes) <= 1, probes  # a device is probed by one of them (claimed)
    # each got a share of the 200 events; both got the retained status (not shared)
    assert all(c >= 20 for c in counts), counts
    assert sum(counts) == 200 + 2, counts
    assert _devices(db) == {dev: 1}


def test_gap_recovery_on_postgresql_with_two_relays_sharing_the_load(
        tmp_path, small_queue_broker, agent_factory, pg_url):
    """Two relay processes on one PostgreSQL, sharing the subscriptions; both away while the
    broker drops most of a device's events (it queues 3 for the absent session): back, they
    ask for what is missing and every seq arrives, with nothing recorded lost."""
    keys = Keys()
    dev = "krongpa-phutuc-c03"
    a = agent_factory(agent_config(tmp_path, small_queue_broker.port, keys))
    wait_until(lambda: "mqtt: connected" in a.log(), 15, what="agent connected")
    relays = [RelayProcess(_signed_relay_config(tmp_path, small_queue_broker.port, keys,
                                                name=n, db_url=pg_url, shared_group="relays",
                                                client_id=f"ttcs-relay-{n}"),
                           tmp_path / f"{n}.log").start().wait_connected() for n in ("ra", "rb")]
    try:
        _events(a, 2)
        wait_until(lambda: _seqs(pg_url, dev) == [1, 2], 10, what="events 1, 2")
        for r in relays:
            r.stop()
        _events(a, 15)
        wait_until(lambda: "dropped" in small_queue_broker.log(), 5, what="broker drops")
        for r in relays:
            r.start().wait_connected(2)
        _events(a, 1)  # the next event shows the gap
        wait_until(lambda: _seqs(pg_url, dev) == list(range(1, 19)), 30,
                   what=f"every seq (have {_seqs(pg_url, dev)})")
    finally:
        for r in relays:
            r.stop()
    logs = [r.log() for r in relays]
    assert "PostgreSQL" not in "".join(logs)  # no "not available" warning any more
    asked = [line for log in logs for line in log.splitlines() if "resend" in line and
             " asked" in line]
    assert asked, logs
    assert _lost(pg_url, dev) == []
    resent = _read(pg_url, "SELECT COUNT(*) AS n FROM events WHERE device=? AND"
                   " body LIKE '%\"resent\":true%'", dev)[0]["n"]
    assert resent >= 15 - 2 * 3  # each relay session queued at most 3 of 3..17: resent
