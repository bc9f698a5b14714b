"""Schedule persistence: documents per topic, the slot log, atomic replacement."""

from __future__ import annotations

import json
import os

import pytest

import agent.schedule.store
import drivers.fsutil
from agent.core.clock import FakeClock
from agent.schedule.model import DAY_MS, ScheduleBook, SchedulePlanner
from agent.schedule.store import (
    AIRED,
    SKIPPED,
    ScheduleStore,
    SlotLog,
    filename_topic,
    topic_filename,
)

SHA = "ab" * 32
NOW = 1_764_540_000_000  # 2025-12-01 05:00 +07:00


def envelope(topic: str, rev: int, items: list) -> bytes:
    doc = {"v": 1, "id": f"s-{rev}", "type": "schedule", "target": topic, "ts": NOW,
           "rev": rev, "args": {"items": items},
           "sig": {"kid": "district-ctl-1", "alg": "Ed25519", "val": "AAAA"}}
    return json.dumps(doc, ensure_ascii=False).encode()


def news(id_: str = "news") -> dict:
    return {"id": id_, "media": {"url": "https://m.vn/a.mp3", "sha256": SHA},
            "days": ["mon"], "times": ["05:00"]}


# --- documents -------------------------------------------------------------------------------

def test_topic_file_names_are_safe_and_reversible():
    for topic in ["dev/krongpa-phutuc-c03", "grp/all", "grp/..", "../../etc", "a%2Fb", "x y"]:
        name = topic_filename(topic)
        assert "/" not in name and name not in (".", "..") and name.startswith("doc-")
        assert filename_topic(name) == topic
    assert topic_filename("grp/krongpa") == "doc-grp%2Fkrongpa.json"
    assert filename_topic("slots.json") is None


def test_documents_round_trip_byte_for_byte(tmp_path):
    store = ScheduleStore(tmp_path)
    assert store.load_all() == {}
    dev = envelope("dev/c03", 3, [news()])
    grp = envelope("grp/krongpa", 12, [])
    store.save("dev/c03", 3, dev)
    store.save("grp/krongpa", 12, grp)
    store.save("dev/c03", 4, dev + b" ")  # a newer rev replaces the topic's file
    again = ScheduleStore(tmp_path).load_all()
    assert again == {"dev/c03": (4, dev + b" "), "grp/krongpa": (12, grp)}
    assert sorted(p.name for p in (tmp_path / "schedule").iterdir()) == [
        "doc-dev%2Fc03.json", "doc-grp%2Fkrongpa.json"]
    store.delete("grp/krongpa")
    store.delete("grp/never")
    assert list(ScheduleStore(tmp_path).load_all()) == ["dev/c03"]


def test_reload_at_boot_reapplies_and_keeps_rollback_protection(tmp_path):
    store = ScheduleStore(tmp_path)
    items = [{"id": "news", "say": "Bản tin sáng", "days": ["mon"], "times": ["05:00"]}]
    store.save("grp/krongpa", 9, envelope("grp/krongpa", 9, items))
    store.save("dev/c03", 2, envelope("dev/c03", 2, []))  # a cleared topic keeps its rev
    book = ScheduleBook()
    for topic, (rev, raw) in ScheduleStore(tmp_path).load_all().items():
        doc = json.loads(raw)  # the caller re-verifies the signature here
        assert book.apply(topic, rev, doc["args"])[0]
    assert book.revisions() == {"dev/c03": 2, "grp/krongpa": 9}
    assert book.apply("dev/c03", 1, {"items": items}) == (False, "stale_rev")
    (slot,) = book.slots_between(NOW - 1, NOW + 1)
    assert slot.source == "grp/krongpa:news"


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    store = ScheduleStore(tmp_path)
    old = envelope("dev/c03", 1, [news()])
    store.save("dev/c03", 1, old)

    def power_cut(src, dst):
        raise OSError("power cut before rename")

    monkeypatch.setattr(drivers.fsutil.os, "replace", power_cut)
    with pytest.raises(OSError):
        store.save("dev/c03", 2, envelope("dev/c03", 2, []))
    monkeypatch.undo()
    assert ScheduleStore(tmp_path).load_all() == {"dev/c03": (1, old)}
    assert [p.name for p in (tmp_path / "schedule").iterdir()] == ["doc-dev%2Fc03.json"]


