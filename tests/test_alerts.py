"""agent.core.alerts on a FakeClock: debounce, the 100 s bound, hysteresis, flapping, keys, config."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.alerts import AlertConfig, AlertEvent, AlertManager
from agent.core.clock import FakeClock

FAULT_REPORT_LIMIT_S = 100.0  # EN 54-16


def run_until(mgr: AlertManager, clock: FakeClock, until: float,
              step: float = 1.0) -> list[AlertEvent]:
    """Tick as a caller's timer would: at each deadline, and at least every ``step`` seconds."""
    events = []
    while clock.monotonic() < until:
        deadline = mgr.next_deadline()
        target = min(until, clock.monotonic() + step)
        if deadline is not None and deadline > clock.monotonic():
            target = min(target, deadline)
        clock.advance(max(target - clock.monotonic(), 0.0))
        events += mgr.tick()
    return events


def test_raised_after_debounce_not_before_with_fault_onset_as_since():
    clock = FakeClock()
    mgr = AlertManager(clock)
    onset_ms = clock.now_ms()
    mgr.set("door_open", True, {"pin": 17})
    assert mgr.tick() == []
    assert mgr.next_deadline() == pytest.approx(clock.monotonic() + 5.0)

    clock.advance(4.9)
    assert mgr.tick() == []
    clock.advance(0.1)
    (ev,) = mgr.tick()

    assert ev.payload() == {"type": "alert", "state": "raised", "code": "door_open",
                            "detail": {"pin": 17}, "since": onset_ms}
    assert mgr.active() == [{"code": "door_open", "since": onset_ms, "detail": {"pin": 17}}]
    assert mgr.tick() == []  # raised once


def test_blip_shorter_than_debounce_never_raises():
    clock = FakeClock()
    mgr = AlertManager(clock)
    mgr.set("mains_lost", True)
    clock.advance(3)
    mgr.set("mains_lost", False)
    assert run_until(mgr, clock, clock.monotonic() + 60) == []
    assert mgr.active() == [] and mgr.next_deadline() is None


def test_clear_after_stable_absence_since_is_when_fault_ended():
    clock = FakeClock()
    mgr = AlertManager(clock, {"alerts": {"clear_after_s": 20}})
    mgr.set("amplifier_fault", True)
    run_until(mgr, clock, clock.monotonic() + 10)
    ended_ms = clock.now_ms()
    mgr.set("amplifier_fault", False)
    clock.advance(19)
    assert mgr.tick() == []
    mgr.set("amplifier_fault", False)  # repeated reports do not restart the timer
    clock.advance(1)
    (ev,) = mgr.tick()
    assert (ev.state, ev.code, ev.since) == ("cleared", "amplifier_fault", ended_ms)
    assert mgr.active() == []


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(st.tuples(st.booleans(), st.floats(0.1, 400)), max_size=30),
    raise_after=st.floats(0, 60),
    clear_after=st.floats(0, 300),
)
def test_a_lasting_fault_is_always_raised_within_100_s(history, raise_after, clear_after):
    """Whatever came before (flapping included), a fault that then persists is raised in time."""
    clock = FakeClock()
    mgr = AlertManager(clock, {"alerts": {"raise_after_s": raise_after,
                                          "clear_after_s": clear_after,
                                          "flap_clear_after_s": max(600.0, clear_after)}})
    for active, duration in history:
        mgr.set("audio_fault", active)
        run_until(mgr, clock, clock.monotonic() + duration, step=30)
    mgr.set("audio_fault", True)
    onset, onset_ms = clock.monotonic(), clock.now_ms()
    events = run_until(mgr, clock, onset + FAULT_REPORT_LIMIT_S, step=30)

    assert [a["code"] for a in mgr.active()] == ["audio_fault"]
    assert all(e.since <= onset_ms for e in events if e.state == "raised")
    assert not [e for e in events if e.state == "cleared"]


