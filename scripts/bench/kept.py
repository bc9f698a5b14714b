#!/usr/bin/env python3
"""What keeping events for ``resend`` costs on the card (docs/DEPLOY.md, issue #19).

Stores ``--events`` realistic play records with the agent's own ``Store.enqueue`` (one
transaction each, as the core does when an item ends), delivers them (PUBACK deletes the outbox
row), and compares with the same run where the kept copy is not written: bytes this process
sent to the block layer (``/proc/self/io`` write_bytes: WAL and checkpoints, what reaches the
card) and the database's size once checkpointed. Per event and per day at
``--per-day`` events a day.

    .venv/bin/python scripts/bench/kept.py [--events 2000] [--per-day 40]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common import parser, write_json

from agent.core.store import Store, encode

RECORD = {
    "v": 1, "ts": 1764541800000, "type": "play", "origin": "schedule",
    "id": "grp.krongpa:news-am:2025-12-01T05:30", "item": "news-am", "topic": "grp/krongpa",
    "slot": "2025-12-01T05:30", "due": 1764541800000, "kind": "media",
    "media": {"url": "https://media.krongpa.gialai.gov.vn/bulletins/2025-12-01-sang.mp3",
              "sha256": "9f2c" * 16, "lang": "vi"},
    "priority": "normal", "started": 1764541800012, "ended": 1764542700012, "result": "done",
    "played_ms": 900000, "requested_ms": 900000, "volume": 80,
    "output": {"level_db": -18, "ok": True}}


def run(folder: Path, n: int, keep: bool) -> dict:
    path = folder / ("kept.db" if keep else "plain.db")
    store = Store(str(path))
    if not keep:
        store._keep = lambda *a: None  # the same run without the kept copy
    before = _io()
    for i in range(n):
        with store.transaction():
            store.enqueue("ttcs/dev/x/event", {**RECORD, "ts": RECORD["ts"] + i}, qos=1,
                          kind="play", now_ms=RECORD["ts"] + i, event=True)
        for row in store.pending(limit=10):
            store.delivered(row.rowid)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    after = _io()
    return {"db_bytes": os.path.getsize(path),
            "block_write_bytes": after["write_bytes"] - before["write_bytes"],
            "write_calls_bytes": after["wchar"] - before["wchar"]}


def _io() -> dict[str, int]:
    """This process's I/O counters (``write_bytes``: what went to the block layer)."""
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def main() -> int:
    p = parser("The card cost of keeping events for resend.", "kept")
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--per-day", type=float, default=40)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ttcs-bench-kept-", dir="/var/tmp"))
    payload = len(encode({**RECORD, "seq": 1}))
    plain, kept = run(folder, args.events, False), run(folder, args.events, True)
    per_event_disk = (kept["db_bytes"] - plain["db_bytes"]) / args.events
    per_event_wal = (kept["block_write_bytes"] - plain["block_write_bytes"]) / args.events
    out = {"events": args.events, "payload_bytes": payload, "plain": plain, "kept": kept,
           "disk_bytes_per_event": round(per_event_disk),
           "extra_block_write_bytes_per_event": round(per_event_wal),
           "per_day": args.per_day,
           "disk_kb_per_day": round(per_event_disk * args.per_day / 1024, 1),
           "disk_mb_30_days": round(per_event_disk * args.per_day * 30 / 2**20, 2),
           "extra_writes_kb_per_day": round(per_event_wal * args.per_day / 1024, 1)}
    for k, v in out.items():
        print(f"{k}: {v}")
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
