"""The relay's store on real SQLite and real PostgreSQL: the same report from both (and the
same as a plain Python reference over the stored bodies), the migration of a version-1 file,
heartbeat checks by due time, the batching writer, two writers on one PostgreSQL, gap
tracking."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ctl import report, store
from ctl.config import groups_of
from ctl.ingest import Writer
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.conftest import wait_until
from tests.pg_support import pg_url_fixture, postgres_fixture  # noqa: F401

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
MIN = 60_000
GROUPS = {"krongpa": ["krongpa-*"], "phutuc": ["krongpa-phutuc-*", "chuse-a-c01"],
          "chuse": ["chuse-*"], "none": ["nobody"]}
DEVICES = [f"{p}-c{i:02d}" for p in ("krongpa-phutuc", "krongpa-iayu", "chuse-a", "chuse-b")
           for i in range(1, 9)]


def local(*args: int) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def topic(device: str, leaf: str) -> str:
    return f"ttcs/dev/{device}/{leaf}"


def fleet_messages(seed: int = 19, records: int = 3000) -> list[tuple[str, bytes, bool, int]]:
    """A year of play records (some crossing month boundaries, segmented, overlapping,
    emergencies, unknown lengths, duplicates) and online/offline changes, over 32 devices
    in overlapping groups, in arrival order."""
    rnd = random.Random(seed)
    y0, y1 = local(2025, 1, 1) - 3 * 86_400_000, local(2026, 1, 1) + 3 * 86_400_000
    out: list[tuple[int, str, dict]] = []
    seq = dict.fromkeys(DEVICES, 0)
    for _ in range(records):
        d = rnd.choice(DEVICES)
        seq[d] += 1
        if rnd.random() < 0.03:  # near a month boundary
            m = rnd.randrange(1, 13)
            started = local(2025, m, 1) - rnd.randrange(1, 30) * MIN
        else:
            started = rnd.randrange(y0, y1)
        span = rnd.randrange(0, 90) * MIN + rnd.randrange(0, 60_000)
        played = min(span, rnd.randrange(0, span + 2)) if rnd.random() > 0.02 else span * 3
        body = {"v": 1, "seq": seq[d], "type": "play", "ts": started + span,
                "started": started, "ended": started + span, "played_ms": played,
                "segment": rnd.choice((0, 0, 0, 1)), "repeat": 1,
                "priority": rnd.choice(("normal", "normal", "high", "emergency")),
                "requested_ms": rnd.choice((None, span, span + 5 * MIN))}
        if rnd.random() < 0.05:
            half = span // 2
            body["segments"] = [
                {"started": started, "ended": started + half, "played_ms": half},
                {"started": started + half, "ended": started + span, "played_ms": span - half}]
        out.append((started + span, d, body))
        if rnd.random() < 0.02:  # a QoS 1 duplicate
            out.append((started + span + 1, d, body))
    msgs = [(topic(d, "event"), json.dumps(b).encode(), False, at) for at, d, b in out]
    for d in DEVICES:
        at = y0 + rnd.randrange(0, 60) * 86_400_000
        for i in range(rnd.randrange(1, 12)):
            state = "online" if i % 2 == 0 else "offline"
            body = {"v": 1, "state": state, "ts": at, "session": i // 2 + 1, "reason": "lost"}
            msgs.append((topic(d, "status"), json.dumps(body).encode(), False, at))
            at += rnd.randrange(1, 40) * 86_400_000
    return msgs


def feed(store: RelayStore, msgs, chunk: int = 500) -> Relay:
    relay = Relay(store, RelaySettings(heartbeat_default_s=10**6))
    for i in range(0, len(msgs), chunk):
        relay.handle_batch(msgs[i:i + chunk])
    return relay


def reference(store: RelayStore, period: report.Period, now_ms: int) -> str:
    """The report as it was computed before it moved into SQL: every stored body loaded and
    summed in Python (docs/CTL.md's rules), for comparison."""
    rows: dict[str, report.Stats] = {}
    spans: dict[str, list] = {}
    for r in store.q("SELECT device FROM devices"):
        rows[r["device"]], spans[r["device"]] = report.Stats("device", r["device"]), []
    for r in store.q("SELECT device, body FROM events WHERE type='play'"):
        rec = json.loads(r["body"])
        if not report._valid_play(rec) or rec["ended"] < period.start_ms \
                or rec["started"] >= period.end_ms:
            continue
        st, started, played = rows[r["device"]], rec["started"], rec["played_ms"]
        aired = report._aired(rec, period)
        st.aired_ms += aired
        known = isinstance(rec.get("requested_ms"), int) and rec["requested_ms"] > 0
        st.played_ms += aired if known else 0
        if rec.get("segment", 0) == 0 and played > 0 and \
                period.start_ms <= started < period.end_ms:
            st.bulletins += 1
            st.emergencies += rec.get("priority") == "emergency"
            st.requested_ms += rec["requested_ms"] if known else 0
        a, b = max(started, period.start_ms), min(rec["ended"], period.end_ms)
        if b > a:
            spans[r["device"]].append((a, b))
    end = min(period.end_ms, now_ms)
    for d, st in rows.items():
        total, last = 0, None
        for a, b in sorted(spans[d]):
            total += b - a if last is None or a > last else max(0, b - last)
            last = b if last is None else max(last, b)
        st.aired_ms = min(st.aired_ms, total)
        st.played_ms = min(st.played_ms, st.aired_ms)
        ts = store.q("SELECT ts, online FROM transitions WHERE device=? ORDER BY ts, rowid", d)
        for i, t in enumerate(ts):
            nxt = ts[i + 1]["ts"] if i + 1 < len(ts) else end
            lo, hi = max(t["ts"], period.start_ms), min(nxt, end)
            if hi > lo:
                st.observed_ms += hi - lo
                st.online_ms += (hi - lo) if t["online"] else 0
    out = [rows[d] for d in sorted(rows)]
    for g in sorted(GROUPS):
        gs = report.Stats("group", g)
        for d in sorted(rows):
            if g in groups_of(d, GROUPS):
                gs.add(rows[d])
        out.append(gs)
    total_row = report.Stats("group", "all")
    for d in sorted(rows):
        total_row.add(rows[d])
    return report.to_csv([*out, total_row])


NOW = local(2026, 2, 1)


def test_same_csv_from_sqlite_and_postgresql_and_the_reference(tmp_path, pg_url):
    msgs = fleet_messages()
    lite, pg = RelayStore(str(tmp_path / "relay.db")), RelayStore(pg_url)
    try:
        feed(lite, msgs)
        feed(pg, msgs)
        n = lite.one("SELECT COUNT(*) AS n FROM plays")["n"]
        assert n == pg.one("SELECT COUNT(*) AS n FROM plays")["n"] and n > 2900
        for month, year in ((None, "2025"), ("2025-03", None), ("2025-12", None)):
            period = report.parse_period(month, year, "Asia/Ho_Chi_Minh")
            a = report.to_csv(report.compute(lite, period, GROUPS, NOW))
            b = report.to_csv(report.compute(pg, period, GROUPS, NOW))
            assert a == b
            assert a == reference(lite, period, NOW)
            assert len(a.splitlines()) == 1 + len(DEVICES) + len(GROUPS) + 1
    finally:
        lite.close()
        pg.close()


def test_two_relays_on_one_postgresql(pg_url):
    """Shared subscriptions may hand the same QoS 1 message to two relays, and a device's
    messages to either: events are kept once, health aggregates add up, the latest health
    sample is the newest."""
    a, b = RelayStore(pg_url), RelayStore(pg_url)
    try:
        ra, rb = feed(a, []), feed(b, [])
        t0 = local(2025, 11, 1, 8)
        ev = [(topic("d1", "event"), json.dumps({"v": 1, "seq": s, "type": "play", "ts": t0,
                                                 "started": t0 - MIN, "ended": t0,
                                                 "played_ms": MIN}).encode(), False, t0)
              for s in range(1, 51)]
        ra.handle_batch(ev)
        rb.handle_batch(ev)
        hs = [(topic("d1", "health"), json.dumps({"v": 1, "ts": t0 + i * 60_000,
                                                  "system": {"cpu_temp_c": 40 + i}}).encode(),
               False, t0 + i * 60_000) for i in range(5)]
        ra.handle_batch(hs[::2])
        rb.handle_batch(hs[1::2])
        assert a.one("SELECT COUNT(*) AS n FROM events")["n"] == 50
        assert a.one("SELECT COUNT(*) AS n FROM plays")["n"] == 50
        assert ra.counters.duplicates + rb.counters.duplicates == 50
        row = a.one("SELECT SUM(n) AS n, MAX(cpu_temp_max) AS hot FROM health_5m")
        assert (int(row["n"]), row["hot"]) == (5, 44.0)
        assert json.loads(a.one("SELECT body FROM health_latest")["body"])["system"] == \
            {"cpu_temp_c": 44}
        assert a.leader() and not b.leader()  # one of them ticks and notifies
    finally:
        a.close()
        b.close()


def test_health_is_the_latest_sample_and_five_minute_aggregates(tmp_path):
    s = RelayStore(str(tmp_path / "r.db"))
    t0 = local(2025, 11, 1, 8)
    msgs = [(topic("d1", "health"), json.dumps({
        "v": 1, "ts": t0 + i * 60_000, "system": {"cpu_temp_c": 40 + i, "load": [0.5 * i, 0, 0],
                                                   "mem_available_mb": 300 - i},
        "disk_free_mb": {"state": 900, "cache": None}, "modem": {"signal_dbm": -70 - i},
        "mqtt": {"outbox": i}, "cabinet": {"door_open": i == 3, "mains_present": True}}).encode(),
        False, t0 + i * 60_000) for i in range(7)]
    feed(s, msgs)
    assert s.one("SELECT COUNT(*) AS n FROM health_latest")["n"] == 1
    rows = [dict(r) for r in s.q("SELECT * FROM health_5m ORDER BY bucket_ms")]
    assert [r["n"] for r in rows] == [5, 2]  # 08:00-08:05 and 08:05-08:10
    first = rows[0]
    assert first["cpu_temp_sum"] / first["cpu_temp_n"] == 42 and first["cpu_temp_max"] == 44
    assert (first["mem_avail_min"], first["disk_state_min"], first["disk_cache_min"]) == \
        (296, 900, None)
    assert (first["signal_min"], first["outbox_max"], first["door_open_n"],
            first["mains_off_n"], first["load1_max"]) == (-74, 4, 1, 0, 2.0)
    s.close()


def test_a_version_1_database_is_migrated_when_opened(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript("""
CREATE TABLE devices (device TEXT PRIMARY KEY, online INTEGER, since_ms INTEGER, reason TEXT,
    session INTEGER, last_seen_ms INTEGER, health_ts INTEGER, interval_ms INTEGER,
    max_seq INTEGER, state TEXT, first_seen_ms INTEGER NOT NULL);
CREATE TABLE events (device TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
    type TEXT NOT NULL, historical INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    body TEXT NOT NULL, flags TEXT, PRIMARY KEY (device, seq));
CREATE TABLE gaps (device TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    noticed_ms INTEGER NOT NULL, filled_ms INTEGER, PRIMARY KEY (device, first_seq));
CREATE TABLE health (device TEXT NOT NULL, ts INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    body TEXT NOT NULL, flags TEXT);
CREATE TABLE transitions (device TEXT NOT NULL, ts INTEGER NOT NULL, online INTEGER NOT NULL,
    reason TEXT);
""")
    t0 = local(2025, 11, 3, 5)
    db.execute("INSERT INTO devices(device, online, last_seen_ms, max_seq, first_seen_ms)"
               " VALUES('d1', 1, ?, 3, ?)", (t0, t0))
    bodies = [{"type": "play", "started": t0, "ended": t0 + 10 * MIN, "played_ms": 10 * MIN,
               "segment": 0, "requested_ms": 10 * MIN, "priority": "emergency"},
              {"type": "alert", "state": "raised", "code": "door_open", "key": None},
              {"type": "play", "started": "bad", "ended": t0, "played_ms": 1}]
    for seq, b in enumerate(bodies, 1):
        db.execute("INSERT INTO events VALUES('d1', ?, ?, ?, 0, ?, ?, NULL)",
                   (seq, t0, b["type"], t0, json.dumps(b)))
    for i in range(3):
        db.execute("INSERT INTO health VALUES('d1', ?, ?, ?, NULL)",
                   (t0 + i * MIN, t0 + i * MIN,
                    json.dumps({"v": 1, "ts": t0 + i * MIN, "system": {"cpu_temp_c": 50 + i}})))
    db.execute("INSERT INTO transitions VALUES('d1', ?, 1, 'online')", (t0 - 86_400_000,))
    db.commit()
    db.close()
    s = RelayStore(str(path))
    try:
        assert "health" not in s.tables()
        play = dict(s.one("SELECT * FROM plays"))
        assert (play["seq"], play["played_ms"], play["emergency"], play["requested_ms"]) == \
            (1, 10 * MIN, 1, 10 * MIN)
        assert dict(s.one("SELECT code, state FROM alerts")) == {"code": "door_open",
                                                                 "state": "raised"}
        assert s.one("SELECT ts FROM health_latest")["ts"] == t0 + 2 * MIN
        assert s.one("SELECT n, cpu_temp_max FROM health_5m")["n"] == 3
        assert s.one("SELECT next_check_ms FROM devices")["next_check_ms"] == 0
        assert s.one("SELECT value FROM meta WHERE key='schema'")["value"] == "2"
        period = report.parse_period("2025-11", None, "Asia/Ho_Chi_Minh")
        [d1, *_] = report.compute(s, period, {}, local(2025, 12, 1))
        assert (d1.bulletins, d1.emergencies, round(d1.aired_ms / MIN)) == (1, 1, 10)
    finally:
        s.close()
    RelayStore(str(path)).close()  # opening it again changes nothing


def test_heartbeat_checks_read_only_the_devices_due(tmp_path):
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings(heartbeat_default_s=60, missed_beats=3))
    t0 = local(2025, 11, 1, 8)
    msgs = []
    for i in range(200):
        d = f"dev-{i:03d}"
        msgs.append((topic(d, "status"), json.dumps({"v": 1, "state": "online", "ts": t0,
                                                     "session": 1}).encode(), False, t0))
        # dev-000 is last heard at t0, the others 10 minutes later
        if i:
            msgs.append((topic(d, "health"), json.dumps({"v": 1, "ts": t0 + 600_000}).encode(),
                         False, t0 + 600_000))
    relay.handle_batch(msgs)
    due = s.one("SELECT COUNT(*) AS n FROM devices WHERE next_check_ms < ?", t0 + 181_000)
    assert due["n"] == 1
    plan = " ".join(str(tuple(r)) for r in s.q(
        "EXPLAIN QUERY PLAN SELECT * FROM devices WHERE next_check_ms < ?"
        " ORDER BY next_check_ms LIMIT 5000", t0))
    assert "devices_due" in plan
    relay.tick(t0 + 181_000)
    offline = [r["device"] for r in s.q("SELECT device FROM devices WHERE online=0")]
    assert offline == ["dev-000"]
    assert s.one("SELECT next_check_ms FROM devices WHERE device='dev-000'")["next_check_ms"] \
        is None
    assert s.one("SELECT next_check_ms FROM devices WHERE device='dev-001'")["next_check_ms"] \
        == t0 + 600_000 + 180_000
    relay.connected(t0 + 700_000)  # the relay was away: checks are pushed back, not failed
    relay.tick(t0 + 781_000)
    assert s.one("SELECT COUNT(*) AS n FROM devices WHERE online=0")["n"] == 1
    assert s.one("SELECT MIN(next_check_ms) AS m FROM devices")["m"] == t0 + 700_000 + 180_000
    relay.tick(t0 + 881_000)
    assert s.one("SELECT COUNT(*) AS n FROM devices WHERE online=0")["n"] == 200
    s.close()


def test_the_writer_stores_in_batches_and_flushes_on_stop(tmp_path):
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings())
    writer = Writer(relay, max_batch=500)
    t0 = local(2025, 11, 1, 8)
    for seq in range(1, 5001):
        body = {"v": 1, "seq": seq, "type": "config", "ts": t0, "result": "applied"}
        writer.put(topic(f"d{seq % 7}", "event"), json.dumps(body).encode(), False, t0)
    writer.put(topic("d1", "event"), b"not json", False, t0)
    writer.stop()  # returns when everything queued is stored
    assert s.one("SELECT COUNT(*) AS n FROM events")["n"] == 5000
    assert relay.counters.messages == 5001 and relay.counters.dropped == 1
    assert 10 <= writer.batches < 5001
    writer.stop()  # idempotent
    s.close()


