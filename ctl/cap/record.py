"""CAP's tables in the relay's database (``relay.db_path`` or ``relay.db_url``), beside the
relay's own: every message handled (what came in, the decision), the commands it made (where
they went), the acks seen for them, and what a watched feed or folder has already given.
Created here, with ``CREATE TABLE IF NOT EXISTS``: the relay's schema is not touched.
"""

from __future__ import annotations

import json
import os

from ctl.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS cap_alerts (
    sender TEXT NOT NULL, identifier TEXT NOT NULL, sent TEXT NOT NULL,
    received_ms INTEGER NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL,
    msg_type TEXT NOT NULL, scope TEXT NOT NULL, action TEXT NOT NULL, why TEXT NOT NULL,
    detail TEXT NOT NULL, xml TEXT NOT NULL, PRIMARY KEY (sender, identifier, sent));
CREATE INDEX IF NOT EXISTS cap_alerts_by_id ON cap_alerts(identifier);
CREATE TABLE IF NOT EXISTS cap_commands (
    cmd_id TEXT NOT NULL, target TEXT NOT NULL, sender TEXT NOT NULL,
    identifier TEXT NOT NULL, sent TEXT NOT NULL, type TEXT NOT NULL, lang TEXT,
    priority TEXT, at_ms INTEGER, exp_ms INTEGER, sent_ms INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (cmd_id, target));
CREATE INDEX IF NOT EXISTS cap_commands_by_alert ON cap_commands(sender, identifier);
CREATE TABLE IF NOT EXISTS cap_acks (
    cmd_id TEXT NOT NULL, device TEXT NOT NULL, stage TEXT NOT NULL, ts INTEGER NOT NULL,
    reason TEXT, PRIMARY KEY (cmd_id, device, stage));
CREATE TABLE IF NOT EXISTS cap_seen (
    source TEXT NOT NULL, digest TEXT NOT NULL, seen_ms INTEGER NOT NULL,
    PRIMARY KEY (source, digest));
"""


class CapRecord:
    """The CAP tables; one :class:`ctl.db.Database` handed in."""

    def __init__(self, db: Database) -> None:
        self.db = db
        with db.tx():
            for statement in db.ddl(SCHEMA):
                db.x(statement)

    @classmethod
    def open(cls, cfg: dict) -> CapRecord:
        relay = cfg["relay"]
        return cls(Database(relay.get("db_url") or os.path.expanduser(relay["db_path"])))

    def close(self) -> None:
        self.db.close()

    # --- messages ------------------------------------------------------------------------

    def handled(self, key: tuple[str, str, str]) -> dict | None:
        row = self.db.one("SELECT * FROM cap_alerts WHERE sender=? AND identifier=? AND sent=?",
                          *key)
        return dict(row) if row else None

    def save_alert(self, key: tuple[str, str, str], *, now_ms: int, source: str, status: str,
                   msg_type: str, scope: str, action: str, why: str, detail: dict,
                   xml: bytes) -> None:
        with self.db.tx() as db:
            db.x("DELETE FROM cap_alerts WHERE sender=? AND identifier=? AND sent=?", *key)
            db.x("INSERT INTO cap_alerts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", *key, now_ms,
                 source, status, msg_type, scope, action, why,
                 json.dumps(detail, ensure_ascii=False), xml.decode("utf-8", "replace"))

    def alerts_by_identifier(self, identifier: str) -> list[dict]:
        return [dict(r) for r in self.db.q(
            "SELECT * FROM cap_alerts WHERE identifier=? ORDER BY received_ms", identifier)]

    def recent(self, limit: int = 20) -> list[dict]:
        return [dict(r) for r in self.db.q(
            "SELECT sender, identifier, sent, received_ms, status, msg_type, action, why"
            " FROM cap_alerts ORDER BY received_ms DESC LIMIT ?", limit)]

    # --- commands and acks ---------------------------------------------------------------

    def add_commands(self, key: tuple[str, str, str], commands: list, now_ms: int) -> None:
        """``commands``: :class:`ctl.cap.plan.Planned` as sent."""
        with self.db.tx() as db:
            db.many("INSERT OR IGNORE INTO cap_commands VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(c.cmd_id, c.target, *key, c.type, c.lang, c.priority, c.at_ms, c.exp_ms,
                      now_ms, json.dumps(c.args, ensure_ascii=False)) for c in commands])

    def commands_of(self, sender: str, identifier: str) -> list[dict]:
        """Every command sent for a message (any ``sent``), stops included."""
        return [dict(r) for r in self.db.q(
            "SELECT * FROM cap_commands WHERE sender=? AND identifier=? ORDER BY sent_ms",
            sender, identifier)]

    def is_cap_command(self, cmd_id: str) -> bool:
        return self.db.one("SELECT 1 FROM cap_commands WHERE cmd_id=? LIMIT 1", cmd_id) \
            is not None

    def add_acks(self, rows: list[tuple[str, str, str, int, str | None]]) -> None:
        """``(cmd_id, device, stage, ts, reason)``; a stage seen twice is kept once."""
        if rows:
            with self.db.tx() as db:
                db.many("INSERT OR IGNORE INTO cap_acks VALUES (?,?,?,?,?)", rows)

    def acks_of(self, cmd_ids: list[str]) -> list[dict]:
        if not cmd_ids:
            return []
        marks = ",".join("?" * len(cmd_ids))
        return [dict(r) for r in self.db.q(
            f"SELECT * FROM cap_acks WHERE cmd_id IN ({marks}) ORDER BY ts", *cmd_ids)]

    # --- watched sources -----------------------------------------------------------------

    def seen(self, source: str, digest: str) -> bool:
        return self.db.one("SELECT 1 FROM cap_seen WHERE source=? AND digest=?", source,
                           digest) is not None

    def mark_seen(self, source: str, digest: str, now_ms: int) -> None:
        with self.db.tx() as db:
            db.x("INSERT OR IGNORE INTO cap_seen VALUES (?,?,?)", source, digest, now_ms)
