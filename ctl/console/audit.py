"""The audit trail: every action a user takes (logins, refusals, bulletins, pushes, alert
acknowledgements), each command sent with its id, and the acks the devices return, so that
"who sent what to whom, when, and how it ended" is one query."""

from __future__ import annotations

import json
import time
from typing import Any

from agent import protocol
from ctl.db import Database


def _now_ms() -> int:
    return int(time.time() * 1000)


class Audit:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, user: str | None, action: str, outcome: str, *, target: str | None = None,
               cmd_id: str | None = None, detail: dict | None = None,
               addr: str | None = None) -> int:
        """One line of the trail. ``outcome``: ``ok``, ``refused`` (and why in ``detail``),
        ``failed``."""
        with self.db.tx():
            return self.db.insert_id(
                "INSERT INTO console_audit(ts, username, action, target, cmd_id, outcome, detail,"
                " addr) VALUES(?, ?, ?, ?, ?, ?, ?, ?)", _now_ms(), user, action, target, cmd_id,
                outcome, json.dumps(detail or {}, ensure_ascii=False), addr)

    def command(self, env: dict, batch: str, user: str) -> None:
        """A command about to be published (before it is: an ack can never come first)."""
        with self.db.tx():
            self.db.x("INSERT INTO console_commands(id, batch, ts, username, target, type, args)"
                      " VALUES(?, ?, ?, ?, ?, ?, ?)", env["id"], batch, env["ts"], user,
                      env["target"], env["type"], json.dumps(env["args"], ensure_ascii=False))

    def unsent(self, cmd_id: str, why: str) -> None:
        """The broker did not take the command: that is its final word."""
        with self.db.tx():
            self.db.x("UPDATE console_commands SET final=? WHERE id=?",
                      f"not sent: {why}"[:200], cmd_id)

    def known_commands(self, since_ms: int) -> set[str]:
        with self.db.lock:
            return {r["id"] for r in self.db.q("SELECT id FROM console_commands WHERE ts>?",
                                               since_ms)}

    def ack(self, cmd_id: str, device: str, ack: dict, now_ms: int) -> tuple[int, str | None]:
        """Store a device's ack of one of our commands: (its row id, the command's final
        summary when it changed: ``done``, or e.g. ``done 2, failed 1``)."""
        stage = ack["stage"]
        reason = ack.get("reason") if isinstance(ack.get("reason"), str) else None
        ts = ack.get("ts") if isinstance(ack.get("ts"), int) else None
        with self.db.tx():
            row = self.db.insert_id(
                "INSERT INTO console_acks(cmd_id, device, stage, reason, ts, received_ms)"
                " VALUES(?, ?, ?, ?, ?, ?)", cmd_id, device, stage,
                reason[:40] if reason else None, ts, now_ms)
            if stage not in protocol.FINAL_STAGES:
                return row, None
            finals: dict[str, str] = {}
            for r in self.db.q("SELECT device, stage FROM console_acks WHERE cmd_id=? ORDER BY"
                               " id", cmd_id):
                if r["stage"] in protocol.FINAL_STAGES:
                    finals.setdefault(r["device"], r["stage"])
            summary = final_summary(finals)
            self.db.x("UPDATE console_commands SET final=? WHERE id=?", summary, cmd_id)
        return row, summary

    # --- reading -------------------------------------------------------------------------

    def trail(self, limit: int = 200, user: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT a.*, c.final FROM console_audit a LEFT JOIN console_commands c"
               " ON c.id = a.cmd_id")
        args: tuple = ()
        if user is not None:
            sql += " WHERE a.username=?"
            args = (user,)
        with self.db.lock:
            return [dict(r) for r in self.db.q(sql + " ORDER BY a.id DESC LIMIT ?", *args,
                                               limit)]

    def batch(self, batch: str) -> list[dict[str, Any]]:
        with self.db.lock:
            cmds = [dict(r) for r in self.db.q("SELECT * FROM console_commands WHERE batch=?"
                                               " ORDER BY ts, id", batch)]
            for c in cmds:
                c["acks"] = [dict(r) for r in self.db.q(
                    "SELECT id, device, stage, reason, ts, received_ms FROM console_acks"
                    " WHERE cmd_id=? ORDER BY id", c["id"])]
        return cmds

    def device_acks(self, device: str, limit: int = 30) -> list[dict[str, Any]]:
        with self.db.lock:
            return [dict(r) for r in self.db.q(
                "SELECT a.cmd_id, a.stage, a.reason, a.ts, a.received_ms, c.type, c.username"
                " FROM console_acks a LEFT JOIN console_commands c ON c.id = a.cmd_id"
                " WHERE a.device=? ORDER BY a.id DESC LIMIT ?", device, limit)]


def final_summary(finals: dict[str, str]) -> str:
    """``done`` when every device that finished did so with the same stage, else counts."""
    counts: dict[str, int] = {}
    for stage in finals.values():
        counts[stage] = counts.get(stage, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