def test_missing_seqs_one_definition(tmp_path):
    """Missing = neither stored nor recorded lost (ctl/seqs.py), up to the newest covered seq
    or the device's own newest; recording a range lost closes the noticed gap."""
    s = RelayStore(str(tmp_path / "r.db"))
    t0 = local(2025, 11, 1, 8)
    feed(s, [(topic("d1", "event"), json.dumps({"v": 1, "seq": q, "type": "config",
                                                "ts": t0}).encode(), False, t0)
             for q in (1, 2, 5, 6, 9)])
    assert s.missing_seqs("d1") == ([(3, 4), (7, 8)], 9)
    assert s.missing_seqs("d1", 4) == ([(7, 8)], 9)
    assert s.missing_seqs("d1", 0, top=12) == ([(3, 4), (7, 8), (10, 12)], 9)
    with s.tx():
        assert s.record_lost("d1", 2, 4, t0) == [(3, 4)]  # 2 is stored: not lost
        assert s.record_lost("d1", 3, 4, t0) == []  # already recorded
    assert s.missing_seqs("d1") == ([(7, 8)], 9)
    gaps = {r["first_seq"]: r["lost_ms"] for r in s.q("SELECT * FROM gaps")}
    assert gaps == {3: t0, 7: None}
    assert s.missing_seqs("nobody") == ([], None)
    s.close()


