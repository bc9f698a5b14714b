"""The scheduler wired into the agent (agent/schedule/service.py) and the clock trust probes.

In-process tests drive a real Core (tests/fakes.py) on a FakeClock with a recording audio
double, so days, restarts, clock jumps and a boot at 1970 run without sleeping. The real-time
tests at the end run ``python -m agent run`` against mosquitto (sim audio; libvlc writing a WAV
file) for a slot a few seconds ahead, with the broker stopped, across a restart and against a
rollback. Start-time precision is measured by scripts/bench/schedule_precision.py, not here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from datetime import datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent import protocol
from agent.core.clock import (
    ClockTrust,
    FakeClock,
    SystemClock,
    SystemSyncProbe,
    chrony_synchronised,
)
from agent.schedule import service as schedule_service
from agent.schedule.service import ScheduleService, slot_id
from agent.schedule.store import AIRED, SKIPPED, ScheduleStore
from tests.conftest import Broker, Watcher, agent_config, wait_online, wait_until
from tests.fakes import make_core

HCM = ZoneInfo("Asia/Ho_Chi_Minh")
SHA = "ab" * 32
SHA2 = "cd" * 32
DEV = "dev/dev-1"
ALL_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def hcm(h: int, mi: int = 0, s: int = 0, day: int = 26) -> int:
    return int(datetime(2025, 11, day, h, mi, s, tzinfo=HCM).timestamp() * 1000)


def media_item(id_: str = "news", times=("05:00", "17:00"), sha: str = SHA, **kw) -> dict:
    when = {} if "dates" in kw else {"days": ALL_DAYS}
    return {"id": id_, "media": {"url": f"https://media.example.vn/{id_}.mp3", "sha256": sha},
            **when, "times": list(times), **kw}


# --- doubles and helpers ------------------------------------------------------------------

class FakeAudio:
    """Records what the scheduler asks of the audio service; the test plays the arbiter."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []
        self.cancelled: list[str] = []
        self.prefetches: list[tuple[str, str]] = []
        self.then: dict[str, object] = {}
        self.cached: set[str] = set()
        self.pinned: set[str] = set()
        self.results: dict[str, object] = {}
        self.clock_jumps: list[list[str]] = []  # what was cancelled when each was announced

    def on_clock_jump(self) -> None:
        self.clock_jumps.append(list(self.cancelled))

    def submit_scheduled(self, slot_id, kind, action, *, priority="normal", volume=None,
                         duration_s=None, repeat=1, exp_ms=None, on_result=None, at_ms=None,
                         extra=None, board_text=None):
        self.submitted.append({"id": slot_id, "kind": kind, "action": action,
                               "priority": priority, "at_ms": at_ms, "exp_ms": exp_ms,
                               "extra": extra, "board_text": board_text})
        self.results[slot_id] = on_result

    def prefetch(self, url, sha256, then=None):
        self.prefetches.append((url, sha256))
        self.then[sha256] = then

    def have(self, sha256):
        return sha256 in self.cached

    def set_pinned(self, shas):
        self.pinned = set(shas)

    def cancel(self, slot_id):
        self.cancelled.append(slot_id)
        self.results[slot_id](slot_id, "stopped", None)
        return True

    def report(self, sid: str, stage: str, reason: str | None = None) -> None:
        self.results[sid](sid, stage, reason)

    def ids(self) -> list[str]:
        return [s["id"] for s in self.submitted]


