"""Arbiter rules (SPEC §7) on a fake clock: no threads, no sleeps."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.audio.amplifier import Amplifier
from agent.audio.arbiter import Arbiter, Item, Variant, order_variants
from agent.core.clock import FakeClock
from drivers import DriverError
from drivers.audio.base import AudioOutput
from drivers.gpio import SimGPIO

RELAY = 17


class FakeOutput(AudioOutput):
    """Records every call; position follows the fake clock while a source plays."""

    name = "fake"

    def __init__(self, clock: FakeClock) -> None:
        super().__init__({})
        self.clock = clock
        self.calls: list[tuple] = []
        self.source: str | None = None
        self.fail_next: str | None = None
        self._t0 = 0.0
        self._start = 0

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        if self.fail_next:
            reason, self.fail_next = self.fail_next, None
            raise DriverError(reason)
        self.calls.append(("play", source, start_ms, volume, self.clock.now_ms()))
        self.source, self._t0, self._start = source, self.clock.monotonic(), start_ms

    def stop(self) -> int:
        pos = self.position_ms()
        self.calls.append(("stop", pos))
        self.source = None
        return pos

    def position_ms(self) -> int:
        if self.source is None:
            return 0
        return self._start + round((self.clock.monotonic() - self._t0) * 1000)

    def set_volume(self, level: int) -> None:
        self.calls.append(("volume", level))

    def is_playing(self) -> bool:
        return self.source is not None

    def plays(self) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == "play"]


class Rig:
    def __init__(self, *, warm_up_s: float = 0.0, idle_hold_s: float = 0.0,
                 languages: list[str] | None = None, with_amp: bool = True,
                 on_change: Callable[[], None] | None = None) -> None:
        self.clock = FakeClock()
        self.out = FakeOutput(self.clock)
        self.gpio = SimGPIO()
        self.amp = Amplifier(self.gpio, self.clock, pin=RELAY, warm_up_s=warm_up_s,
                             idle_hold_s=idle_hold_s) if with_amp else None
        self.acks: list[tuple] = []
        self.records: list[dict] = []
        self.changes = 0
        self.arb = Arbiter(self.out, self.clock, languages=languages or ["vi"], amp=self.amp,
                           on_ack=lambda i, s, r=None, d=None: self.acks.append((i, s, r)),
                           on_play=self.records.append, resume_rewind_ms=500,
                           on_change=on_change or self.changed)

    def changed(self) -> None:
        self.changes += 1

    def advance(self, seconds: float) -> None:
        """Move time, firing every deadline on the way as the core's timer would."""
        target = self.clock.monotonic() + seconds
        for _ in range(1000):  # a deadline that tick() does not clear would spin the core
            due = self.arb.next_deadline()
            if due is None or due > target:
                break
            self.clock.advance(max(0.0, due - self.clock.monotonic()))
            self.arb.tick()
        else:
            raise AssertionError("next_deadline() stays due after tick()")
        self.clock.advance(target - self.clock.monotonic())
        self.arb.tick()

    def end(self) -> None:
        """The backend reports the current source finished."""
        source = self.out.source
        self.out.source = None
        self.arb.on_output_event("ended", {"source": source})

    def stages(self, item_id: str) -> list[str]:
        return [s for i, s, _ in self.acks if i == item_id]

    def relay(self) -> bool:
        return self.gpio.levels[RELAY]


def file_item(item_id: str, priority: str = "normal", **kw) -> Item:
    variants = kw.pop("variants", None) or [Variant(f"/m/{item_id}.wav", "vi", {"sha256": item_id})]
    return Item(item_id, "file", variants, priority=priority, **kw)


def test_plays_to_done_with_play_record() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a", variants=[Variant("/m/a.wav", "vi", {"url": "u"}, 3000)]))
    assert rig.out.plays() == [("/m/a.wav", 0, 80, rig.clock.now_ms())]
    rig.advance(3)
    rig.end()
    assert rig.stages("a") == ["queued", "started", "done"]
    [rec] = rig.records
    assert rec["result"] == "done" and rec["played_ms"] == 3000 and rec["requested_ms"] == 3000
    assert rec["ended"] - rec["started"] == 3000 and rec["media"] == [{"url": "u"}]