@pytest.mark.parametrize("n_devices", [10, 200])
def test_the_chart_stays_readable_at_any_fleet_size(tmp_path, n_devices):
    stats = [report.Stats("device", f"d{i:03d}", aired_ms=i * MIN, online_ms=i,
                          observed_ms=1000) for i in range(n_devices)]
    groups = [report.Stats("group", f"g{i}", devices=["x"] * i) for i in range(60)]
    rows, names = report.chart_rows([*stats, *groups, report.Stats("group", "all")])
    assert len(rows) == len(names)
    if n_devices <= report.CHART_ALL_DEVICES:
        assert len(rows) == n_devices + report.CHART_GROUPS + 1
    else:
        assert len(rows) == report.CHART_GROUPS + 1 + 2 * report.CHART_WORST
        assert names[-1] == "d009 (hoạt động kém)"
    period = report.parse_period("2025-11", None, "Asia/Ho_Chi_Minh")
    report.chart([*stats, *groups], period, str(tmp_path / "c.png"))


def test_heartbeats_and_notices_on_postgresql(pg_url):
    """The relay's logic on PostgreSQL: a missed heartbeat, a will, a batch with its
    delivery row, the hourly prune."""
    s = RelayStore(pg_url)
    try:
        relay = Relay(s, RelaySettings(heartbeat_default_s=60, missed_beats=3, group_wait_s=0,
                                       group_interval_s=0, channels=["webhook"]))
        t0 = local(2025, 11, 1, 8)
        relay.handle_batch([
            (topic(d, "status"), json.dumps({"v": 1, "state": "online", "ts": t0,
                                             "session": 1}).encode(), False, t0)
            for d in ("a", "b")])
        relay.handle(topic("b", "health"), json.dumps({"v": 1, "ts": t0 + 60_000}).encode(),
                     False, t0 + 60_000)
        relay.handle(topic("b", "status"), json.dumps({"v": 1, "state": "offline", "ts": t0,
                                                       "session": 1, "reason": "lost"}).encode(),
                     False, t0 + 90_000)
        batch = relay.tick(t0 + 181_000)
        assert batch is not None
        assert {r["device"]: r["online"] for r in s.q("SELECT device, online FROM devices")} \
            == {"a": 0, "b": 0}
        assert s.one("SELECT COUNT(*) AS n FROM deliveries WHERE batch=?", batch)["n"] == 1
        relay.tick(t0 + 40 * 86_400_000)  # prunes health_5m older than 31 days
        assert s.one("SELECT COUNT(*) AS n FROM health_5m")["n"] == 0
    finally:
        s.close()


