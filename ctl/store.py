"""The relay's database (``relay.db_path``, SQLite; or ``relay.db_url``, PostgreSQL): its
schema, made for the queries that read it, the migration of an older SQLite file (done when it
is opened), what gap tracking needs, and a read-only look at the devices it knows. Written by
``ttcs-ctl relay``; read by ``report`` and ``send`` (docs/CTL.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from typing import Any

from agent.protocol import CMD_ID_RE, Priority
from ctl.db import Database, driver_errors, is_url
from ctl.seqs import covered_ranges, holes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online INTEGER, since_ms INTEGER, reason TEXT, session INTEGER,
    last_seen_ms INTEGER, health_ts INTEGER, interval_ms INTEGER, max_seq INTEGER,
    state TEXT, first_seen_ms INTEGER NOT NULL, next_check_ms INTEGER);
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, type TEXT NOT NULL,
    historical INTEGER NOT NULL, received_ms INTEGER NOT NULL, body TEXT NOT NULL, flags TEXT,
    PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS events_by_type ON events(type, ts);
CREATE TABLE IF NOT EXISTS plays (
    device TEXT NOT NULL, seq INTEGER NOT NULL, started INTEGER NOT NULL,
    ended INTEGER NOT NULL, played_ms INTEGER NOT NULL, requested_ms INTEGER,
    segment INTEGER NOT NULL, emergency INTEGER NOT NULL, segments TEXT,
    overlap INTEGER NOT NULL DEFAULT 0, aired_ms INTEGER NOT NULL, known INTEGER NOT NULL,
    first INTEGER NOT NULL, claim INTEGER NOT NULL, cmd_id TEXT, result TEXT,
    PRIMARY KEY (device, started, seq), UNIQUE (device, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS plays_by_end ON plays(ended);
CREATE INDEX IF NOT EXISTS plays_segmented ON plays(ended) WHERE segments IS NOT NULL;
CREATE TABLE IF NOT EXISTS alerts (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, state TEXT NOT NULL,
    code TEXT NOT NULL, key TEXT, flags TEXT, PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts(ts);
CREATE TABLE IF NOT EXISTS gaps (
    device TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    noticed_ms INTEGER NOT NULL, filled_ms INTEGER, lost_ms INTEGER,
    PRIMARY KEY (device, first_seq));
CREATE TABLE IF NOT EXISTS health_latest (
    device TEXT PRIMARY KEY, ts INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    body TEXT NOT NULL, flags TEXT);
CREATE TABLE IF NOT EXISTS health_5m (
    device TEXT NOT NULL, bucket_ms INTEGER NOT NULL, n INTEGER NOT NULL,
    cpu_temp_sum REAL NOT NULL, cpu_temp_n INTEGER NOT NULL, cpu_temp_max REAL,
    load1_max REAL, mem_avail_min INTEGER, disk_state_min INTEGER, disk_cache_min INTEGER,
    signal_sum REAL NOT NULL, signal_n INTEGER NOT NULL, signal_min INTEGER,
    outbox_max INTEGER, mains_off_n INTEGER NOT NULL, door_open_n INTEGER NOT NULL,
    PRIMARY KEY (device, bucket_ms));
CREATE INDEX IF NOT EXISTS health_5m_by_time ON health_5m(bucket_ms);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, ts INTEGER NOT NULL,
    online INTEGER NOT NULL, reason TEXT);
CREATE INDEX IF NOT EXISTS transitions_by_device ON transitions(device, ts);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, kind TEXT NOT NULL,
    code TEXT, key TEXT, ts INTEGER NOT NULL, received_ms INTEGER NOT NULL, detail TEXT,
    batch INTEGER);
CREATE INDEX IF NOT EXISTS notices_pending ON notices(batch, received_ms);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_ms INTEGER NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches(created_ms);
CREATE TABLE IF NOT EXISTS deliveries (
    batch INTEGER NOT NULL, channel TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_ms INTEGER NOT NULL, sent_ms INTEGER, failed INTEGER NOT NULL DEFAULT 0, error TEXT,
    parts_sent INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (batch, channel));
CREATE TABLE IF NOT EXISTS seq_asks (
    device TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, noticed_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_ms INTEGER NOT NULL, sent_ms INTEGER,
    PRIMARY KEY (device, lo));
CREATE INDEX IF NOT EXISTS seq_asks_due ON seq_asks(next_ms);
CREATE TABLE IF NOT EXISTS seq_top (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seq_probe (device TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seq_lost (
    device TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, recorded_ms INTEGER NOT NULL,
    PRIMARY KEY (device, lo));
"""
INDEXES_AFTER_COLUMNS = ("CREATE INDEX IF NOT EXISTS devices_due ON devices(next_check_ms)",
                         "CREATE INDEX IF NOT EXISTS events_by_received ON events(received_ms)",
                         "CREATE INDEX IF NOT EXISTS plays_by_cmd ON plays(cmd_id)")
