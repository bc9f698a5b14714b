"""The FIFO hold of prepared items (agent/audio/prepare.py) on a fake clock: a prepared item
waits only for earlier arrivals still being prepared, never for ones already handed to the
arbiter."""

from types import SimpleNamespace

from agent.audio.arbiter import Item, Variant
from agent.audio.prepare import Meta, Preparation
from agent.core.clock import FakeClock
from agent.protocol import Priority

HOLD_S = 2.0


def preparation(clock: FakeClock, ready: list[str]) -> Preparation:
    def hand_over(m: Meta) -> None:    # as the audio service does
        ready.append(m.id)
        m.ready, m.submitted = None, True

    return Preparation(SimpleNamespace(clock=clock), cache=None, tts=None, tts_error=None,
                       pool=None, live_options=None, reserve_seq=lambda: 0, hold_s=HOLD_S,
                       live_prefix="", on_ready=hand_over,
                       on_failed=lambda *a: None, on_stopped=lambda *a: None,
                       on_change=lambda: None)


def meta(prep: Preparation, item_id: str, arrival: int, clock: FakeClock,
         rank: Priority = Priority.NORMAL) -> Meta:
    m = Meta(item_id, "command", "file", arrival=arrival, since=clock.monotonic(), rank=rank)
    prep.items[item_id] = m
    return m


def item(item_id: str) -> Item:
    return Item(item_id, "file", [Variant(f"/m/{item_id}.wav")])


def test_later_item_waits_for_an_earlier_one_still_preparing_then_goes_in_order():
    clock, ready = FakeClock(), []
    prep = preparation(clock, ready)
    first, second = meta(prep, "a", 1, clock), meta(prep, "b", 2, clock)
    second.ready = item("b")
    prep.release()
    assert ready == []
    assert prep.hold_deadline() == clock.monotonic() + HOLD_S
    first.ready = item("a")
    prep.release()
    assert ready == ["a", "b"]


def test_an_item_already_handed_to_the_arbiter_holds_nothing():
    clock, ready = FakeClock(), []
    prep = preparation(clock, ready)
    first, second = meta(prep, "a", 1, clock), meta(prep, "b", 2, clock)
    first.submitted = True             # airing (the service cleared ``ready`` on hand-over)
    second.ready = item("b")
    assert prep.hold_deadline() == clock.monotonic()   # nothing to wait for: go now
    prep.release()
    assert ready == ["b"]


def test_the_hold_ends_after_hold_s_and_a_lower_rank_holds_nothing():
    clock, ready = FakeClock(), []
    prep = preparation(clock, ready)
    meta(prep, "slow", 1, clock)                                # never finishes
    normal = meta(prep, "low", 2, clock)
    meta(prep, "slow-normal", 3, clock)
    urgent = meta(prep, "storm", 4, clock, rank=Priority.EMERGENCY)
    urgent.ready = item("storm")
    prep.release()
    assert ready == ["storm"]          # earlier normal arrivals do not hold an emergency
    normal.ready = item("low")
    prep.release()
    assert ready == ["storm"]
    clock.advance(HOLD_S)
    prep.release()
    assert ready == ["storm", "low"]