def test_every_alert_is_kept_whatever_is_notified(tmp_path):
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings(alert_codes=["door_open"]))
    t0 = local(2025, 11, 1, 8)
    relay.handle_batch([(topic("d1", "event"), json.dumps(
        {"v": 1, "seq": q, "type": "alert", "ts": t0, "state": "raised", "code": c,
         "key": "k\u202e"}).encode(), False, t0)
        for q, c in ((1, "door_open"), (2, "disk_low"), (3, ""))])
    rows = [dict(r) for r in s.q("SELECT seq, code, key FROM alerts ORDER BY seq")]
    assert rows == [{"seq": 1, "code": "door_open", "key": "k"},
                    {"seq": 2, "code": "disk_low", "key": "k"}]
    assert [r["code"] for r in s.q("SELECT code FROM notices")] == ["door_open"]
    s.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_event_bodies_are_emptied_after_the_window_by_chunks(tmp_path, request, engine):
    """Bodies received before the window are replaced (the rows, play records and alerts
    stay); each prune goes on from where the last stopped, in chunks, even when many rows
    share one received time."""
    s = RelayStore(str(tmp_path / "r.db") if engine == "sqlite"
                   else request.getfixturevalue("pg_url"))
    day = 86_400_000
    t0 = local(2025, 11, 1, 8)
    msgs = []
    for seq in range(1, 41):  # 10 received at each of 4 instants, 10 days apart
        at = t0 + (seq - 1) // 10 * 10 * day
        body = {"v": 1, "seq": seq, "type": "play", "ts": at, "started": at,
                "ended": at + 1000, "played_ms": 1000}
        msgs.append((topic("d1", "event"), json.dumps(body).encode(), False, at))
    relay = feed(s, msgs)
    assert s.prune_event_bodies(t0 + 15 * day, chunk=3) == 20  # 2 instants x 10
    bodies = [r["body"] for r in s.q("SELECT body FROM events ORDER BY seq")]
    assert bodies[:20] == [store.PRUNED_BODY] * 20
    assert all(json.loads(b)["seq"] == i for i, b in enumerate(bodies[20:], 21))
    assert s.one("SELECT COUNT(*) AS n FROM plays")["n"] == 40  # what reports read stays
    assert s.prune_event_bodies(t0 + 15 * day) == 0  # nothing again
    # the relay's hourly prune, with relay.events_keep_days
    relay.settings.events_keep_days = 10
    relay.tick(t0 + 30 * day + 1)
    assert s.one("SELECT COUNT(*) AS n FROM events WHERE body = ?", store.PRUNED_BODY)["n"] \
        == 30
    assert s.one("SELECT COUNT(*) AS n FROM events")["n"] == 40
    s.close()


