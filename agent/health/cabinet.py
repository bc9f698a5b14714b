"""Cabinet sensor inputs: door switch, mains-power sense, amplifier fault line.

Polled, not interrupt-driven: the core calls :meth:`CabinetInputs.poll` from its timer every
~0.2 s. Polling is simpler to test, immune to missed edges, and a few GPIO reads per second cost
nothing. Debouncing is time-based on the injected clock: a new level must be seen on every poll
for ``debounce_ms`` before the logical state changes.

Logical states (after polarity):

- ``door``: True = door open.
- ``mains``: True = mains power present.
- ``amplifier_fault``: True = the amplifier signals a fault.

An input that is not configured, or whose pin cannot be read, is None.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.clock import Clock
from drivers.gpio import GPIOBackend

log = logging.getLogger(__name__)

INPUT_NAMES = ("door", "mains", "amplifier_fault")
PULLS = ("up", "down", "none")
MAX_BCM_PIN = 27
MAX_DEBOUNCE_MS = 10_000

# input -> (alert code, the logical state that means the fault is present)
ALERTS: dict[str, tuple[str, bool]] = {
    "door": ("door_open", True),
    "mains": ("mains_lost", False),
    "amplifier_fault": ("amplifier_fault", True),
}
# input -> key in agent.health.system.build_health's ``extra``
HEALTH_FIELDS: dict[str, str] = {
    "door": "door_open",
    "mains": "mains_present",
    "amplifier_fault": "amplifier_fault",
}
DEFAULT_DEBOUNCE_MS = {"door": 200, "mains": 500, "amplifier_fault": 200}


@dataclass(frozen=True)
class InputSpec:
    name: str
    pin: int
    active_low: bool = True  # typical wiring: a contact to ground with the pull-up enabled
    pull: str = "up"
    debounce_ms: int = 200

    def logical(self, level: bool) -> bool:
        return level != self.active_low


def parse_inputs(section: Mapping[str, Any] | None) -> dict[str, InputSpec]:
    """Specs from the ``cabinet:`` config section; ValueError lists every problem at once.

    An input is configured by giving its ``pin``; ``cabinet.door: null`` or leaving it out means
    "not fitted".
    """
    errors: list[str] = []
    specs: dict[str, InputSpec] = {}
    for name, raw in (section or {}).items():
        path = f"cabinet.{name}"
        if name not in INPUT_NAMES:
            errors.append(f"{path}: unknown input (expected one of {', '.join(INPUT_NAMES)})")
        elif raw is not None:
            spec = _parse_one(name, raw, path, errors)
            if spec is not None:
                specs[name] = spec
    pins: dict[int, str] = {}
    for spec in specs.values():
        if spec.pin in pins:
            errors.append(f"cabinet.{spec.name}.pin: BCM {spec.pin} is already used by "
                          f"cabinet.{pins[spec.pin]}")
        pins.setdefault(spec.pin, spec.name)
    if errors:
        raise ValueError("\n".join(errors))
    return specs


def _parse_one(name: str, raw: Any, path: str, errors: list[str]) -> InputSpec | None:
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: must be a mapping with at least pin")
        return None
    before = len(errors)
    for key in raw:
        if key not in ("pin", "active_low", "pull", "debounce_ms"):
            errors.append(f"{path}.{key}: unknown key "
                          "(expected pin, active_low, pull, debounce_ms)")
    pin = raw.get("pin")
    if not _is_int(pin) or not 0 <= pin <= MAX_BCM_PIN:
        errors.append(f"{path}.pin: must be a BCM pin number from 0 to {MAX_BCM_PIN}, not {pin!r}")
    active_low = raw.get("active_low", True)
    if not isinstance(active_low, bool):
        errors.append(f"{path}.active_low: must be true or false, not {active_low!r}")
    pull = raw.get("pull", "up")
    if pull not in PULLS:
        errors.append(f"{path}.pull: must be one of {', '.join(PULLS)}, not {pull!r}")
    debounce = raw.get("debounce_ms", DEFAULT_DEBOUNCE_MS[name])
    if not _is_int(debounce) or not 0 <= debounce <= MAX_DEBOUNCE_MS:
        errors.append(f"{path}.debounce_ms: must be an integer from 0 to {MAX_DEBOUNCE_MS}, "
                      f"not {debounce!r}")
    if len(errors) > before:
        return None
    return InputSpec(name, pin, active_low, pull, debounce)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class InputChange:
    name: str
    value: bool | None  # new logical state (None: the pin could not be read)
    previous: bool | None
    since_ms: int       # wall time the new level was first seen (before the debounce)


@dataclass
class _Debouncer:
    spec: InputSpec
    state: bool | None = None
    candidate: bool | None = None
    candidate_mono: float = 0.0
    candidate_ms: int = 0
    failing: bool = False  # the last read raised (logged once per failure spell)

    def sample(self, logical: bool, mono: float, wall_ms: int) -> InputChange | None:
        if self.state is None:  # first reading (or after a read failure): believe it at once
            self.state, self.candidate = logical, None
            return InputChange(self.spec.name, logical, None, wall_ms)
        if logical == self.state:
            self.candidate = None
            return None
        if self.candidate != logical:
            self.candidate, self.candidate_mono, self.candidate_ms = logical, mono, wall_ms
        if (mono - self.candidate_mono) * 1000 + 1e-6 < self.spec.debounce_ms:  # float noise
            return None
        previous, self.state, self.candidate = self.state, logical, None
        return InputChange(self.spec.name, logical, previous, self.candidate_ms)


class CabinetInputs:
    """Debounced cabinet inputs on a :class:`~drivers.gpio.GPIOBackend`. One caller thread."""

    def __init__(self, gpio: GPIOBackend, config: Mapping[str, Any] | None, clock: Clock) -> None:
        self._gpio = gpio
        self._clock = clock
        self._inputs: dict[str, _Debouncer] = {}
        self.changes: list[InputChange] = []  # from the last poll()
        for name, spec in parse_inputs(config).items():
            try:
                gpio.setup_input(spec.pin, spec.pull)
            except (RuntimeError, OSError) as e:  # DriverError is a RuntimeError
                log.error("cabinet input %s on BCM %d cannot be set up: %s", name, spec.pin, e)
            self._inputs[name] = _Debouncer(spec)

    def poll(self) -> dict[str, bool | None]:
        """Sample every configured input; return the debounced logical states of all inputs.

        Changes (including the first reading) are left in :attr:`changes` for the caller to log
        or forward; :meth:`alert_states` gives what to feed to the alert manager.
        """
        mono, wall = self._clock.monotonic(), self._clock.now_ms()
        self.changes = []
        for deb in self._inputs.values():
            change = self._sample(deb, mono, wall)
            if change is not None:
                self.changes.append(change)
        return self.states()

    def states(self) -> dict[str, bool | None]:
        return {name: (self._inputs[name].state if name in self._inputs else None)
                for name in INPUT_NAMES}

    def alert_states(self) -> dict[str, bool]:
        """Alert code -> fault present, for the configured inputs with a known state.

        Feed each to ``AlertManager.set(code, active)`` after every poll (it is idempotent).
        """
        out = {}
        for name, deb in self._inputs.items():
            if deb.state is not None:
                code, fault_when = ALERTS[name]
                out[code] = deb.state == fault_when
        return out

    def health_fields(self) -> dict[str, bool | None]:
        """The cabinet keys of ``agent.health.system.build_health``'s ``extra``."""
        states = self.states()
        return {HEALTH_FIELDS[name]: states[name] for name in INPUT_NAMES}

    def _sample(self, deb: _Debouncer, mono: float, wall: int) -> InputChange | None:
        try:
            level = self._gpio.read(deb.spec.pin)
        except (RuntimeError, OSError) as e:
            if not deb.failing:
                log.error("cabinet input %s (BCM %d) unreadable: %s",
                          deb.spec.name, deb.spec.pin, e)
            deb.failing = True
            if deb.state is None:
                return None
            previous, deb.state, deb.candidate = deb.state, None, None
            return InputChange(deb.spec.name, None, previous, wall)
        deb.failing = False
        return deb.sample(deb.spec.logical(bool(level)), mono, wall)
