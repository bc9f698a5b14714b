"""The relay's SQLite database (``relay.db_path``): its schema, the columns added since the
first release (added to an older database when it is opened), and a read-only look at the
devices it knows. Written by ``ttcs-ctl relay``; read by ``report`` and ``send`` (docs/CTL.md).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import urllib.parse
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online INTEGER, since_ms INTEGER, reason TEXT, session INTEGER,
    last_seen_ms INTEGER, health_ts INTEGER, interval_ms INTEGER, max_seq INTEGER,
    state TEXT, first_seen_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL, type TEXT NOT NULL,
    historical INTEGER NOT NULL, received_ms INTEGER NOT NULL, body TEXT NOT NULL, flags TEXT,
    PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS events_by_type ON events(type, ts);
CREATE TABLE IF NOT EXISTS gaps (
    device TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    noticed_ms INTEGER NOT NULL, filled_ms INTEGER, PRIMARY KEY (device, first_seq));
CREATE TABLE IF NOT EXISTS health (
    device TEXT NOT NULL, ts INTEGER NOT NULL, received_ms INTEGER NOT NULL, body TEXT NOT NULL,
    flags TEXT);
CREATE INDEX IF NOT EXISTS health_by_device ON health(device, ts);
CREATE TABLE IF NOT EXISTS transitions (
    device TEXT NOT NULL, ts INTEGER NOT NULL, online INTEGER NOT NULL, reason TEXT);
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
"""
# columns added since the first release: added to an older database when it is opened
COLUMNS = {"events": {"flags": "TEXT"}, "health": {"flags": "TEXT"},
           "deliveries": {"parts_sent": "INTEGER NOT NULL DEFAULT 0"}}
TS_FLAG = "device_time"  # ``flags``: the device's ts was out of window; ts is the receive time


class RelayStore:
    """The relay's SQLite database (WAL, ``synchronous=FULL``), shared by relay and report."""

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(path)
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_columns()
        self.lock = threading.RLock()

    def _add_columns(self) -> None:
        for table, columns in COLUMNS.items():
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def close(self) -> None:
        """Checkpoint the write-ahead log into the database file, then close."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:  # another connection still reading: close anyway
            pass
        self.db.close()

    def tx(self) -> _Tx:
        return _Tx(self)

    def q(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self.db.execute(sql, args).fetchone()

    def x(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    def instance_id(self) -> str:
        """A random id made once per database: with a batch id it names a notification
        uniquely (the webhook's ``Idempotency-Key``)."""
        row = self.one("SELECT value FROM meta WHERE key='instance'")
        if row:
            return row["value"]
        value = secrets.token_hex(8)
        self.x("INSERT INTO meta(key, value) VALUES('instance', ?)", value)
        return value


def read_devices(path: str) -> dict[str, bool | None] | None:
    """The devices the relay's store at ``path`` knows, each online (True/False, None when
    unknown), read-only; None when there is no such store."""
    path = os.path.expanduser(path)
    if not path or not os.path.isfile(path):
        return None
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT device, online FROM devices").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return {d: None if online is None else bool(online) for d, online in rows}


class _Tx:
    """``with store.tx():`` one IMMEDIATE transaction under the store's lock."""

    def __init__(self, store: RelayStore) -> None:
        self.store = store

    def __enter__(self) -> RelayStore:
        self.store.lock.acquire()
        self.store.db.execute("BEGIN IMMEDIATE")
        return self.store

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.store.lock.release()
