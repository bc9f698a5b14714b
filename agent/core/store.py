"""Durable agent state in SQLite (WAL): session and event counters, replay memory, the outbox.

One connection, used only by the core thread. Writes happen in transactions; when the
outermost one ends, its commit is flushed to the card (``fsync`` of the WAL): after
:meth:`Store.transaction` exits, what it wrote survives a power cut. :meth:`Store.commit`
in the middle of one writes without flushing: that survives a crash of the agent at once and a
power cut from the end of the transaction on (two steps, so a command's ``received`` need not
wait for the card; see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
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
CREATE TABLE IF NOT EXISTS open_cmds (id TEXT PRIMARY KEY, type TEXT, since INTEGER);
"""

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once


def encode(body: dict) -> bytes:
    """The wire form of an outbound message (compact UTF-8 JSON)."""
    return _ENCODER.encode(body).encode()


# Events as sent, kept for ``resend`` (agent/core/sentlog.py): written with the event's own
# outbox row, in its transaction (no extra fsync); pruned by age and size by the sentlog.
KEPT_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept (
    seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, kind TEXT NOT NULL,
    created INTEGER NOT NULL);
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
        # NORMAL: a commit writes the WAL without fsync; sync() flushes it at the end of each
        # outermost transaction (SQLite still syncs around its checkpoints).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.db.executescript(KEPT_SCHEMA)
        self._wal_fd: int | None = None
        self._synced_changes = -1
        self.dropped = 0
        self._tx_depth = 0
        self._depth = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._seen_count = self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    # --- transactions ------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable commit for everything inside (nestable: the outermost commits and
        flushes to the card).

        The core wraps each batch of events in one, so an event that writes several acks and
        events costs one fsync, not one each. SQLite's transaction begins at the first write
        (a batch that writes nothing costs nothing). Writes made before an error are kept: each
        write is consistent on its own, and losing acks is worse than keeping them."""
        self._tx_depth += 1
        try:
            yield
        finally:
            self._tx_depth -= 1
            if self._tx_depth == 0:
                if self.db.in_transaction:
                    self.db.execute("COMMIT")
                self.sync()

    def commit(self) -> None:
        """Write what the current transaction holds now (it survives a crash of the agent);
        later writes go into a new one. It is flushed to the card when the outermost
        transaction ends, with everything after it."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """Every write goes through here: it opens the transaction when it is the first."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db.execute(sql, params)

    def sync(self) -> None:
        """Flush committed writes to the card (fsync of the WAL file), if there are any."""
        changes = self.db.total_changes
        if changes == self._synced_changes:
            return
        fd = self._wal()
        if fd is not None:
            os.fsync(fd)
        self._synced_changes = changes

    def _wal(self) -> int | None:
        """A descriptor of the WAL file (fsync works per file, whoever wrote it); reopened
        if the file was replaced. None if there is no WAL file (nothing to flush)."""
        wal = self.path + "-wal"
        try:
            st = os.stat(wal)
        except FileNotFoundError:
            return None
        if self._wal_fd is not None and os.fstat(self._wal_fd).st_ino != st.st_ino:
            os.close(self._wal_fd)
            self._wal_fd = None
        if self._wal_fd is None:
            self._wal_fd = os.open(wal, os.O_RDONLY)
            dir_fd = os.open(os.path.dirname(os.path.abspath(wal)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the WAL file's own entry, once per file
            finally:
                os.close(dir_fd)
        return self._wal_fd

    @property
    def in_transaction(self) -> bool:
        return self._tx_depth > 0

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # --- counters ----------------------------------------------------------------------

    def _get(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    def next_session(self) -> int:
        """Increase and return the session number (once per agent start)."""
        with self.transaction():
            n = self._get("session") + 1
            self._write("INSERT OR REPLACE INTO meta(key, value) VALUES ('session', ?)", (n,))
        return n

    @property
    def last_seq(self) -> int:
        return self._get("seq")

    # --- replay memory -----------------------------------------------------------------

    def seen_get(self, cmd_id: str) -> int | None:
        row = self.db.execute("SELECT first_seen FROM seen WHERE id=?", (cmd_id,)).fetchone()
        return row[0] if row else None

    def seen_add(self, cmd_id: str, kid: str | None, ts: int, now_ms: int) -> None:
        """Remember an accepted id (written before it is acted on; see :meth:`commit`)."""
        with self.transaction():
            cur = self._write(
                "INSERT OR IGNORE INTO seen(id, kid, ts, first_seen) VALUES (?,?,?,?)",
                (cmd_id, kid, ts, now_ms))
            self._seen_count += cur.rowcount
            if self._seen_count > self.seen_max:
                cur = self._write(
                    "DELETE FROM seen WHERE id IN (SELECT id FROM seen ORDER BY first_seen, rowid "
                    "LIMIT ?)", (self._seen_count - self.seen_max,))
                self._seen_count -= cur.rowcount

    # --- outbox ------------------------------------------------------------------------

    def enqueue(self, topic: str, body: dict, *, qos: int, kind: str, now_ms: int,
                event: bool = False) -> dict:
        """Store an outbound message durably; events get the next ``seq`` in the same
        transaction. Returns the body as stored."""
        with self.transaction():
            if event:
                seq = self._get("seq") + 1
                self._write("INSERT OR REPLACE INTO meta(key, value) VALUES ('seq', ?)", (seq,))
                body = {**body, "seq": seq}
            payload = encode(body)
            self._write(
                "INSERT INTO outbox(topic, payload, qos, kind, created) VALUES (?,?,?,?,?)",
                (topic, payload, qos, kind, now_ms))
            self._depth += 1
            if event:
                self._keep(seq, topic, payload, kind, now_ms)
            self._bound()
        return body

    def _bound(self) -> None:
        over = self.depth() - self.max_rows
        for kind in DROPPABLE:
            if over <= 0:
                return
            cur = self._write(
                "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox WHERE kind=? "
                "ORDER BY rowid LIMIT ?)", (kind, over))
            self.dropped += cur.rowcount
            self._depth -= cur.rowcount
            over -= cur.rowcount
        if over > 0:
            log.warning("outbox holds %d rows above its bound of play records and alerts; "
                        "keeping them", over)

    def depth(self) -> int:
        return self._depth

    def pending(self, after: int = 0, limit: int = 100) -> list[OutboxRow]:
        rows = self.db.execute(
            "SELECT rowid, topic, payload, qos, kind FROM outbox WHERE rowid > ? ORDER BY rowid "
            "LIMIT ?", (after, limit)).fetchall()
        return [OutboxRow(*r) for r in rows]

    def delivered(self, rowid: int) -> None:
        with self.transaction():
            cur = self._write("DELETE FROM outbox WHERE rowid=?", (rowid,))
            self._depth -= cur.rowcount

    # --- commands in progress ----------------------------------------------------------

    def open_add(self, cmd_id: str, typ: str, now_ms: int) -> None:
        with self.transaction():
            self._write("INSERT OR REPLACE INTO open_cmds(id, type, since) VALUES (?,?,?)",
                        (cmd_id, typ, now_ms))

    def open_done(self, cmd_id: str) -> None:
        with self.transaction():
            self._write("DELETE FROM open_cmds WHERE id=?", (cmd_id,))

    def open_list(self) -> list[tuple[str, str, int]]:
        return self.db.execute("SELECT id, type, since FROM open_cmds ORDER BY since").fetchall()

    # --- kept events (resend; agent/core/sentlog.py) -------------------------------------
    # A separate block: the table ``kept`` holds every event as first stored, by ``seq``.

    def _keep(self, seq: int, topic: str, payload: bytes, kind: str, now_ms: int) -> None:
        self._write("INSERT OR REPLACE INTO kept(seq, topic, payload, kind, created)"
                    " VALUES (?,?,?,?,?)", (seq, topic, payload, kind, now_ms))

    def kept_range(self, lo: int, hi: int) -> list[tuple[int, str, bytes, str]]:
        """The kept events with ``lo <= seq <= hi``: (seq, topic, payload, kind), by seq."""
        return self.db.execute("SELECT seq, topic, payload, kind FROM kept"
                               " WHERE seq BETWEEN ? AND ? ORDER BY seq", (lo, hi)).fetchall()

    def kept_size(self) -> tuple[int, int]:
        """(rows, payload bytes) kept."""
        n, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0)"
                                  " FROM kept").fetchone()
        return n, size

    def kept_prune(self, older_than_ms: int, max_bytes: int) -> int:
        """Drop kept events created before ``older_than_ms``, then the oldest until the
        payloads take at most ``max_bytes``. Returns how many were dropped."""
        with self.transaction():
            dropped = self._write("DELETE FROM kept WHERE created < ?",
                                  (older_than_ms,)).rowcount
            _, size = self.kept_size()
            while size > max_bytes:
                over = self.db.execute(
                    "SELECT seq, SUM(LENGTH(payload)) OVER (ORDER BY seq) FROM kept"
                    " ORDER BY seq LIMIT 5000").fetchall()
                cut = next((seq for seq, run in over if run >= size - max_bytes), None)
                if cut is None:
                    cut = over[-1][0]
                dropped += self._write("DELETE FROM kept WHERE seq <= ?", (cut,)).rowcount
                _, size = self.kept_size()
        return dropped

    # --- tables added after SCHEMA, made at their first use -------------------------------

    _made: frozenset[str] = frozenset()  # names of the tables below already made

    def _table(self, name: str, columns: str) -> None:
        if name not in self._made:
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
            self._made = self._made | {name}

    # --- what airs (agent/audio/journal.py): one row per item from its start to its end ----

    def airing_put(self, item_id: str, body: dict, played_ms: int, now_ms: int) -> None:
        """Write an item's row (its record so far); flushed with its batch."""
        with self.transaction():
            self._table("airing", _AIRING)
            self._write("INSERT OR REPLACE INTO airing(id, body, played_ms, updated) "
                        "VALUES (?,?,?,?)", (item_id, encode(body), played_ms, now_ms))

    def airing_progress(self, item_id: str, played_ms: int, now_ms: int) -> None:
        """Move an item's position. Written at once (a crash of the agent keeps it) but not
        flushed on its own: it reaches the card with the next flush of any batch, or with the
        kernel's write-back. So a position costs a WAL page, no fsync."""
        with self.transaction():
            self._table("airing", _AIRING)
            flushed = self.db.total_changes == self._synced_changes
            self._write("UPDATE airing SET played_ms=?, updated=? WHERE id=?",
                        (played_ms, now_ms, item_id))
            if flushed:  # nothing else waits for the flush: this alone asks for none
                self._synced_changes = self.db.total_changes

    def airing_done(self, item_id: str) -> None:
        with self.transaction():
            self._table("airing", _AIRING)
            self._write("DELETE FROM airing WHERE id=?", (item_id,))

    def airing_rows(self) -> list[tuple[str, dict, int, int]]:
        """``(id, body, played_ms, updated)`` of every row, oldest update first."""
        self._table("airing", _AIRING)
        rows = self.db.execute(
            "SELECT id, body, played_ms, updated FROM airing ORDER BY updated, id").fetchall()
        return [(i, json.loads(body), played, updated) for i, body, played, updated in rows]

    # --- ad-hoc board messages (agent/board/service.py), kept across restarts --------------

    def board_messages_save(self, messages: list[dict]) -> None:
        """Replace the kept ad-hoc board messages (each a dict with an ``id``), in order."""
        with self.transaction():
            self._table("board_messages", _BOARD_MESSAGES)
            self._write("DELETE FROM board_messages")
            for pos, msg in enumerate(messages):
                self._write("INSERT INTO board_messages(pos, id, body) VALUES (?,?,?)",
                            (pos, msg["id"], encode(msg)))

    def board_messages(self) -> list[dict]:
        self._table("board_messages", _BOARD_MESSAGES)
        rows = self.db.execute("SELECT body FROM board_messages ORDER BY pos").fetchall()
        return [json.loads(body) for (body,) in rows]


_AIRING = "id TEXT PRIMARY KEY, body TEXT NOT NULL, played_ms INTEGER NOT NULL, " \
          "updated INTEGER NOT NULL"
_BOARD_MESSAGES = "pos INTEGER PRIMARY KEY, id TEXT NOT NULL, body TEXT NOT NULL"