def test_cpu_temp_hysteresis_with_default_thresholds():
    clock = FakeClock()
    mgr = AlertManager(clock)
    mgr.observe("cpu_temp_c", 79.9)
    assert run_until(mgr, clock, clock.monotonic() + 60) == []
    mgr.observe("cpu_temp_c", 80.0)
    (ev,) = run_until(mgr, clock, clock.monotonic() + 60)
    assert ev.state == "raised"
    assert ev.detail == {"metric": "cpu_temp_c", "value": 80.0, "threshold": 80.0}

    mgr.observe("cpu_temp_c", 76.0)  # below the raise point, above the clear point: still hot
    assert run_until(mgr, clock, clock.monotonic() + 600) == []
    mgr.observe("cpu_temp_c", 74.9)
    (ev,) = run_until(mgr, clock, clock.monotonic() + 600)
    assert ev.state == "cleared"


def test_thresholds_and_timings_come_from_config():
    clock = FakeClock()
    mgr = AlertManager(clock, {"alerts": {"cpu_temp": {"raise_c": 70, "clear_c": 65},
                                          "codes": {"cpu_temp": {"raise_after_s": 0}}}})
    mgr.observe("cpu_temp_c", 71.0)
    (ev,) = mgr.tick()  # raise_after_s 0: at once
    assert ev.code == "cpu_temp" and ev.detail["threshold"] == 70


def test_disk_low_per_path_with_ten_percent_clear_margin():
    clock = FakeClock()
    mgr = AlertManager(clock, {"health": {"disk_min_free_mb": 500}, "alerts": {"clear_after_s": 0}})
    mgr.observe_system({"cpu_temp_c": None, "disk_free_mb": {"state": 499, "cache": 5000}})
    events = run_until(mgr, clock, clock.monotonic() + 10)
    assert [(e.state, e.key, e.detail["value"]) for e in events] == [("raised", "state", 499)]

    mgr.observe("disk_free_mb", 540, key="state")  # above the minimum, below minimum + 10 %
    assert run_until(mgr, clock, clock.monotonic() + 60) == []
    mgr.observe("disk_free_mb", 550, key="state")
    events = run_until(mgr, clock, clock.monotonic() + 10)
    assert [(e.state, e.key) for e in events] == [("cleared", "state")]


def test_modem_signal_from_dbm_and_unknown_signal_changes_nothing():
    clock = FakeClock()
    mgr = AlertManager(clock)
    mgr.observe("modem_dbm", -107)
    mgr.observe("modem_dbm", None)  # CSQ 99: no information
    (ev,) = run_until(mgr, clock, clock.monotonic() + 61)
    assert (ev.code, ev.state) == ("modem_signal", "raised")
    mgr.observe("modem_dbm", -101)  # in the hysteresis band
    assert run_until(mgr, clock, clock.monotonic() + 300) == []
    assert [a["code"] for a in mgr.active()] == ["modem_signal"]


def test_several_keys_of_one_code_are_independent():
    clock = FakeClock()
    mgr = AlertManager(clock, {"alerts": {"raise_after_s": 0, "clear_after_s": 0}})
    mgr.set("media_unavailable", True, {"url": "http://m/a.mp3"}, key="item-a")
    mgr.set("media_unavailable", True, {"url": "http://m/b.mp3"}, key="item-b")
    assert sorted(e.key for e in mgr.tick()) == ["item-a", "item-b"]

    mgr.set("media_unavailable", False, key="item-a")
    (ev,) = mgr.tick()
    assert (ev.state, ev.key, ev.payload()["key"]) == ("cleared", "item-a", "item-a")
    assert mgr.active() == [{"code": "media_unavailable", "key": "item-b", "since": clock.now_ms(),
                             "detail": {"url": "http://m/b.mp3"}}]


def _flap(mgr, clock, on_s, off_s, hours=1.0) -> list[tuple[float, AlertEvent]]:
    stamped = []
    end = clock.monotonic() + hours * 3600
    while clock.monotonic() < end:
        for active, duration in ((True, on_s), (False, off_s)):
            mgr.set("door_open", active)
            for ev in run_until(mgr, clock, clock.monotonic() + duration):
                stamped.append((clock.monotonic(), ev))
    return stamped


