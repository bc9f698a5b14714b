"""agent.health.cabinet: debounced, polarity-aware cabinet inputs on SimGPIO and a FakeClock."""

from __future__ import annotations

import pytest

from agent.core.alerts import AlertManager
from agent.core.clock import FakeClock
from agent.health.cabinet import CabinetInputs, parse_inputs
from drivers.gpio import SimGPIO

DOOR, MAINS, AMP = 17, 27, 22
POLL_S = 0.2


def poll_for(cab: CabinetInputs, clock: FakeClock, seconds: float) -> list:
    """Poll like the core's 0.2 s timer; return every change seen."""
    changes = []
    for _ in range(round(seconds / POLL_S)):
        clock.advance(POLL_S)
        cab.poll()
        changes += cab.changes
    return changes


@pytest.fixture
def rig():
    gpio, clock = SimGPIO(), FakeClock()
    cab = CabinetInputs(gpio, {
        "door": {"pin": DOOR, "active_low": True, "pull": "up", "debounce_ms": 400},
        "mains": {"pin": MAINS, "active_low": False, "pull": "down", "debounce_ms": 1000},
    }, clock)
    return gpio, clock, cab


def test_inputs_are_set_up_with_their_pull_and_first_reading_is_taken_at_once(rig):
    gpio, _clock, cab = rig
    assert gpio.modes == {DOOR: "in", MAINS: "in"}
    states = cab.poll()
    # door contact closed pulls nothing: the pull-up reads high = closed; mains sense low = lost
    assert states == {"door": False, "mains": False, "amplifier_fault": None}
    assert [(c.name, c.value, c.previous) for c in cab.changes] == [
        ("door", False, None), ("mains", False, None)]


def test_door_opens_only_after_debounce_with_active_low(rig):
    gpio, clock, cab = rig
    cab.poll()
    opened_ms = clock.now_ms() + 200
    gpio.drive(DOOR, False)  # active low: low level = door open
    changes = poll_for(cab, clock, 0.4)
    assert changes == [] and cab.states()["door"] is False  # 0.2 s of low: not yet
    changes = poll_for(cab, clock, 0.2)
    assert [(c.name, c.value, c.since_ms) for c in changes] == [("door", True, opened_ms)]
    assert cab.states()["door"] is True


def test_contact_bounce_inside_debounce_is_ignored(rig):
    gpio, clock, cab = rig
    cab.poll()
    for level in [False, True, False, True, False, True]:  # bouncing every poll
        gpio.drive(DOOR, level)
        clock.advance(POLL_S)
        cab.poll()
        assert cab.changes == []
    assert cab.states()["door"] is False


def test_active_high_polarity_for_mains_sense(rig):
    gpio, clock, cab = rig
    cab.poll()
    gpio.drive(MAINS, True)  # active high: high level = mains present
    changes = poll_for(cab, clock, 1.2)
    assert [(c.name, c.value) for c in changes] == [("mains", True)]
    assert cab.alert_states() == {"door_open": False, "mains_lost": False}
    assert cab.health_fields() == {"door_open": False, "mains_present": True,
                                   "amplifier_fault": None}


def test_zero_debounce_follows_every_poll():
    gpio, clock = SimGPIO(), FakeClock()
    cab = CabinetInputs(gpio, {"amplifier_fault": {"pin": AMP, "debounce_ms": 0}}, clock)
    cab.poll()
    gpio.drive(AMP, False)
    assert cab.poll()["amplifier_fault"] is True
    assert cab.alert_states() == {"amplifier_fault": True}


def test_unconfigured_inputs_are_none_and_touch_no_pin():
    gpio, clock = SimGPIO(), FakeClock()
    cab = CabinetInputs(gpio, {"door": None}, clock)
    assert cab.poll() == {"door": None, "mains": None, "amplifier_fault": None}
    assert cab.alert_states() == {} and gpio.modes == {}


class FlakyGPIO(SimGPIO):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def read(self, pin: int) -> bool:
        if self.broken:
            raise OSError(5, "Input/output error")
        return super().read(pin)


def test_unreadable_pin_becomes_unknown_then_recovers():
    gpio, clock = FlakyGPIO(), FakeClock()
    cab = CabinetInputs(gpio, {"door": {"pin": DOOR}}, clock)
    assert cab.poll()["door"] is False
    gpio.broken = True
    assert cab.poll()["door"] is None
    assert [(c.value, c.previous) for c in cab.changes] == [(None, False)]
    assert cab.alert_states() == {}  # unknown is not reported as closed
    gpio.broken = False
    assert cab.poll()["door"] is False


def test_door_held_open_raises_alert_well_within_100_s(rig):
    gpio, clock, cab = rig
    alerts = AlertManager(clock)
    cab.poll()
    opened = clock.monotonic()
    gpio.drive(DOOR, False)
    raised_at = None
    while raised_at is None and clock.monotonic() - opened < 100:
        clock.advance(POLL_S)
        cab.poll()
        for code, active in cab.alert_states().items():
            alerts.set(code, active)
        if any(e.code == "door_open" and e.state == "raised" for e in alerts.tick()):
            raised_at = clock.monotonic()
    assert raised_at is not None and raised_at - opened <= 6.0  # 0.4 s debounce + 5 s alert


def test_config_errors_are_all_listed():
    with pytest.raises(ValueError) as err:
        parse_inputs({
            "door": {"pin": 17, "pull": "sideways", "active_low": "yes"},
            "mains": {"pin": 17, "debounce_ms": -5},
            "amplifier_fault": {"pin": 40, "colour": "red"},
            "window": {"pin": 5},
        })
    text = str(err.value)
    for needle in ["cabinet.door.pull: must be one of up, down, none",
                   "cabinet.door.active_low: must be true or false",
                   "cabinet.mains.debounce_ms: must be an integer from 0 to 10000",
                   "cabinet.amplifier_fault.pin: must be a BCM pin number",
                   "cabinet.amplifier_fault.colour: unknown key",
                   "cabinet.window: unknown input"]:
        assert needle in text


def test_duplicate_pin_is_an_error():
    with pytest.raises(ValueError, match=r"BCM 17 is already used by cabinet\.door"):
        parse_inputs({"door": {"pin": 17}, "mains": {"pin": 17}})