class Rig:
    """A core on a FakeClock with the schedule service and a FakeAudio."""

    def __init__(self, tmp_path: Path, keys, now_ms: int, *, audio: FakeAudio | None = None,
                 trust: str = "always", **extra) -> None:
        self.clock = FakeClock(now_ms)
        self.keys = keys
        self.core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64},
                              clock=self.clock, trust=trust, extra=extra)
        self.audio = audio or FakeAudio()
        self.core.link.connect()
        self.svc: ScheduleService = schedule_service.install(self.core, self.core.cfg,
                                                             audio=self.audio)
        self.core.run_pending()

    def send(self, rev: int, items: list[dict], target: str = DEV, **env) -> bytes:
        payload = protocol.canonical(self.keys.command(target, "schedule", {"items": items},
                                                       rev=rev, **env))
        self.deliver(payload, target)
        return payload

    def deliver(self, payload: bytes, target: str = DEV) -> None:
        self.core.on_message(f"ttcs/{target}/desired/schedule", payload, True)
        self.core.run_pending()

    def advance_to(self, wall_ms: int) -> None:
        """Move time forward, firing every core timer at its (fake) monotonic time."""
        while self.clock.now_ms() < wall_ms:
            timers = [t.when for t in self.core._timers if not t.cancelled]
            step = min([(wall_ms - self.clock.now_ms()) / 1000]
                       + [max(0.001, w - self.clock.monotonic()) for w in timers])
            self.clock.advance(step)
            self.core.run_pending()

    def events(self, typ: str | None = None) -> list[dict]:
        """Events published, once each (delivery is at least once: deduplicated by seq)."""
        unique = {e["seq"]: e for e in self.core.link.json("/event")}
        return [e for _, e in sorted(unique.items()) if typ is None or e["type"] == typ]

    def close(self) -> None:
        self.svc.stop()
        self.core.store.close()