def test_the_writer_lingers_so_a_trickle_is_one_transaction(tmp_path):
    """Messages arriving a few milliseconds apart (paho hands them over one by one) are
    stored together: without the linger each would be its own transaction and fsync."""
    s = RelayStore(str(tmp_path / "r.db"))
    writer = Writer(Relay(s, RelaySettings()), linger_s=0.5)
    t0 = local(2025, 11, 1, 8)
    for seq in range(1, 21):
        body = {"v": 1, "seq": seq, "type": "config", "ts": t0}
        writer.put(topic("d1", "event"), json.dumps(body).encode(), False, t0)
        time.sleep(0.005)
    writer.stop()
    assert s.one("SELECT COUNT(*) AS n FROM events")["n"] == 20
    assert writer.batches <= 2, writer.batches
    s.close()


def test_a_relay_behind_on_its_own_backlog_does_not_call_devices_silent(tmp_path):
    """Messages received but still waiting in the writer's queue are not silence: the
    heartbeat check judges up to the oldest message not yet stored."""
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings(heartbeat_default_s=10, missed_beats=3))
    writer = Writer(relay, linger_s=0.01)
    t0 = local(2025, 11, 1, 8)
    status = json.dumps({"v": 1, "state": "online", "ts": t0, "session": 1}).encode()
    writer.put(topic("d1", "status"), status, False, t0)
    wait_until(lambda: writer.heard_until_ms() is None and s.one(
        "SELECT COUNT(*) AS n FROM devices")["n"] == 1, 5, what="the device stored")
    with s.lock:  # the writer is stuck behind this: what it is given waits
        for k in range(1, 6):  # a sample every 10 s, received and waiting
            at = t0 + k * 10_000
            writer.put(topic("d1", "health"), json.dumps({"v": 1, "ts": at}).encode(), False,
                       at)
        wait_until(lambda: writer.heard_until_ms() == t0 + 10_000, 5, what="waiting")
        relay.tick(t0 + 75_000, writer.heard_until_ms())  # 75 s after the last stored word
        assert s.one("SELECT online FROM devices")["online"] == 1  # but 10 s of it is known
        relay.tick(t0 + 75_000)  # what it did before: the backlog taken for silence
        assert s.one("SELECT online FROM devices")["online"] == 0
    writer.stop()
    assert writer.heard_until_ms() is None
    s.close()