def test_leftover_temp_and_corrupt_files_are_ignored(tmp_path):
    store = ScheduleStore(tmp_path)
    good = envelope("grp/all", 5, [])
    store.save("grp/all", 5, good)
    folder = tmp_path / "schedule"
    (folder / ".doc-dev%2Fc03.json.abc.tmp").write_bytes(b'{"v": 1, "top')  # crash mid-write
    (folder / "doc-dev%2Fc03.json").write_bytes(b"\x00\x00garbage")
    (folder / "doc-grp%2Fx.json").write_text(json.dumps(
        {"v": 1, "topic": "grp/other", "rev": 1, "envelope_b64": ""}))  # name/topic mismatch
    (folder / "doc-grp%2Fy.json").write_text(json.dumps(
        {"v": 1, "topic": "grp/y", "rev": "1", "envelope_b64": ""}))
    (folder / "doc-grp%2Fz.json").write_text(json.dumps(
        {"v": 1, "topic": "grp/z", "rev": 1, "envelope_b64": "not base64!"}))
    assert ScheduleStore(tmp_path).load_all() == {"grp/all": (5, good)}


# --- slot log --------------------------------------------------------------------------------

def test_slot_log_round_trip(tmp_path):
    path = tmp_path / "schedule" / "slots.json"
    log = SlotLog(path)
    log.mark("dev/c03:a@2025-12-01T05:00", NOW, AIRED)
    log.mark("grp/all:b@2025-12-01T05:00", NOW, SKIPPED)
    log.checked_until_ms = NOW + 5
    log.save()
    again = SlotLog.in_state_dir(tmp_path)
    assert again.path == path
    assert again.outcome("dev/c03:a@2025-12-01T05:00") == AIRED
    assert again.outcome("grp/all:b@2025-12-01T05:00") == SKIPPED
    assert "grp/all:c@2025-12-01T05:00" not in again and again.outcome("x") is None
    assert again.checked_until_ms == NOW + 5
    with pytest.raises(ValueError):
        again.mark("k", NOW, "played")


def test_slot_log_is_bounded_to_fourteen_days_and_max_entries(tmp_path):
    log = SlotLog(tmp_path / "slots.json", max_entries=20)
    for day in range(30):
        log.mark(f"dev/c03:a@{day}", NOW + day * DAY_MS, AIRED)
    log.prune(NOW + 29 * DAY_MS)
    assert sorted(e.due_ms for e in log.entries.values())[0] == NOW + 15 * DAY_MS
    assert len(log) == 15
    for n in range(30):
        log.mark(f"dev/c03:b@{n}", NOW + 29 * DAY_MS + n, AIRED)
    log.prune(NOW + 29 * DAY_MS)
    assert len(log) == 20 and "dev/c03:b@29" in log and "dev/c03:a@28" not in log


def test_slot_log_writes_only_when_something_changed(tmp_path, monkeypatch):
    writes = []
    real = agent.schedule.store.atomic_write
    monkeypatch.setattr(agent.schedule.store, "atomic_write",
                        lambda p, d: (writes.append(p), real(p, d)))
    log = SlotLog(tmp_path / "slots.json")
    log.save()
    assert writes == []
    log.mark("k", NOW, AIRED)
    log.save()
    log.save()
    assert len(writes) == 1


def test_corrupt_or_odd_slot_log_starts_empty(tmp_path):
    path = tmp_path / "slots.json"
    path.write_bytes(b"{not json")
    assert len(SlotLog(path)) == 0
    path.write_text(json.dumps({"v": 1, "checked_until_ms": "x",
                                "slots": {"ok": [NOW, "a"], "bad": [NOW, "z"], "worse": 3}}))
    log = SlotLog(path)
    assert list(log.entries) == ["ok"] and log.checked_until_ms is None
    path.write_text("[]")
    assert len(SlotLog(path)) == 0


def test_planner_log_is_saved_before_slots_are_returned(tmp_path):
    """A crash right after due() returns must not air the slot again after the restart."""
    book = ScheduleBook()
    book.apply("dev/c03", 1, {"items": [
        {"id": "news", "say": "Bản tin", "days": ["mon"], "times": ["05:00"]}]})
    clock = FakeClock(NOW)
    path = tmp_path / "slots.json"
    due = SchedulePlanner(book, clock, log=SlotLog(path)).due(NOW, True).due
    assert [s.key for s in due] == ["dev/c03:news@2025-12-01T05:00"]
    assert os.path.exists(path)
    after_crash = SchedulePlanner(book, clock, log=SlotLog(path), catch_up_default=3600)
    assert after_crash.due(NOW + 1000, True).due == []