@pytest.fixture
def rig(tmp_path, keys):
    made: list[Rig] = []

    def make(now_ms: int, **kw) -> Rig:
        r = Rig(tmp_path, keys, now_ms, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        try:
            r.close()
        except Exception:
            pass


def key(item: str, day: str, at: str, topic: str = DEV) -> str:
    return f"{topic}:{item}@{day}T{at}"


# --- documents ------------------------------------------------------------------------------

def test_document_is_applied_persisted_and_shown_in_state(rig, tmp_path):
    r = rig(hcm(4, 0))
    r.send(3, [media_item()])
    [ev] = r.events("schedule")
    assert ev["topic"] == f"{DEV}/desired/schedule" and ev["rev"] == 3
    assert ev["result"] == "applied" and "reason" not in ev
    assert ScheduleStore(tmp_path / "state").load_all()[DEV][0] == 3
    state = r.core.snapshot()["schedule"]
    assert state["revisions"] == {DEV: 3}
    assert state["next"] == {"id": f"{DEV}:news", "due": hcm(5), "priority": "normal"}
    assert state["held"] is False


def test_rev_rules_unchanged_refused_rejected(rig):
    r = rig(hcm(4, 0))
    first = r.send(5, [media_item()])
    r.deliver(first)  # the broker's retained copy again, at a reconnect
    assert [e["result"] for e in r.events("schedule")] == ["applied"]
    r.send(4, [media_item("old")])
    r.send(5, [media_item("other")])  # same rev, other content: no silent replacement
    r.send(6, [media_item("bad", times=["25:00"])])
    results = [(e["rev"], e["result"], e.get("reason")) for e in r.events("schedule")]
    assert results == [(5, "applied", None), (4, "refused", "stale_rev"),
                       (5, "refused", "stale_rev"), (6, "rejected", "bad_args")]
    assert r.svc.book.revisions() == {DEV: 5}
    assert [i.id for _, i in r.svc.book.items()] == ["news"]


def test_union_of_device_and_group_documents_and_clearing(rig):
    r = rig(hcm(4, 0))
    r.send(1, [media_item("a", times=["05:00"])])
    r.send(1, [media_item("b", times=["04:30"])], target="grp/g1")
    assert r.core.snapshot()["schedule"]["next"]["id"] == "grp/g1:b"
    r.send(2, [], target="grp/g1")
    assert r.events("schedule")[-1]["reason"] == "cleared"
    assert r.svc.book.revisions() == {DEV: 1, "grp/g1": 2}
    assert r.core.snapshot()["schedule"]["next"]["id"] == f"{DEV}:a"


# --- airing on time -------------------------------------------------------------------------

def test_slot_is_handed_over_ahead_with_at_and_airs_once(rig):
    r = rig(hcm(4, 58))
    r.send(1, [media_item(volume=70, priority="priority", board_text="Bản tin sáng")])
    r.advance_to(hcm(4, 59, 30))
    assert r.audio.submitted == []
    r.advance_to(hcm(4, 59, 50))
    sid = "dev.dev-1:news:2025-11-26T05:00"
    [sub] = r.audio.submitted
    assert sub["id"] == sid and sub["at_ms"] == hcm(5) and sub["priority"] == "priority"
    assert sub["kind"] == "media" and sub["action"][0]["sha256"] == SHA
    assert sub["board_text"] == "Bản tin sáng"
    assert sub["exp_ms"] == hcm(5) + 60_000 + 3_600_000  # grace, then an hour in the queue
    assert sub["extra"] == {"item": "news", "topic": DEV, "slot": "2025-11-26T05:00",
                            "due": hcm(5)}
    assert key("news", "2025-11-26", "05:00") not in r.svc.planner.log  # not aired yet
    r.advance_to(hcm(5, 0, 1))
    assert r.svc.planner.log.outcome(key("news", "2025-11-26", "05:00")) == AIRED
    r.audio.report(sid, "started")
    r.audio.report(sid, "done")
    r.advance_to(hcm(16, 59, 59))
    assert r.audio.ids() == [sid, "dev.dev-1:news:2025-11-26T17:00"]
    assert r.core.snapshot()["schedule"]["next"]["due"] == hcm(17)


def test_items_due_together_are_handed_over_in_priority_order(rig):
    r = rig(hcm(4, 58))
    r.send(1, [media_item("n1", times=["05:00"]), media_item("p", times=["05:00"],
                                                              priority="priority")])
    r.send(1, [media_item("e", times=["05:00"], priority="emergency")], target="grp/g1")
    r.advance_to(hcm(5, 0, 1))
    assert [s["id"].split(":")[1] for s in r.audio.submitted] == ["e", "p", "n1"]


def test_handed_over_slot_ending_early_is_not_submitted_again(rig):
    r = rig(hcm(4, 59))
    r.send(1, [media_item()])
    r.advance_to(hcm(4, 59, 55))
    [sid] = r.audio.ids()
    r.audio.report(sid, "failed", "media_unavailable")  # the audio service reports the failure
    r.advance_to(hcm(5, 5))
    assert r.audio.ids() == [sid]
    assert r.svc.planner.log.outcome(key("news", "2025-11-26", "05:00")) == AIRED


def test_a_handed_over_slot_stopped_before_its_time_is_recorded_and_not_aired(rig):
    r = rig(hcm(4, 59))
    r.send(1, [media_item()])
    r.advance_to(hcm(4, 59, 55))
    [sid] = r.audio.ids()
    r.audio.report(sid, "stopped")  # an operator's stop {"id": sid}
    r.advance_to(hcm(5, 5))
    assert r.audio.ids() == [sid]
    [rec] = r.events("play")
    assert (rec["id"], rec["result"], rec["reason"]) == (sid, "skipped", "stopped")


def test_a_new_rev_withdraws_a_handed_over_slot(rig):
    r = rig(hcm(4, 59))
    r.send(1, [media_item("a", times=["05:00"]), media_item("b", times=["05:00"])])
    r.advance_to(hcm(4, 59, 55))
    assert r.audio.ids() == ["dev.dev-1:a:2025-11-26T05:00", "dev.dev-1:b:2025-11-26T05:00"]
    r.send(2, [media_item("b", times=["05:00"])])
    assert sorted(r.audio.cancelled) == r.audio.ids()[:2]
    assert r.audio.ids()[2:] == ["dev.dev-1:b:2025-11-26T05:00"]  # handed over afresh
    r.advance_to(hcm(5, 1))
    assert key("a", "2025-11-26", "05:00") not in r.svc.planner.log


# --- restarts and power cuts ----------------------------------------------------------------

def test_restart_between_two_slots_airs_each_once_with_the_stored_document(rig, tmp_path):
    r = rig(hcm(4, 59))
    payload = r.send(7, [media_item(times=["05:00", "05:05"])])
    r.advance_to(hcm(5, 0, 20))
    r.audio.report(r.audio.ids()[0], "started")
    r.close()

    r2 = rig(hcm(5, 0, 30))  # within the grace of 05:00: only the slot log keeps it from airing
    assert r2.svc.book.revisions() == {DEV: 7}  # before any broker message
    r2.deliver(payload)  # the broker's retained copy
    assert r2.events("schedule") == []
    r2.advance_to(hcm(5, 10))
    assert r2.audio.ids() == ["dev.dev-1:news:2025-11-26T05:05"]
    r2.send(6, [media_item("old")])
    assert r2.events("schedule")[-1]["reason"] == "stale_rev"


def test_power_cut_beyond_catch_up_is_reported_skipped_within_is_aired(rig):
    r = rig(hcm(4, 59))
    r.send(1, [media_item("late", times=["05:00"], catch_up_s=1800),
               media_item("strict", times=["05:00"])])
    r.advance_to(hcm(4, 59, 40))
    r.close()  # power cut before the slot was handed over

    r2 = rig(hcm(5, 20))
    r2.advance_to(hcm(5, 20, 1))
    assert r2.audio.ids() == ["dev.dev-1:late:2025-11-26T05:00"]
    [skip] = r2.events("play")
    assert skip == {**skip, "origin": "schedule", "result": "skipped", "reason": "missed",
                    "id": "dev.dev-1:strict:2025-11-26T05:00", "item": "strict",
                    "topic": DEV, "slot": "2025-11-26T05:00", "due": hcm(5),
                    "played_ms": 0, "kind": "media"}
    assert r2.svc.planner.log.outcome(key("strict", "2025-11-26", "05:00")) == SKIPPED


def test_tampered_or_foreign_stored_documents_are_not_used(rig, tmp_path):
    r = rig(hcm(4, 0))
    r.send(2, [media_item()])
    r.close()
    store = ScheduleStore(tmp_path / "state")
    rev, envelope = store.load_all()[DEV]
    store.save(DEV, rev, envelope.replace(b"05:00", b"04:00"))
    other = protocol.canonical(r.keys.command("grp/left", "schedule", {"items": []}, rev=1))
    store.save("grp/left", 1, other)  # a group this device no longer listens to

    r2 = rig(hcm(4, 1))
    assert r2.svc.book.revisions() == {}
    reasons = {e["topic"]: e["reason"] for e in r2.events("schedule")}
    assert reasons == {f"{DEV}/desired/schedule": "bad_signature",
                       "grp/left/desired/schedule": "wrong_target"}


# --- clock jumps and trust ------------------------------------------------------------------

def test_forward_jump_of_one_hour_skips_beyond_catch_up_and_airs_within(rig):
    r = rig(hcm(4, 50))
    r.send(1, [media_item("strict", times=["05:00"]),
               media_item("late", times=["05:00"], catch_up_s=3600)])
    r.advance_to(hcm(4, 59, 55))
    assert len(r.audio.submitted) == 2  # both handed over ahead
    r.clock.jump(3_600_000)
    r.advance_to(hcm(6, 0, 6))
    assert r.svc.jumps == 1
    assert r.audio.cancelled == ["dev.dev-1:strict:2025-11-26T05:00"]
    # the audio service re-arms what waits for the old 05:00 after "strict" was withdrawn
    assert r.audio.clock_jumps == [["dev.dev-1:strict:2025-11-26T05:00"]]
    assert [e["id"] for e in r.events("play")] == ["dev.dev-1:strict:2025-11-26T05:00"]
    assert r.svc.planner.log.outcome(key("late", "2025-11-26", "05:00")) == AIRED
    assert len(r.audio.submitted) == 2  # "late" stays with the audio service: it airs now


def test_backward_jump_of_one_hour_airs_nothing_twice_and_skips_nothing(rig):
    r = rig(hcm(4, 58))
    r.send(1, [media_item(times=["05:00", "05:30"])])
    r.advance_to(hcm(5, 10))
    r.clock.jump(-3_600_000)
    r.advance_to(hcm(5, 40))
    assert r.svc.jumps == 1 and r.audio.clock_jumps == [[]]
    assert r.audio.ids() == ["dev.dev-1:news:2025-11-26T05:00",
                             "dev.dev-1:news:2025-11-26T05:30"]
    assert r.events("play") == []


def test_boot_at_1970_holds_everything_then_airs_after_the_clock_is_set(rig):
    synced = {"now": False}
    r = rig(86_400_000 * 3)
    r.core.trust = ClockTrust("auto", probe=lambda: synced["now"])
    r.send(1, [media_item(times=["05:00"]), media_item("far", sha=SHA2, dates=["2026-06-01"],
                                                       times=["05:00"])])
    r.advance_to(86_400_000 * 3 + 600_000)
    assert r.audio.submitted == [] and r.svc.planner.log.checked_until_ms is None
    assert r.core.snapshot()["schedule"]["held"] is True
    assert {sha for _, sha in r.audio.prefetches} == {SHA, SHA2}  # date unknown: fetch all

    r.clock.jump(hcm(4, 59) - r.clock.now_ms())  # NTP steps the clock, then reports sync
    synced["now"] = True
    r.advance_to(hcm(5, 0, 1))
    assert r.audio.ids() == ["dev.dev-1:news:2025-11-26T05:00"]
    assert r.audio.submitted[0]["at_ms"] == hcm(5)
    assert r.events("play") == []  # nothing from 1970 or before the step is "missed"
    assert r.core.snapshot()["schedule"]["held"] is False


def test_trust_never_holds_scheduled_items(rig):
    r = rig(hcm(4, 59), trust="never")
    r.send(1, [media_item(times=["05:00"])])
    r.advance_to(hcm(5, 30))
    assert r.audio.submitted == [] and r.svc.held


# --- prefetch and media alerts --------------------------------------------------------------

def test_prefetch_pins_the_next_days_and_alerts_until_the_media_is_there(rig):
    r = rig(hcm(4, 50), alerts={"clear_after_s": 1})
    r.send(1, [media_item("soon", times=["05:30"]),
               media_item("later", sha=SHA2, dates=["2025-12-20"], times=["05:00"])])
    assert r.audio.prefetches == [("https://media.example.vn/soon.mp3", SHA)]
    assert r.audio.pinned == {SHA}
    r.advance_to(hcm(4, 50, 10))
    [raised] = r.events("alert")
    assert raised["code"] == "media_unavailable" and raised["state"] == "raised"
    assert raised["key"] == f"{DEV}:soon"
    assert raised["detail"]["due"] == hcm(5, 30)
    assert raised["detail"]["missing"] == [{"url": "https://media.example.vn/soon.mp3",
                                            "sha256": SHA}]
    r.audio.cached.add(SHA)
    r.audio.then[SHA](SHA, "/cache/" + SHA)
    r.advance_to(hcm(4, 50, 20))
    assert [e["state"] for e in r.events("alert")] == ["raised", "cleared"]
    r.advance_to(hcm(4, 50) + 601_000)  # the periodic pass asks nothing already cached
    assert len(r.audio.prefetches) == 1


# --- identifiers ------------------------------------------------------------------------------

def test_slot_ids_are_valid_command_ids():
    r_slot = type("S", (), {"key": "grp/krongpa:news@2026-11-26T05:00"})
    assert slot_id(r_slot) == "grp.krongpa:news:2026-11-26T05:00"
    long_slot = type("S", (), {"key": f"dev/{'d' * 60}:{'x' * 64}@2026-11-26T05:00"})
    sid = slot_id(long_slot)
    assert protocol.CMD_ID_RE.match(sid) and sid.endswith(":2026-11-26T05:00")


# --- clock trust probes -----------------------------------------------------------------------

def test_sync_probe_sources_in_order_and_chrony_rate_limited(tmp_path):
    flag = tmp_path / "synchronized"
    calls = []
    mono = {"t": 0.0}

    def chrony():
        calls.append(mono["t"])
        return False

    probe = SystemSyncProbe(kernel=lambda: False, timesyncd_flag=str(flag), chrony=chrony,
                            chrony_every_s=30, monotonic=lambda: mono["t"],
                            spawn=lambda fn: fn())
    assert probe() == (False, "unsynchronised")
    mono["t"] = 10
    assert probe() == (False, "unsynchronised") and calls == [0.0]  # not asked again yet
    flag.touch()
    assert probe() == (True, "timesyncd")
    assert SystemSyncProbe(kernel=lambda: True, chrony=chrony)() == (True, "kernel")
    unknown = SystemSyncProbe(kernel=lambda: None, timesyncd_flag=str(tmp_path / "no"),
                              chrony=lambda: None)
    assert unknown() == (None, "unknown")


def test_a_slow_chronyc_never_holds_up_the_caller(tmp_path):
    release = threading.Event()

    def chrony():  # chronyc answering late (the core thread must not wait for it)
        release.wait(5)
        return True

    probe = SystemSyncProbe(kernel=lambda: False, timesyncd_flag=str(tmp_path / "no"),
                            chrony=chrony)
    t0 = time.monotonic()
    assert probe() == (False, "unsynchronised")  # no answer yet
    assert probe() == (False, "unsynchronised")  # one question at a time, still no wait
    assert time.monotonic() - t0 < 0.5
    release.set()
    wait_until(lambda: probe() == (True, "chrony"), 5, 0.01, what="chrony's answer")


def test_clock_trust_latches_and_names_its_source():
    answers = iter([(False, "unsynchronised"), (True, "chrony"), (False, "unsynchronised")])
    trust = ClockTrust("auto", probe=lambda: next(answers))
    assert not trust.trusted() and trust.source == "unsynchronised"
    assert trust.trusted() and trust.source == "chrony"
    assert trust.trusted()  # latched: a lost sync later does not untrust the clock


@pytest.mark.parametrize("output, expected", [
    ("Reference ID    : C0A80001 (ntp)\nLeap status     : Normal\n", True),
    ("Reference ID    : 00000000 ()\nLeap status     : Not synchronised\n", False),
    ("garbage", None),
])
def test_chronyc_tracking_is_parsed(tmp_path, output, expected):
    fake = tmp_path / "chronyc"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    fake.chmod(0o755)
    assert chrony_synchronised(str(fake)) is expected


def test_chronyc_that_hangs_or_is_missing_means_unknown(tmp_path):
    fake = tmp_path / "chronyc"
    fake.write_text("#!/bin/sh\nexec sleep 5\n")
    fake.chmod(0o755)
    assert chrony_synchronised(str(fake), timeout_s=0.2) is None
    assert chrony_synchronised(str(tmp_path / "absent")) is None


def test_test_only_wall_clock_offset(monkeypatch):
    monkeypatch.setenv("TTCS_TEST_CLOCK_OFFSET_MS", "-3600000")
    shifted = SystemClock()
    assert shifted.offset_ms == -3_600_000
    assert abs(shifted.now_ms() + 3_600_000 - time.time() * 1000) < 60_000
    monkeypatch.setenv("TTCS_TEST_CLOCK_OFFSET_MS", "soon")
    assert SystemClock().offset_ms == 0
    monkeypatch.delenv("TTCS_TEST_CLOCK_OFFSET_MS")
    assert SystemClock().offset_ms == 0


# --- with the real audio service (sim output) -------------------------------------------------

@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng needed")
def test_real_audio_service_airs_a_slot_with_its_play_record(tmp_path, keys):
    from agent.audio import service as audio_service

    clock = FakeClock(hcm(4, 59, 58))
    core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64}, clock=clock,
                     extra={"amplifier": {"warm_up_s": 0}})
    core.link.connect()
    audio = audio_service.install(core, core.cfg)
    svc = schedule_service.install(core, core.cfg, audio=audio)
    try:
        doc = keys.command(DEV, "schedule", {"items": [
            {"id": "loa", "say": {"text": "Xin chào bà con", "lang": "vi"}, "days": ALL_DAYS,
             "times": ["05:00"], "volume": 60}]}, rev=1)
        core.on_message(f"ttcs/{DEV}/desired/schedule", protocol.canonical(doc), True)
        clock.advance(2.5)

        def record():
            core.run_pending()
            return next((e for e in core.link.json("/event") if e["type"] == "play"), None)

        rec = wait_until(record, 20, what="the play record")
        assert rec["id"] == "dev.dev-1:loa:2025-11-26T05:00" and rec["origin"] == "schedule"
        assert rec["result"] == "done" and rec["volume"] == 60
        assert rec["started"] >= hcm(5)
        assert (rec["item"], rec["topic"], rec["slot"], rec["due"]) == (
            "loa", DEV, "2025-11-26T05:00", hcm(5))
        assert svc.submitted == {}
    finally:
        core._shutdown()