# columns added since the first release: added to an older database when it is opened
COLUMNS = {"events": {"flags": "TEXT"},
           "deliveries": {"parts_sent": "INTEGER NOT NULL DEFAULT 0"},
           "devices": {"next_check_ms": "INTEGER"}, "gaps": {"lost_ms": "INTEGER"},
           "plays": {"cmd_id": "TEXT", "result": "TEXT"}}
# meta: when ``plays.cmd_id`` was added to an older database (play records stored before it
# have none: ``cap status`` reads those from ``events``)
PLAYS_CMD_ID_SINCE = "plays_cmd_id_since_ms"
RESULT_RE = re.compile(r"[a-z_]{1,20}")  # a play record's ``result``: a word
TS_FLAG = "device_time"  # ``flags``: the device's ts was out of window; ts is the receive time
BUCKET_MS = 300_000  # health history: 5-minute aggregates
PRUNED_BODY = '{"pruned":true}'  # an event body emptied after relay.events_keep_days
PRUNE_CHUNK = 5000  # event bodies emptied per transaction
PLAY_SLACK_MS = 2_000  # audio and wall clocks differ a little: more than this is a false claim


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**62 else None


def _segment_ok(g: Any, started: int, ended: int) -> bool:
    if not isinstance(g, dict):
        return False
    a, b, p = (_int(g.get(k)) for k in ("started", "ended", "played_ms"))
    return a is not None and b is not None and p is not None and started <= a <= b <= ended \
        and p >= 0

