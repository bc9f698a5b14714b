"""The console's own tables, kept on the relay's database (SQLite or PostgreSQL: one store)
beside the relay's tables, which the console only reads. Names start with ``console_``."""

from __future__ import annotations

from ctl.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS console_users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, groups TEXT NOT NULL,
    emergency INTEGER NOT NULL DEFAULT 0, hash TEXT NOT NULL, created_ms INTEGER NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0, locked_until_ms INTEGER);
CREATE TABLE IF NOT EXISTS console_logins (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, name TEXT, addr TEXT,
    ok INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS console_logins_by_addr ON console_logins(addr, ts);
CREATE TABLE IF NOT EXISTS console_sessions (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS console_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, username TEXT,
    action TEXT NOT NULL, target TEXT, cmd_id TEXT, outcome TEXT NOT NULL, detail TEXT,
    addr TEXT);
CREATE INDEX IF NOT EXISTS console_audit_by_time ON console_audit(ts);
CREATE TABLE IF NOT EXISTS console_commands (
    id TEXT PRIMARY KEY, batch TEXT NOT NULL, ts INTEGER NOT NULL, username TEXT NOT NULL,
    target TEXT NOT NULL, type TEXT NOT NULL, args TEXT NOT NULL, final TEXT);
CREATE INDEX IF NOT EXISTS console_commands_by_batch ON console_commands(batch);
CREATE TABLE IF NOT EXISTS console_acks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cmd_id TEXT NOT NULL, device TEXT NOT NULL,
    stage TEXT NOT NULL, reason TEXT, ts INTEGER, received_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS console_acks_by_cmd ON console_acks(cmd_id, id);
CREATE INDEX IF NOT EXISTS console_acks_by_device ON console_acks(device, id);
CREATE TABLE IF NOT EXISTS console_alert_acks (
    device TEXT NOT NULL, seq INTEGER NOT NULL, username TEXT NOT NULL, note TEXT,
    ts INTEGER NOT NULL, PRIMARY KEY (device, seq));
"""


def ensure(db: Database) -> None:
    """Create the console's tables (idempotent)."""
    with db.lock:
        for statement in db.ddl(SCHEMA):
            db.x(statement)