# --- real time: a real agent process, mosquitto, sim audio and libvlc --------------------------

DEVICE = "krongpa-phutuc-c03"
DEV_TOPIC = f"ttcs/dev/{DEVICE}/desired/schedule"


class MediaServer:
    """Serves a folder over HTTP on a free loopback port, in a thread."""

    def __init__(self, folder: Path) -> None:
        handler = partial(_QuietHandler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def media(tmp_path):
    from agent.audio.tone import write_tone

    folder = tmp_path / "www"
    folder.mkdir()
    write_tone(str(folder / "bulletin.wav"), seconds=1.0)
    server = MediaServer(folder)
    sha = hashlib.sha256((folder / "bulletin.wav").read_bytes()).hexdigest()
    yield {"url": server.url("bulletin.wav"), "sha256": sha}
    server.close()


def minute_ahead(lead_s: float) -> tuple[int, int]:
    """(offset, slot): a wall-clock offset for the agent (TTCS_TEST_CLOCK_OFFSET_MS) that puts
    a whole minute ``slot`` (agent time) ``lead_s`` seconds of real time from now."""
    target = int(time.time() * 1000 + lead_s * 1000)
    slot = round(target / 60_000) * 60_000
    return slot - target, slot


def hhmm(ms_: int) -> tuple[str, str]:
    local = datetime.fromtimestamp(ms_ / 1000, HCM)
    return local.date().isoformat(), local.strftime("%H:%M")


def sid_at(slot: int, item: str = "bulletin") -> str:
    return f"dev.{DEVICE}:{item}:{'T'.join(hhmm(slot))}"


def schedule_doc(keys, rev: int, items: list[dict], target: str = f"dev/{DEVICE}") -> dict:
    return keys.command(target, "schedule", {"items": items}, rev=rev)


def slot_item(media: dict, *slots: int, id_: str = "bulletin") -> dict:
    return {"id": id_, "media": media, "days": ALL_DAYS,
            "times": sorted({hhmm(s)[1] for s in slots})}


def wait_event(watcher: Watcher, pred, timeout: float = 30.0, what: str = "event") -> dict:
    return wait_until(lambda: next((e for e in watcher.json(f"dev/{DEVICE}/event")
                                    if pred(e)), None), timeout, what=what)


def scheduled_plays(watcher: Watcher) -> list[dict]:
    unique = {e["seq"]: e for e in watcher.json(f"dev/{DEVICE}/event")
              if e.get("type") == "play" and e.get("origin") == "schedule"}
    return list(unique.values())


def start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset: int, **sections):
    monkeypatch.setenv("TTCS_TEST_CLOCK_OFFSET_MS", str(offset))
    cfg = agent_config(tmp_path, broker.port, keys, security={"media_hosts": ["127.0.0.1"]},
                       **sections)
    return agent_factory(cfg)