def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _num(v: Any, kind: type = float) -> Any:
    """A number from a device (bounded), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and -1e12 < v < 1e12:
        return kind(v)
    return None


def health_aggregate(body: dict) -> dict[str, Any]:
    """One health sample as a ``health_5m`` row's values (``n`` = 1): averages as sum and
    count, extremes, and counts of samples with the mains off or the door open."""
    system, disk, cabinet = _get(body, "system"), _get(body, "disk_free_mb"), \
        _get(body, "cabinet")
    temp = _num(_get(system, "cpu_temp_c"))
    load = _get(system, "load")
    signal = _num(_get(_get(body, "modem"), "signal_dbm"), int)
    return {"n": 1, "cpu_temp_sum": temp or 0.0, "cpu_temp_n": int(temp is not None),
            "cpu_temp_max": temp,
            "load1_max": _num(load[0]) if isinstance(load, list) and load else None,
            "mem_avail_min": _num(_get(system, "mem_available_mb"), int),
            "disk_state_min": _num(_get(disk, "state"), int),
            "disk_cache_min": _num(_get(disk, "cache"), int),
            "signal_sum": float(signal or 0), "signal_n": int(signal is not None),
            "signal_min": signal, "outbox_max": _num(_get(_get(body, "mqtt"), "outbox"), int),
            "mains_off_n": int(_get(cabinet, "mains_present") is False),
            "door_open_n": int(_get(cabinet, "door_open") is True)}


def _fold(col: str) -> str:
    t = "health_5m"
    if col.endswith(("_sum", "_n")) or col == "n":
        return f"{col} = {t}.{col} + excluded.{col}"
    op = ">" if col.endswith("_max") else "<"
    return (f"{col} = CASE WHEN excluded.{col} IS NOT NULL AND ({t}.{col} IS NULL OR"
            f" excluded.{col} {op} {t}.{col}) THEN excluded.{col} ELSE {t}.{col} END")


HEALTH_COLUMNS = tuple(health_aggregate({}))
HEALTH_UPSERT = (
    f"INSERT INTO health_5m(device, bucket_ms, {', '.join(HEALTH_COLUMNS)}) VALUES(?, ?"
    f"{', ?' * len(HEALTH_COLUMNS)}) ON CONFLICT (device, bucket_ms) DO UPDATE SET "
    + ", ".join(_fold(c) for c in HEALTH_COLUMNS))


class RelayStore(Database):
    """The relay's database, shared by relay and report: SQLite (WAL, ``synchronous=FULL``)
    for a path, PostgreSQL for a ``postgresql://`` URL."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.path = self.target
        self.db = self.conn  # the driver's own connection
        self._leader = False
        with self.lock:
            old = not self.pg and "devices" in self.tables() and "health" in self.tables()
            for statement in self.ddl(SCHEMA):
                self.x(statement)
            self._add_columns()
            for statement in INDEXES_AFTER_COLUMNS:
                self.x(statement)
            if old:
                with self.tx():
                    self._migrate_v1()
            self._set_meta("schema", str(SCHEMA_VERSION))

    def _add_columns(self) -> None:
        for table, columns in COLUMNS.items():
            have = self.columns(table)
            for name, decl in columns.items():
                if name not in have:
                    self.x(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                    if (table, name) == ("plays", "cmd_id"):
                        self._set_meta(PLAYS_CMD_ID_SINCE, str(int(time.time() * 1000)))

    def _migrate_v1(self) -> None:
        """A version-1 SQLite file: play records and alerts into their typed tables, the raw
        health samples into the latest per device and 5-minute aggregates; heartbeat checks
        due at once (they reschedule themselves)."""
        log.info("relay store %s: migrating to schema %d", self.path, SCHEMA_VERSION)
        for r in self.stream("SELECT device, seq, body FROM events WHERE type = 'play'"
                        " ORDER BY device, seq"):
            try:
                rec = json.loads(r["body"])
            except ValueError:
                continue
            if isinstance(rec, dict):
                self.add_play_record(r["device"], r["seq"], rec)
        self.x("INSERT OR IGNORE INTO alerts SELECT device, seq, ts,"
               " json_extract(body, '$.state'), substr(json_extract(body, '$.code'), 1, 40),"
               " substr(json_extract(body, '$.key'), 1, 64), flags FROM events"
               " WHERE type = 'alert' AND json_valid(body)"
               " AND json_type(body, '$.code') = 'text'"
               " AND json_extract(body, '$.state') IN ('raised', 'cleared')")
        self.x("INSERT OR REPLACE INTO health_latest SELECT h.device, h.ts, h.received_ms,"
               " h.body, h.flags FROM health h JOIN (SELECT device, MAX(ts) AS ts FROM health"
               " GROUP BY device) m ON m.device = h.device AND m.ts = h.ts ORDER BY h.rowid")
        n = 0
        for r in self.stream("SELECT device, ts, body FROM health"):
            try:
                body = json.loads(r["body"])
            except ValueError:
                continue
            self.add_health_sample(r["device"], r["ts"], body if isinstance(body, dict) else {})
            n += 1
        self.x("DROP TABLE health")
        self.x("UPDATE devices SET next_check_ms = 0 WHERE online = 1")
        log.info("relay store %s: %d health samples folded into 5-minute aggregates",
                 self.path, n)

    def _set_meta(self, key: str, value: str) -> None:
        self.x("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT (key)"
               " DO UPDATE SET value = excluded.value", key, value)

    def instance_id(self) -> str:
        """A random id made once per database: with a batch id it names a notification
        uniquely (the webhook's ``Idempotency-Key``)."""
        self.x("INSERT OR IGNORE INTO meta(key, value) VALUES('instance', ?)",
               secrets.token_hex(8))
        return self.one("SELECT value FROM meta WHERE key='instance'")["value"]

    # --- play records -----------------------------------------------------------------------

    def add_play_record(self, device: str, seq: int, rec: dict) -> None:
        """A play record event (docs/AUDIO.md) into ``plays``, when its numbers make sense:
        with what a report sums precomputed (``aired_ms``: its played time, at most its
        span, or its segments' when it lists them; ``known``: its requested length is known;
        ``first``: it is an aired item's first segment; ``claim``: it claims more than its
        span). Segments outside the record's own span are ignored."""
        started, ended, played = (_int(rec.get(k)) for k in ("started", "ended", "played_ms"))
        if started is None or ended is None or played is None or ended < started or played < 0:
            return
        segs = rec.get("segments")
        aired = min(played, ended - started)
        if isinstance(segs, list) and segs and all(_segment_ok(g, started, ended)
                                                   for g in segs):
            aired = sum(min(g["played_ms"], g["ended"] - g["started"]) for g in segs)
            segments = json.dumps([{k: g[k] for k in ("started", "ended", "played_ms")}
                                   for g in segs], separators=(",", ":"))
        else:
            segments = None
        requested = _int(rec.get("requested_ms"))
        segment = rec.get("segment", 0)
        segment = segment if _int(segment) is not None else -1
        cmd_id, result = rec.get("id"), rec.get("result")
        self.add_play(device, seq, started, ended, played, requested, segment,
                      rec.get("priority") == Priority.EMERGENCY, segments, aired,
                      cmd_id if isinstance(cmd_id, str) and CMD_ID_RE.match(cmd_id) else None,
                      result if isinstance(result, str) and RESULT_RE.fullmatch(result)
                      else None)

    def add_play(self, device: str, seq: int, started: int, ended: int, played_ms: int,
                 requested_ms: int | None, segment: int, emergency: bool,
                 segments: str | None, aired_ms: int, cmd_id: str | None = None,
                 result: str | None = None) -> None:
        """Store a play record (once per device and seq). A record overlapping the one
        before or after it (by ``started``) is marked with it: a device's records overlap
        somewhere only if two neighbours do, so a report computes the exact union of spans
        only for the devices with a marked record (docs/CTL.md)."""
        if self.one("SELECT 1 AS x FROM plays WHERE device=? AND seq=?", device, seq):
            return
        marks = []
        before = self.one("SELECT seq, ended FROM plays WHERE device=? AND started<=?"
                          " ORDER BY started DESC, seq DESC LIMIT 1", device, started)
        if before is not None and before["ended"] > started and ended > started:
            marks.append(before["seq"])
        after = self.one("SELECT seq, started FROM plays WHERE device=? AND started>=?"
                         " ORDER BY started, seq LIMIT 1" if before is None else
                         "SELECT seq, started FROM plays WHERE device=? AND started>=?"
                         " AND seq<>? ORDER BY started, seq LIMIT 1",
                         *((device, started) if before is None else
                           (device, started, before["seq"])))
        if after is not None and after["started"] < ended and ended > started:
            marks.append(after["seq"])
        known = int(requested_ms is not None and requested_ms > 0)
        self.x("INSERT OR IGNORE INTO plays(device, seq, started, ended, played_ms,"
               " requested_ms, segment, emergency, segments, overlap, aired_ms, known, first,"
               " claim, cmd_id, result) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               device, seq, started, ended, played_ms, requested_ms, segment, int(emergency),
               segments, int(bool(marks)), aired_ms, known, int(segment == 0 and played_ms > 0),
               int(played_ms > ended - started + PLAY_SLACK_MS), cmd_id, result)
        for other in marks:
            self.x("UPDATE plays SET overlap=1 WHERE device=? AND seq=?", device, other)

    # --- health --------------------------------------------------------------------------

    def add_health_sample(self, device: str, ts: int, body: dict) -> None:
        """Fold one sample into its device's 5-minute aggregate (two writers add up)."""
        agg = health_aggregate(body)
        self.x(HEALTH_UPSERT, device, ts - ts % BUCKET_MS, *agg.values())

    def set_latest_health(self, device: str, ts: int, received_ms: int, body: str,
                          flags: str | None) -> None:
        """Keep the newest sample (by ``ts``) of each device, whoever writes it first."""
        self.x("INSERT INTO health_latest(device, ts, received_ms, body, flags)"
               " VALUES(?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET ts = excluded.ts,"
               " received_ms = excluded.received_ms, body = excluded.body,"
               " flags = excluded.flags WHERE excluded.ts >= health_latest.ts",
               device, ts, received_ms, body, flags)

    # --- retention ---------------------------------------------------------------------------

    def prune_event_bodies(self, before_ms: int, chunk: int = PRUNE_CHUNK) -> int:
        """Replace the bodies of the events received before ``before_ms`` by
        :data:`PRUNED_BODY`; how many. The rows stay: (device, ``seq``) is what deduplication
        and gap tracking read, and play records and alerts have their own tables. By the
        ``events_by_received`` index from where the last prune stopped (``meta``
        ``events_pruned_ms``), in chunks of about ``chunk`` rows, each its own transaction
        (ingest goes on between them)."""
        row = self.one("SELECT value FROM meta WHERE key='events_pruned_ms'")
        since, total = int(row["value"]) if row else 0, 0
        while since < before_ms:
            with self.tx():
                row = self.one("SELECT received_ms FROM events WHERE received_ms >= ? AND"
                               " received_ms < ? ORDER BY received_ms LIMIT 1 OFFSET ?",
                               since, before_ms, chunk)
                cut = before_ms if row is None else max(row["received_ms"], since + 1)
                total += self.x("UPDATE events SET body=? WHERE received_ms >= ? AND"
                                " received_ms < ? AND body <> ?", PRUNED_BODY, since, cut,
                                PRUNED_BODY).rowcount
                self._set_meta("events_pruned_ms", str(cut))
            since = cut
        return total

    # --- missing seqs (one definition: ctl/seqs.py) ----------------------------------------

    def missing_seqs(self, device: str, after: int = 0,
                     top: int | None = None) -> tuple[list[tuple[int, int]], int | None]:
        """The ranges of ``device``'s seqs above ``after`` that are neither stored nor
        recorded lost, up to the highest covered one or ``top`` (the device's own newest, when
        it said so: its tail too); and the highest covered seq (None: nothing above
        ``after``)."""
        seqs = [r["seq"] for r in self.q(
            "SELECT seq FROM events WHERE device=? AND seq > ? ORDER BY seq", device, after)]
        lost = [(r["lo"], r["hi"]) for r in self.q(
            "SELECT lo, hi FROM seq_lost WHERE device=? AND hi > ?", device, after)]
        covered = covered_ranges(seqs, lost)
        end = covered[-1][1] if covered else None
        if top is not None and top > (end if end is not None else after):
            covered = [*covered, (top + 1, top + 1)]
        return holes(after, covered), end

    def record_lost(self, device: str, lo: int, hi: int, now_ms: int) -> list[tuple[int, int]]:
        """Record the seqs in [lo, hi] neither stored nor already recorded as lost for good
        (the device no longer holds them); the open ``gaps`` rows now wholly covered and with
        a lost part are closed with ``lost_ms``. Returns the ranges newly recorded. Inside
        the caller's transaction."""
        have = [r["seq"] for r in self.q(
            "SELECT seq FROM events WHERE device=? AND seq BETWEEN ? AND ? ORDER BY seq",
            device, lo, hi)]
        new = []
        for x, y in holes(lo - 1, covered_ranges(have, [(hi + 1, hi + 1)])):
            if self.x("INSERT OR IGNORE INTO seq_lost(device, lo, hi, recorded_ms)"
                      " VALUES(?, ?, ?, ?)", device, x, y, now_ms).rowcount:
                new.append((x, y))
        for x, y in new:
            for g in self.q("SELECT first_seq, last_seq FROM gaps WHERE device=? AND"
                            " filled_ms IS NULL AND lost_ms IS NULL AND first_seq <= ? AND"
                            " last_seq >= ?", device, y, x):
                missing = self.missing_seqs(device, g["first_seq"] - 1, g["last_seq"])[0]
                if not any(a <= g["last_seq"] for a, _ in missing):
                    self.x("UPDATE gaps SET lost_ms=? WHERE device=? AND first_seq=?", now_ms,
                           device, g["first_seq"])
        return new

    # --- several relays on one PostgreSQL ----------------------------------------------------

    def leader(self) -> bool:
        """Whether this process runs the ticks and notifications: always on SQLite; on
        PostgreSQL the one holding a session advisory lock (another takes over when it
        goes)."""
        if not self.pg or self._leader:
            return True
        with self.lock:
            self._leader = bool(self.one("SELECT pg_try_advisory_lock(1919) AS ok")["ok"])
        return self._leader


def open_store(relay_cfg: dict) -> RelayStore:
    """The store the config names: ``relay.db_url`` when set, else ``relay.db_path``."""
    return RelayStore(relay_cfg.get("db_url") or relay_cfg["db_path"])


def read_devices(target: str) -> dict[str, bool | None] | None:
    """The devices the relay's store at ``target`` (path or URL) knows, each online
    (True/False, None when unknown), read-only; None when there is no such store."""
    if not target:
        return None
    if not is_url(target) and not os.path.isfile(os.path.expanduser(target)):
        return None
    try:
        db = Database(target, read_only=True)
    except (OSError, ImportError, *driver_errors()):  # no store there: the caller says so
        return None
    try:
        rows = db.q("SELECT device, online FROM devices")
    except db.errors:
        return None
    finally:
        db.conn.close()
    return {r["device"]: None if r["online"] is None else bool(r["online"]) for r in rows}