def test_the_writer_retries_when_the_database_fails_and_loses_nothing(tmp_path):
    """The database failing for a while (locked by another relay past its busy timeout, a
    PostgreSQL restart) is retried: the messages were acknowledged to the broker already."""
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings())
    real, failures = relay.handle_batch, [2]

    def flaky(batch):
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        real(batch)

    relay.handle_batch = flaky
    writer = Writer(relay, linger_s=0.2)
    t0 = local(2025, 11, 1, 8)
    for seq in range(1, 11):
        writer.put(topic("d1", "event"), json.dumps({"v": 1, "seq": seq, "type": "config",
                                                     "ts": t0}).encode(), False, t0)
    writer.stop()
    assert s.one("SELECT COUNT(*) AS n FROM events")["n"] == 10
    assert writer.retries == 2 and relay.counters.messages == 10
    s.close()


def test_a_relay_reading_what_the_broker_held_judges_silence_in_the_devices_time(tmp_path):
    """The relay stalled 25 s and now reads what the broker held, a device at a time. A
    device whose held messages are not read yet is not silent; one that stopped is, once the
    devices' time read so far is past its heartbeats."""
    s = RelayStore(str(tmp_path / "r.db"))
    relay = Relay(s, RelaySettings(heartbeat_default_s=10, missed_beats=3))
    t0 = local(2025, 11, 1, 8)
    devices = ("alive", "other", "quiet")

    def msg(device, leaf, ts, at, **body):
        return (topic(device, leaf), json.dumps({"v": 1, "ts": ts, **body}).encode(), False, at)

    def online():
        return {r["device"]: r["online"] for r in s.q("SELECT device, online FROM devices")}

    relay.handle_batch([msg(d, "status", t0, t0, state="online", session=1) for d in devices]
                       + [msg(d, "health", t0 + 10_000, t0 + 10_000) for d in devices])
    relay.handle_batch([msg("other", "health", t0 + 20_000, t0 + 45_000)])  # 25 s late
    assert relay.lag_ms == 25_000
    relay.tick(t0 + 45_500)  # alive's sample of +20 s is still held by the broker
    assert online() == {"alive": 1, "other": 1, "quiet": 1}
    relay.handle_batch([msg("alive", "health", t0 + 20_000, t0 + 46_000)])
    for k in range(3, 6):  # the backlog goes on, 25 s behind; quiet says nothing more
        at = t0 + k * 10_000
        relay.handle_batch([msg(d, "health", at, at + 25_000) for d in ("alive", "other")])
    relay.tick(t0 + 75_500)  # the devices' time read: +50 s; quiet silent since +10 s
    assert online() == {"alive": 1, "other": 1, "quiet": 0}
    s.close()


def test_processes_sharing_a_sqlite_file_take_turns_and_never_keep_the_writer_lock(tmp_path):
    """Writers on one SQLite file take turns through ``FILE-writer.lock`` (ctl/db.py): held
    for a transaction only, also when it fails, and a second writer waits for it rather than
    fail or interleave."""
    import fcntl
    import os
    import threading

    path = tmp_path / "relay.db"
    a, b = RelayStore(str(path)), RelayStore(str(path))
    lock = os.open(f"{path}-writer.lock", os.O_RDWR)

    def free() -> bool:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True

    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with a.tx():
            inside.set()
            assert not free()  # held while the transaction runs
            time.sleep(0.3)
            a.x("INSERT INTO meta(key, value) VALUES('a', '1')")
            order.append("a committed")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with b.tx():
        order.append("b began")
        assert b.one("SELECT value FROM meta WHERE key='a'")["value"] == "1"
    t.join()
    assert order == ["a committed", "b began"]
    assert free()
    with pytest.raises(sqlite3.IntegrityError), a.tx():
        a.x("INSERT INTO meta(key, value) VALUES('a', '2')")  # the key exists
    assert free()  # released after a rollback too
    os.close(lock)
    a.close()
    b.close()
