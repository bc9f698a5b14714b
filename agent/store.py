"""Durable agent state in SQLite (WAL): session and event counters, replay memory, the outbox.

One connection, used only by the core thread. Every write that must survive a power cut is
one transaction with ``synchronous=FULL``: after ``commit`` returns, it is on the card.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    id TEXT PRIMARY KEY, kid TEXT, ts INTEGER, first_seen INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_by_age ON seen(first_seen);
CREATE TABLE IF NOT EXISTS outbox (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    kind TEXT NOT NULL, created INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, rowid);
"""

# What the outbox may drop when full, first to last. Play records and alerts are never dropped.
DROPPABLE = ("health", "ack")


@dataclass
class OutboxRow:
    rowid: int
    topic: str
    payload: bytes
    qos: int
    kind: str


class Store:
    def __init__(self, path: str, *, max_rows: int = 100_000, seen_max: int = 20_000) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.max_rows = max_rows
        self.seen_max = seen_max
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.dropped = 0

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # --- counters ----------------------------------------------------------------------

    def _get(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    def next_session(self) -> int:
        """Increase and return the session number (once per agent start)."""
        with self.db:
            n = self._get("session") + 1
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('session', ?)", (n,))
        return n

    @property
    def last_seq(self) -> int:
        return self._get("seq")

    # --- replay memory -----------------------------------------------------------------

    def seen_get(self, cmd_id: str) -> int | None:
        row = self.db.execute("SELECT first_seen FROM seen WHERE id=?", (cmd_id,)).fetchone()
        return row[0] if row else None

    def seen_add(self, cmd_id: str, kid: str | None, ts: int, now_ms: int) -> None:
        """Remember an accepted id (durably, before it is acted on)."""
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO seen(id, kid, ts, first_seen) VALUES (?,?,?,?)",
                            (cmd_id, kid, ts, now_ms))
            count = self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
            if count > self.seen_max:
                self.db.execute(
                    "DELETE FROM seen WHERE id IN (SELECT id FROM seen ORDER BY first_seen, rowid "
                    "LIMIT ?)", (count - self.seen_max,))

    # --- outbox ------------------------------------------------------------------------

    def enqueue(self, topic: str, body: dict, *, qos: int, kind: str, now_ms: int,
                event: bool = False) -> dict:
        """Store an outbound message durably; events get the next ``seq`` in the same
        transaction. Returns the body as stored."""
        with self.db:
            if event:
                seq = self._get("seq") + 1
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('seq', ?)", (seq,))
                body = {**body, "seq": seq}
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            self.db.execute(
                "INSERT INTO outbox(topic, payload, qos, kind, created) VALUES (?,?,?,?,?)",
                (topic, payload, qos, kind, now_ms))
            self._bound()
        return body

    def _bound(self) -> None:
        over = self.depth() - self.max_rows
        for kind in DROPPABLE:
            if over <= 0:
                return
            cur = self.db.execute(
                "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox WHERE kind=? "
                "ORDER BY rowid LIMIT ?)", (kind, over))
            self.dropped += cur.rowcount
            over -= cur.rowcount
        if over > 0:
            log.warning("outbox holds %d rows above its bound of play records and alerts; "
                        "keeping them", over)

    def depth(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def pending(self, after: int = 0, limit: int = 100) -> list[OutboxRow]:
        rows = self.db.execute(
            "SELECT rowid, topic, payload, qos, kind FROM outbox WHERE rowid > ? ORDER BY rowid "
            "LIMIT ?", (after, limit)).fetchall()
        return [OutboxRow(*r) for r in rows]

    def delivered(self, rowid: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM outbox WHERE rowid=?", (rowid,))