def test_preempted_file_resumes_where_it_stopped() -> None:
    rig = Rig()
    rig.arb.submit(file_item("news"))
    rig.advance(10)
    rig.arb.submit(file_item("storm", "emergency"))
    assert ("stop", 10_000) in rig.out.calls
    assert rig.out.plays()[-1][:2] == ("/m/storm.wav", 0)
    assert rig.stages("news") == ["queued", "started", "preempted"]
    rig.advance(4)
    rig.end()
    assert rig.stages("storm") == ["queued", "started", "done"]
    assert rig.out.plays()[-1][:2] == ("/m/news.wav", 9_500)  # rewound 500 ms
    assert rig.stages("news")[-1] == "resumed"
    rig.advance(5)
    rig.end()
    assert rig.stages("news")[-1] == "done"
    results = [(r["id"], r["result"], r["played_ms"], r["segment"]) for r in rig.records]
    assert results == [("news", "preempted", 10_000, 0), ("storm", "done", 4_000, 0),
                       ("news", "done", 5_000, 1)]


def test_preempted_stream_rejoins_and_keeps_its_duration() -> None:
    rig = Rig()
    rig.arb.submit(Item("live", "stream", [Variant("http://s/live")], duration_s=60))
    rig.advance(20)
    rig.arb.submit(file_item("alert", "emergency"))
    rig.advance(5)
    rig.end()
    assert rig.out.plays()[-1][:2] == ("http://s/live", 0)
    rig.advance(39.9)
    assert rig.stages("live")[-1] == "resumed"
    rig.advance(0.1)
    assert rig.stages("live")[-1] == "done"
    assert sum(r["played_ms"] for r in rig.records if r["id"] == "live") == 60_000


def test_fifo_within_a_priority_and_priority_ahead_of_normal() -> None:
    rig = Rig()
    for item_id, prio in [("n1", "normal"), ("n2", "normal"), ("p1", "priority"),
                          ("n3", "normal"), ("p2", "priority")]:
        rig.arb.submit(file_item(item_id, prio))
    order = [rig.out.plays()[-1][0]]
    for _ in range(5):
        rig.advance(1)
        rig.end()
        if rig.out.source:
            order.append(rig.out.source)
    # n1 airs first and is preempted by p1; p2 waits for p1 (same priority); n1 resumes first.
    assert order == ["/m/p1.wav", "/m/p2.wav", "/m/n1.wav", "/m/n2.wav", "/m/n3.wav"]
    assert rig.stages("n1")[:3] == ["queued", "started", "preempted"]
    assert "preempted" not in rig.stages("p1")


def test_equal_priority_does_not_preempt() -> None:
    rig = Rig()
    rig.arb.submit(file_item("e1", "emergency"))
    rig.arb.submit(file_item("e2", "emergency"))
    assert [p[0] for p in rig.out.plays()] == ["/m/e1.wav"]
    assert rig.stages("e2") == ["queued"]


def test_variants_air_in_device_language_order_times_repeat() -> None:
    rig = Rig(languages=["vi", "jra"])
    variants = [Variant("/m/en.wav", "en"), Variant("/m/jra.wav", "jra"),
                Variant("/m/vi.wav", "vi")]
    rig.arb.submit(Item("b", "file", variants, repeat=2))
    for _ in range(4):
        rig.advance(1)
        rig.end()
    assert [p[0] for p in rig.out.plays()] == ["/m/vi.wav", "/m/jra.wav"] * 2
    assert rig.stages("b") == ["queued", "started", "done"]
    assert len(rig.records) == 1 and rig.records[0]["played_ms"] == 4000


def test_order_variants_falls_back_to_all_when_none_matches() -> None:
    en, fr, untagged = Variant("en", "en"), Variant("fr", "fr"), Variant("x")
    assert order_variants([en, fr], ["vi"]) == [en, fr]
    assert order_variants([untagged, en], ["en"]) == [en, untagged]


def test_preempt_mid_variant_resumes_that_variant() -> None:
    rig = Rig(languages=["vi", "en"])
    rig.arb.submit(Item("b", "file", [Variant("/m/vi.wav", "vi"), Variant("/m/en.wav", "en")]))
    rig.advance(1)
    rig.end()  # vi done, en starts
    rig.advance(2)
    rig.arb.submit(file_item("e", "emergency"))
    rig.end()
    assert rig.out.plays()[-1][:2] == ("/m/en.wav", 1500)


def test_stop_current_then_next_airs() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("b"))
    assert rig.arb.stop_current(by="s1") == "a"
    assert rig.stages("a")[-1] == "stopped" and rig.records[0]["result"] == "stopped"
    assert rig.out.source == "/m/b.wav"


def test_stop_by_id_removes_a_waiting_item() -> None:
    rig = Rig()
    for i in ("a", "b", "c"):
        rig.arb.submit(file_item(i))
    assert rig.arb.stop_id("b") and not rig.arb.stop_id("nope")
    rig.end()
    assert rig.out.source == "/m/c.wav"
    assert rig.stages("b") == ["queued", "stopped"]
    assert [r["id"] for r in rig.records] == ["a"]  # b never aired: no play record