@pytest.mark.parametrize("on_s, off_s", [(8, 52), (20, 40), (1, 1), (6, 35)])
def test_flapping_hour_is_suppressed_and_stays_raised(on_s, off_s):
    clock = FakeClock()
    mgr = AlertManager(clock)  # defaults: 5 s / 30 s, 4 transitions per 600 s, 600 s hold
    stamped = _flap(mgr, clock, on_s, off_s)

    # without suppression a slow flap (on 8 s, off 52 s) would give 120 events in the hour
    assert len(stamped) <= 4
    for t, _ in stamped:
        assert sum(1 for u, _ in stamped if t - 600 < u <= t) <= 4
    assert [e.state for _, e in stamped][:1] == ["raised"]
    assert mgr.active()[0]["code"] == "door_open"  # still raised at the end of the hour

    # once the input calms down, one clear after the hold
    mgr.set("door_open", False)
    events = run_until(mgr, clock, clock.monotonic() + 601)
    assert [e.state for e in events] == ["cleared"] and mgr.active() == []


def test_isolated_faults_are_all_reported():
    clock = FakeClock()
    mgr = AlertManager(clock)
    stamped = _flap(mgr, clock, on_s=60, off_s=1140, hours=3)  # one door opening every 20 min
    assert [e.state for _, e in stamped] == ["raised", "cleared"] * 9


def test_flapping_marked_in_active_list():
    clock = FakeClock()
    mgr = AlertManager(clock)
    _flap(mgr, clock, on_s=8, off_s=52, hours=0.5)
    (entry,) = mgr.active()
    assert entry["flapping"] is True


def test_config_errors_are_all_reported_with_key_paths():
    bad = {"alerts": {"raise_after_s": 120, "flap_max": 1,
                      "cpu_temp": {"raise_c": 70, "clear_c": 72}, "raise_afer_s": 5,
                      "codes": {"door_open": {"raise_after_s": -1}}},
           "health": {"disk_min_free_mb": "lots"}}
    with pytest.raises(ValueError) as err:
        AlertConfig.from_config(bad)
    text = str(err.value)
    for needle in ["alerts.raise_after_s: must be a number from 0 to 60",
                   "alerts.flap_max: must be an integer from 2",
                   "alerts.cpu_temp.clear_c: must be below alerts.cpu_temp.raise_c (70)",
                   "alerts.raise_afer_s: unknown key",
                   "alerts.codes.door_open.raise_after_s: must be",
                   "health.disk_min_free_mb: must be"]:
        assert needle in text


def test_unknown_metric_and_bad_code_are_programming_errors():
    mgr = AlertManager(FakeClock())
    with pytest.raises(ValueError):
        mgr.observe("cpu_temperature", 90)
    with pytest.raises(ValueError):
        mgr.set("Door Open", True)


def test_chattering_input_adds_up_and_is_raised_from_its_first_onset():
    clock = FakeClock()
    mgr = AlertManager(clock)
    first_ms = clock.now_ms()
    events = []
    for _ in range(10):  # 1 s on, 1 s off: never steady for the 5 s debounce
        mgr.set("mains_lost", True)
        events += run_until(mgr, clock, clock.monotonic() + 1)
        mgr.set("mains_lost", False)
        events += run_until(mgr, clock, clock.monotonic() + 1)
    assert [(e.state, e.since) for e in events] == [("raised", first_ms)]


def test_separate_short_blips_do_not_add_up():
    clock = FakeClock()
    mgr = AlertManager(clock)
    for _ in range(20):  # 3 s blips 10 s apart: each gap ends the debounce episode
        mgr.set("mains_lost", True)
        run_until(mgr, clock, clock.monotonic() + 3)
        mgr.set("mains_lost", False)
        assert run_until(mgr, clock, clock.monotonic() + 10) == []