@pytest.fixture
def watcher(broker):
    w = Watcher(broker.port, ["ttcs/#"])
    yield w
    w.close()


def audio_sections(backend: str, tmp_path: Path) -> dict:
    if backend == "sim":
        return {}
    pytest.importorskip("vlc")
    out = tmp_path / "vlc-out.wav"
    return {"audio": {"backend": "vlc", "vlc_args": ["--aout=afile",
                                                     f"--audiofile-file={out}"]}}


@pytest.mark.parametrize("backend", ["sim", "vlc"])
def test_real_agent_airs_a_slot_a_few_seconds_ahead(tmp_path, broker, keys, agent_factory,
                                                    monkeypatch, watcher, media, backend):
    offset, slot = minute_ahead(8)
    watcher.publish(DEV_TOPIC, schedule_doc(keys, 1, [slot_item(media, slot)]), retain=True)
    agent = start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset,
                        **audio_sections(backend, tmp_path))
    wait_online(watcher, DEVICE)
    wait_event(watcher, lambda e: e.get("type") == "schedule", what="the document applied")
    state = wait_until(lambda: next((s for s in reversed(watcher.json(f"{DEVICE}/state"))
                                     if (s.get("schedule") or {}).get("next")), None), 10)
    assert state["schedule"]["revisions"] == {f"dev/{DEVICE}": 1}
    assert state["schedule"]["next"]["due"] == slot
    sid = sid_at(slot)
    rec = wait_event(watcher, lambda e: e.get("type") == "play" and e.get("id") == sid, 40,
                     what="the play record of the slot")
    assert rec["origin"] == "schedule" and rec["result"] == "done", rec
    assert rec["started"] >= slot - 5  # never early (agent time on both sides)
    assert (rec["item"], rec["topic"], rec["slot"], rec["due"]) == (
        "bulletin", f"dev/{DEVICE}", "T".join(hhmm(slot)), slot)
    assert media["sha256"] in json.dumps(rec["media"])
    if backend == "vlc":
        assert (tmp_path / "vlc-out.wav").stat().st_size > 20_000
    assert agent.alive()