def test_stop_all_clears_queue_and_timed() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("b", "priority"))
    rig.arb.submit(file_item("t", at_ms=rig.clock.now_ms() + 60_000))
    assert sorted(rig.arb.stop_all()) == ["a", "b", "t"]
    assert rig.out.source is None and rig.arb.snapshot()["queue"] == []
    rig.advance(120)
    assert rig.stages("t") == ["queued", "stopped"]


def test_at_starts_exactly_then_after_warm_up() -> None:
    rig = Rig(warm_up_s=2, idle_hold_s=10)
    at = rig.clock.now_ms() + 30_000
    rig.arb.submit(file_item("sync", at_ms=at))
    assert rig.arb.next_deadline() == pytest.approx(rig.clock.monotonic() + 28)
    rig.advance(28)
    assert rig.relay() and rig.out.plays() == []  # warming up
    rig.advance(2)
    [(source, _start, _vol, when)] = rig.out.plays()
    assert source == "/m/sync.wav" and when == at


def test_reserved_seq_keeps_arrival_order_for_late_submissions() -> None:
    rig = Rig()
    rig.arb.submit(file_item("airing"))
    at = rig.clock.now_ms() + 5000
    seqs = {name: rig.arb.reserve_seq() for name in ("a", "b")}  # arrived a, then b
    rig.arb.submit(file_item("b", seq=seqs["b"]))  # b was ready first
    rig.arb.submit(file_item("a", seq=seqs["a"]))
    rig.arb.submit(file_item("t2", at_ms=at, seq=rig.arb.reserve_seq() + 10))
    rig.arb.submit(file_item("t1", at_ms=at, seq=rig.arb.reserve_seq()))
    assert [q["id"] for q in rig.arb.snapshot()["queue"]] == ["a", "b"]
    rig.end()
    rig.end()
    rig.advance(5)  # t1 and t2 come due together, while b airs
    rig.end()
    rig.end()
    assert [p[0] for p in rig.out.plays()] == ["/m/airing.wav", "/m/a.wav", "/m/b.wav",
                                              "/m/t1.wav", "/m/t2.wav"]


def test_clock_step_past_an_at_starts_it_and_the_deadline_follows_the_wall_clock() -> None:
    rig = Rig(warm_up_s=2, idle_hold_s=0)
    at = rig.clock.now_ms() + 60_000
    rig.arb.submit(file_item("sync", at_ms=at))
    rig.clock.jump(-30_000)
    assert rig.arb.next_deadline() == pytest.approx(rig.clock.monotonic() + 88)
    rig.clock.jump(90_000)
    rig.arb.on_clock_jump()
    assert rig.out.plays() == [] and rig.relay()  # due: the amplifier warms up first
    rig.advance(2)
    assert [p[0] for p in rig.out.plays()] == ["/m/sync.wav"]


def test_at_in_the_past_starts_now() -> None:
    rig = Rig()
    rig.arb.submit(file_item("late", at_ms=rig.clock.now_ms() - 1000))
    assert rig.out.source == "/m/late.wav"


def test_preempted_item_past_exp_does_not_resume() -> None:
    rig = Rig()
    rig.arb.submit(file_item("n", exp_ms=rig.clock.now_ms() + 20_000))
    rig.advance(5)
    rig.arb.submit(file_item("e", "emergency"))
    rig.advance(30)
    rig.end()
    assert rig.stages("n") == ["queued", "started", "preempted", "expired"]
    assert [p[0] for p in rig.out.plays()] == ["/m/n.wav", "/m/e.wav"]


def test_waiting_item_expires_on_time_without_other_events() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("b", exp_ms=rig.clock.now_ms() + 10_000))
    rig.advance(10)
    assert rig.stages("b") == ["queued", "expired"]


def test_already_expired_item_is_not_queued() -> None:
    rig = Rig()
    rig.arb.submit(file_item("old", exp_ms=rig.clock.now_ms() - 1))
    assert rig.stages("old") == ["expired"] and rig.out.plays() == []


def test_amplifier_warm_up_and_idle_hold() -> None:
    rig = Rig(warm_up_s=3, idle_hold_s=20)
    assert rig.relay() is False
    rig.arb.submit(file_item("a"))
    assert rig.relay() and rig.out.plays() == [] and rig.stages("a") == ["queued"]
    rig.advance(2.9)
    assert rig.out.plays() == []
    rig.advance(0.1)
    assert rig.out.source == "/m/a.wav"
    rig.advance(5)
    rig.end()
    rig.advance(19)
    assert rig.relay()  # holding
    rig.arb.submit(file_item("b"))
    assert rig.out.source == "/m/b.wav"  # no second warm-up during the hold
    rig.end()
    rig.advance(19.9)
    assert rig.relay()
    rig.advance(0.1)
    assert rig.relay() is False and rig.arb.next_deadline() is None
    assert rig.gpio.states(RELAY) == [False, True, False]


