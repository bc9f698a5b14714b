"""The airing journal (agent/audio/journal.py): an item on air when the agent dies gets its play
record, ``result: "interrupted"``, at the next start.

In process, on a FakeClock with the real audio service (sim output): the agent "dies" by
dropping its core without any stop hook (what SIGKILL or a power cut leaves is what was
committed), and a new one starts on the same state folder. The real processes (SIGKILL of
``python -m agent run``) are in tests/test_power_cut.py.
"""

from __future__ import annotations

import pytest

from agent.core import store as store_module
from agent.core.clock import FakeClock
from tests.test_audio_service import InProc

FIELDS = {"item": "news", "topic": "grp/krongpa", "slot": "2025-11-26T05:00",
          "due": 1_764_108_000_000}


def plays(rig: InProc) -> list[dict]:
    return [e for e in rig.core.link.json("/event") if e.get("type") == "play"]


def die(rig: InProc) -> None:
    """What SIGKILL leaves: the committed rows; no stop hook, no shutdown record."""
    rig.core.store.close()


def restart(tmp_path, clock: FakeClock, **extra) -> InProc:
    return InProc(tmp_path, clock=clock, **extra)


@pytest.fixture
def journal_rig(tmp_path):
    made: list[InProc] = []

    def make(clock: FakeClock | None = None, **extra) -> InProc:
        rig = InProc(tmp_path, clock=clock, audio={"journal_interval_s": 10}, **extra)
        made.append(rig)
        return rig

    yield make
    for rig in made[-1:]:  # the earlier ones "died"
        rig.close()


def test_a_slot_on_air_when_the_agent_dies_is_recorded_interrupted(journal_rig):
    rig = journal_rig()
    rig.prepare(rig.say("slot-1", "Bản tin sáng", volume=70, extra=FIELDS))
    started = rig.clock.now_ms()
    rig.advance(25)  # positions written at 10 s and 20 s
    die(rig)
    rig.clock.advance(3600)  # the power comes back an hour later

    again = journal_rig(clock=rig.clock)
    [rec] = plays(again)
    assert rec["result"] == "interrupted" and rec["id"] == "slot-1"
    assert rec["origin"] == "schedule" and {k: rec[k] for k in FIELDS} == FIELDS
    assert rec["played_ms"] == 20_000, "up to the last position written"
    assert (rec["started"], rec["ended"]) == (started, started + 20_000)
    assert rec["kind"] == "tts" and rec["media"] == [{"text": "Bản tin sáng", "lang": "vi"}]
    assert (rec["priority"], rec["volume"], rec["repeat"], rec["preemptions"]) == (
        "normal", 70, 1, 0)
    assert "requested_ms" in rec
    assert rec["segments"] == [{"started": started, "ended": started + 20_000,
                                "played_ms": 20_000, "result": "interrupted"}]
    assert again.core.store.airing_rows() == [], "recorded once: the rows are gone"


def test_a_preempted_item_and_the_one_that_cut_in_are_both_recorded(journal_rig):
    rig = journal_rig()
    rig.prepare(rig.say("news", "Tin tức"))
    t0 = rig.clock.now_ms()
    rig.advance(5)
    rig.prepare(rig.say("flood", "Lũ quét", priority="emergency"))
    rig.advance(12)
    die(rig)

    again = journal_rig(clock=rig.clock)
    recs = {r["id"]: r for r in plays(again)}
    assert set(recs) == {"news", "flood"}
    news, flood = recs["news"], recs["flood"]
    assert news["result"] == flood["result"] == "interrupted"
    assert news["played_ms"] == 5000 and news["preemptions"] == 1
    assert news["segments"] == [{"started": t0, "ended": t0 + 5000, "played_ms": 5000,
                                 "result": "preempted"}]
    assert news["ended"] == t0 + 5000, "the last moment known: when it was preempted"
    # positions every 10 s of the agent's clock: the last one, at 10 s, had it 5 s on air
    assert flood["priority"] == "emergency" and flood["played_ms"] == 5000


def test_items_that_end_leave_no_row_and_a_clean_stop_records_stopped(journal_rig):
    rig = journal_rig()
    rig.prepare(rig.say("a", "một"))
    rig.advance(11)
    assert [r[0] for r in rig.core.store.airing_rows()] == ["a"]
    rig.finish()
    assert rig.core.store.airing_rows() == []
    rig.prepare(rig.say("b", "hai"))
    rig.advance(3)
    rig.close()  # SIGTERM: what airs is stopped and recorded as such
    again = journal_rig(clock=rig.clock)  # (it may send b's again: at least once)
    assert {(r["id"], r["result"]) for r in plays(rig) + plays(again)} == {
        ("a", "done"), ("b", "stopped")}


def test_positions_are_written_without_a_flush_of_their_own(journal_rig, monkeypatch):
    rig = journal_rig()
    rig.prepare(rig.say("a", "một"))  # the start is flushed with its batch
    fsyncs = []
    real = store_module.os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (fsyncs.append(fd), real(fd)))
    rig.advance(60)
    assert fsyncs == [], "six positions, no fsync"
    [(_, _, played, _)] = rig.core.store.airing_rows()
    assert played == 60_000
    rig.finish()  # the play record is flushed, and the row's deletion with it
    assert fsyncs and rig.core.store.airing_rows() == []
