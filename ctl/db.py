"""The relay's database connection: SQLite (the embedded default, a file path) or PostgreSQL
(``relay.db_url: postgresql://…``, psycopg 3), behind one small interface.

SQL is written once, in SQLite's dialect with ``?`` placeholders; :meth:`Database.sql` turns it
into PostgreSQL's where they differ (placeholders, ``INSERT OR IGNORE``, ``rowid``, 64-bit
integers, auto-increment keys). Rows read like mappings (``row["col"]``, ``dict(row)``) on both.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
from typing import Any

SQLITE, POSTGRES = "sqlite", "postgresql"


def is_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def driver_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    try:
        import psycopg
    except ImportError:
        return errors
    return (*errors, psycopg.Error)


class Database:
    """One connection (SQLite file or PostgreSQL URL) shared by the threads of a process
    under ``lock``; ``tx()`` is one write transaction, ``savepoint()`` a part of it."""

    def __init__(self, target: str, *, read_only: bool = False) -> None:
        self.lock = threading.RLock()
        self.errors = driver_errors()
        self._writer_lock: int | None = None  # SQLite file: see _Tx
        self._cache: dict[str, str] = {}
        if is_url(target):
            import psycopg
            from psycopg.rows import dict_row

            self.dialect = POSTGRES
            self.target = target
            self.conn = psycopg.connect(target, autocommit=True, row_factory=dict_row)
            return
        self.dialect = SQLITE
        self.target = os.path.expanduser(target)
        if read_only:
            import urllib.parse

            self.conn = sqlite3.connect(f"file:{urllib.parse.quote(self.target)}?mode=ro",
                                        uri=True, check_same_thread=False,
                                        isolation_level=None)
        else:
            if self.target != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
            # another relay process sharing the file holds the write lock for a batch:
            # wait for it rather than fail (the writer retries beyond this, too)
            self.conn = sqlite3.connect(self.target, check_same_thread=False,
                                        isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            if self.target != ":memory:":
                self._writer_lock = os.open(f"{self.target}-writer.lock",
                                            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.conn.row_factory = sqlite3.Row

    @property
    def pg(self) -> bool:
        return self.dialect == POSTGRES

    # --- SQL in one dialect --------------------------------------------------------------

    def sql(self, text: str) -> str:
        """``text`` (SQLite's dialect) in this database's dialect."""
        if not self.pg:
            return text
        out = self._cache.get(text)
        if out is None:
            out = text.replace("%", "%%").replace("?", "%s")
            if "INSERT OR IGNORE" in out:
                out = out.replace("INSERT OR IGNORE", "INSERT") + " ON CONFLICT DO NOTHING"
            out = re.sub(r"\browid\b", "id", out)
            self._cache[text] = out
        return out

    def ddl(self, script: str) -> list[str]:
        """The statements of a schema script, in this dialect."""
        if self.pg:
            script = script.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
            script = re.sub(r"\bINTEGER\b", "BIGINT", script)
            script = re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)
            script = script.replace(" WITHOUT ROWID", "")
        return [s.strip() for s in script.split(";") if s.strip()]

    # --- statements ----------------------------------------------------------------------

    def x(self, sql: str, *args: Any) -> Any:
        return self.conn.execute(self.sql(sql), args)

    def q(self, sql: str, *args: Any) -> list[Any]:
        return self.conn.execute(self.sql(sql), args).fetchall()

    def one(self, sql: str, *args: Any) -> Any:
        return self.conn.execute(self.sql(sql), args).fetchone()

    def many(self, sql: str, rows: list[tuple]) -> None:
        if self.pg:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(sql), rows)
        else:
            self.conn.executemany(sql, rows)

    def insert_id(self, sql: str, *args: Any) -> int:
        """Run an INSERT into a table with an auto-increment ``id``; its new id."""
        if self.pg:
            return self.conn.execute(self.sql(sql) + " RETURNING id", args).fetchone()["id"]
        return self.conn.execute(sql, args).lastrowid

    def stream(self, sql: str, *args: Any, size: int = 2000):
        """Rows one at a time without holding them all (a server-side cursor on PostgreSQL)."""
        if self.pg:
            with self.conn.transaction(), self.conn.cursor(name="stream") as cur:
                cur.itersize = size  # a named cursor: rows come in chunks
                cur.execute(self.sql(sql), args)
                yield from cur
        else:
            yield from self.conn.execute(sql, args)

    def columns(self, table: str) -> set[str]:
        if self.pg:
            return {r["column_name"] for r in self.q(
                "SELECT column_name FROM information_schema.columns WHERE table_name=?", table)}
        return {r["name"] for r in self.conn.execute(f"PRAGMA table_info({table})")}

    def tables(self) -> set[str]:
        if self.pg:
            return {r["tablename"] for r in self.q(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        return {r["name"] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}

    # --- transactions --------------------------------------------------------------------

    def tx(self) -> _Tx:
        return _Tx(self)

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    def close(self) -> None:
        """SQLite: checkpoint the write-ahead log into the database file; then close."""
        if not self.pg:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:  # another connection still reading: close anyway
                pass
        self.conn.close()
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None


class _Tx:
    """``with db.tx():`` one write transaction under the connection's lock.

    On a SQLite file, processes sharing it (several relays, a console) also take an
    ``flock`` on ``FILE-writer.lock`` for the transaction: SQLite's own busy handler polls
    with sleeps of up to 100 ms, so a process waiting for another's write lock lost most of
    the time it waited (two relays on one file used 1 core of 2: docs/PERFORMANCE.md,
    "Relay ingest on gmqtt"); a blocked ``flock`` returns as soon as the other commits."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def __enter__(self) -> Database:
        self.db.lock.acquire()
        fd = self.db._writer_lock
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self.db.conn.execute("BEGIN" if self.db.pg else "BEGIN IMMEDIATE")
            except BaseException:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                raise
        except BaseException:
            self.db.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            if self.db._writer_lock is not None:
                fcntl.flock(self.db._writer_lock, fcntl.LOCK_UN)
            self.db.lock.release()


class _Savepoint:
    """Inside a transaction: a part that is undone alone when it raises."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def __enter__(self) -> Database:
        self.db.conn.execute("SAVEPOINT m")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.db.conn.execute("ROLLBACK TO SAVEPOINT m")
        self.db.conn.execute("RELEASE SAVEPOINT m")