def test_stop_during_warm_up_leaves_no_play_record() -> None:
    rig = Rig(warm_up_s=3)
    rig.arb.submit(file_item("a"))
    rig.arb.stop_current()
    rig.advance(5)
    assert rig.out.plays() == [] and rig.records == [] and rig.stages("a") == ["queued", "stopped"]
    assert rig.relay() is False


def test_driver_error_fails_item_and_next_airs() -> None:
    rig = Rig()
    rig.out.fail_next = "output device missing"
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("b"))
    assert ("a", "failed", "audio_fault") in rig.acks
    assert rig.out.source == "/m/b.wav"
    assert rig.records[0]["result"] == "failed" and rig.records[0]["played_ms"] == 0


def test_error_event_fails_item() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.advance(1)
    rig.arb.on_output_event("error", {"source": "/m/a.wav", "error": "decoder"})
    assert rig.acks[-1] == ("a", "failed", "audio_fault")
    assert rig.records[-1]["result"] == "failed" and not rig.arb.busy


def test_stale_end_event_is_ignored() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("e", "emergency"))
    rig.arb.on_output_event("ended", {"source": "/m/a.wav"})  # late, from before the preempt
    assert rig.out.source == "/m/e.wav" and rig.stages("e") == ["queued", "started"]


def test_volume_item_and_device() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a", volume=55))
    assert rig.out.plays()[-1][2] == 55
    rig.arb.set_volume(30)
    assert rig.out.calls[-1] == ("volume", 30)
    rig.end()
    rig.arb.submit(file_item("b"))
    assert rig.out.plays()[-1][2] == 30


def test_schedule_items_report_their_stages_to_on_ack_and_keep_their_origin() -> None:
    """The arbiter reports every item's stages to ``on_ack``; whether they become acks is
    its owner's business (the audio service sends none for schedule slots)."""
    rig = Rig()
    rig.arb.submit(file_item("sched-1", origin="schedule"))
    rig.end()
    assert rig.stages("sched-1") == ["queued", "started", "done"]
    assert rig.records[0]["origin"] == "schedule"


def test_invalid_items_raise_value_error() -> None:
    rig = Rig()
    with pytest.raises(ValueError):
        rig.arb.submit(file_item("x", "urgent"))
    with pytest.raises(ValueError):
        rig.arb.submit(file_item("x", repeat=11))


def test_on_change_follows_each_call_that_may_change_what_airs_once() -> None:
    rig = Rig()
    rig.arb.submit(file_item("a"))
    rig.arb.submit(file_item("b"))
    assert rig.changes == 2
    assert rig.arb.stop_id("a", by="x") is True  # stops the current item: one call, one change
    assert rig.changes == 3
    rig.arb.stop_all(by="x")
    rig.arb.set_volume(40)
    rig.arb.tick()
    rig.arb.on_clock_jump()  # ticks inside: still one
    rig.arb.on_output_event("ended", {"source": "/m/none.wav"})
    assert rig.changes == 8
    rig.arb.snapshot()
    rig.arb.next_deadline()
    rig.arb.reserve_seq()
    assert rig.changes == 8, "questions change nothing"
    with pytest.raises(ValueError):
        rig.arb.submit(file_item("x", repeat=11))
    assert rig.changes == 9  # told even when the call raised


def test_on_change_may_submit_and_its_errors_stay_with_the_listener() -> None:
    later = [file_item("b")]

    def follow_up() -> None:
        rig.changes += 1
        if later:
            rig.arb.submit(later.pop())  # a change made by the listener itself
        raise RuntimeError("listener bug")

    rig = Rig(on_change=follow_up)
    rig.arb.submit(file_item("a"))  # does not raise
    assert rig.stages("b") == ["queued"] and rig.changes == 2


def test_most_urgent_covers_what_airs_and_what_waits() -> None:
    rig = Rig()
    assert rig.arb.most_urgent() is None
    rig.arb.submit(file_item("news"))
    assert rig.arb.most_urgent() == "normal"
    rig.arb.submit(file_item("storm", "emergency"))       # preempts: news waits to resume
    rig.arb.submit(file_item("notice", "priority"))
    assert rig.arb.most_urgent() == "emergency"
    rig.advance(1)
    rig.end()                                             # the storm warning ends
    assert rig.arb.most_urgent() == "priority"
    rig.end()
    assert rig.arb.most_urgent() == "normal"
    rig.end()
    assert rig.arb.most_urgent() is None
