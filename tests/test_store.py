"""The SQLite store: counters, replay memory, bounded outbox."""

from __future__ import annotations

import json

from agent.core.store import Store


def test_session_and_seq_survive_reopen(tmp_path):
    db = tmp_path / "a.db"
    s = Store(str(db))
    assert s.next_session() == 1
    e = s.enqueue("t", {"type": "x"}, qos=1, kind="play", now_ms=1, event=True)
    assert e["seq"] == 1
    s.close()
    s = Store(str(db))
    assert s.next_session() == 2
    assert s.enqueue("t", {"type": "x"}, qos=1, kind="play", now_ms=2, event=True)["seq"] == 2
    assert [json.loads(r.payload)["seq"] for r in s.pending()] == [1, 2]
    assert s.integrity_ok()


def test_outbox_drops_health_then_acks_never_events(tmp_path):
    s = Store(str(tmp_path / "a.db"), max_rows=100)
    for i in range(60):
        s.enqueue("h", {"i": i}, qos=0, kind="health", now_ms=i)
    for i in range(30):
        s.enqueue("a", {"i": i}, qos=1, kind="ack", now_ms=i)
    for i in range(80):
        s.enqueue("e", {"type": "play"}, qos=1, kind="play", now_ms=i, event=True)
    rows = s.pending(limit=1000)
    kinds = [r.kind for r in rows]
    assert kinds.count("play") == 80  # play records are never dropped
    assert kinds.count("health") == 0 and kinds.count("ack") == 20
    assert len(rows) == 100 and s.dropped == 70
    # order of what remains is the order of creation
    assert [r.rowid for r in rows] == sorted(r.rowid for r in rows)


def test_replay_memory_is_bounded_oldest_first(tmp_path):
    s = Store(str(tmp_path / "a.db"), seen_max=100)
    for i in range(150):
        s.seen_add(f"id-{i}", "k", i, now_ms=i)
    assert s.seen_get("id-0") is None
    assert s.seen_get("id-149") == 149
    assert s.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 100