def test_real_agent_airs_with_the_broker_stopped(tmp_path, keys, agent_factory, monkeypatch,
                                                 media):
    # A broker that keeps sessions across its restart, and a watcher with a persistent
    # session: the play record the agent sends when it is back reaches the watcher even if the
    # agent reconnects before the watcher does.
    broker = Broker(tmp_path / "pbroker", persistence=True).start()
    watcher = Watcher(broker.port, ["ttcs/#"], persistent=True)
    try:
        offset, slot = minute_ahead(10)
        watcher.publish(DEV_TOPIC, schedule_doc(keys, 1, [slot_item(media, slot)]), retain=True)
        start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset)
        wait_online(watcher, DEVICE)
        wait_event(watcher, lambda e: e.get("type") == "schedule", what="the document applied")
        cached = tmp_path / DEVICE / "cache"
        wait_until(lambda: any(media["sha256"] in p.name for p in cached.rglob("*")), 10,
                   what="the media prefetched")
        broker.stop()  # SIGTERM: mosquitto saves its sessions
        wait_until(lambda: time.time() * 1000 + offset > slot + 4000, 20, interval=0.2)
        assert not any(e.get("type") == "play" for e in watcher.json(f"dev/{DEVICE}/event"))
        broker.start()
        rec = wait_event(watcher, lambda e: e.get("type") == "play", 30,
                         what="the play record delivered after the outage")
        assert rec["origin"] == "schedule" and rec["result"] == "done"
        assert rec["historical"] is True and rec["started"] >= slot - 5
    finally:
        watcher.close()
        broker.stop()


def test_real_agent_restart_between_two_slots(tmp_path, broker, keys, agent_factory,
                                              monkeypatch, watcher, media):
    offset, first = minute_ahead(8)
    second = first + 60_000
    watcher.publish(DEV_TOPIC, schedule_doc(keys, 3, [slot_item(media, first, second)]),
                    retain=True)
    agent = start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset)
    wait_until(lambda: len(scheduled_plays(watcher)) == 1, 40, what="the first slot")
    assert agent.stop() == 0
    watcher.publish(DEV_TOPIC, b"", retain=True)  # no retained copy: the stored one must do

    # The second run's clock is 52 s past the first slot (within its grace): only the slot
    # log keeps it from airing again.
    offset2, at = minute_ahead(8)
    offset2 += second - at
    agent2 = start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset2)
    wait_until(lambda: len(scheduled_plays(watcher)) >= 2, 40, what="the second slot")
    time.sleep(1.0)  # anything aired twice would be reported by now
    plays = sorted(scheduled_plays(watcher), key=lambda e: e["started"])
    assert [p["id"] for p in plays] == [sid_at(first), sid_at(second)]
    assert all(p["result"] == "done" for p in plays)
    assert agent2.alive()


def test_real_agent_refuses_a_rollback_also_after_a_restart(tmp_path, broker, keys,
                                                            agent_factory, monkeypatch,
                                                            watcher, media):
    _, slot = minute_ahead(600)
    watcher.publish(DEV_TOPIC, schedule_doc(keys, 2, [slot_item(media, slot)]), retain=True)
    agent = start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, 0)
    wait_event(watcher, lambda e: e.get("type") == "schedule" and e.get("rev") == 2)
    old = schedule_doc(keys, 1, [slot_item(media, slot, id_="old")])
    watcher.publish(DEV_TOPIC, old, retain=True)
    refused = wait_event(watcher, lambda e: e.get("rev") == 1, what="the refusal")
    assert (refused["result"], refused["reason"]) == ("refused", "stale_rev")
    agent.stop()

    watcher.clear()
    start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, 0)  # rev 1 is retained
    refused = wait_event(watcher, lambda e: e.get("rev") == 1, what="the refusal at boot")
    assert (refused["result"], refused["reason"]) == ("refused", "stale_rev")
    state = wait_until(lambda: next((s for s in reversed(watcher.json(f"{DEVICE}/state"))
                                     if s.get("schedule")), None), 10)
    assert state["schedule"]["revisions"] == {f"dev/{DEVICE}": 2}
    assert state["schedule"]["next"]["id"] == f"dev/{DEVICE}:bulletin"
