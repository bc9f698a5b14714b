"""The amplifier relay: switched on before audio (with a warm-up), off after an idle hold.

Thread-free and clock-driven like the arbiter: the owner asks :meth:`next_deadline` and calls
:meth:`tick` when it passes (the :class:`~agent.audio.arbiter.Arbiter` does both for the
amplifier it is given, so the core needs one timer for both).

States: ``off`` → ``warming`` (relay on, audio must wait ``warm_up_s`` so the amplifier does not
thump or clip the first words) → ``on`` → ``holding`` (idle, relay still on for ``idle_hold_s``
so back-to-back items do not click the relay) → ``off``.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.core.clock import Clock
from drivers.gpio import GPIOBackend

log = logging.getLogger(__name__)

OFF, WARMING, ON, HOLDING = "off", "warming", "on", "holding"


class Amplifier:
    """One relay on a GPIO output pin, with an optional fault input.

    ``gpio``/``pin`` may be None: a cabinet without a switched amplifier (timing still applies,
    so configure ``warm_up_s: 0`` there).
    """

    def __init__(self, gpio: GPIOBackend | None, clock: Clock, *, pin: int | None = None,
                 active_high: bool = True, warm_up_s: float = 2.0, idle_hold_s: float = 30.0,
                 fault_pin: int | None = None, fault_active_low: bool = True) -> None:
        self._gpio = gpio
        self._clock = clock
        self.pin = pin
        self.active_high = active_high
        self.warm_up_s = max(0.0, float(warm_up_s))
        self.idle_hold_s = max(0.0, float(idle_hold_s))
        self.fault_pin = fault_pin
        self.fault_active_low = fault_active_low
        self.state = OFF
        self._until: float | None = None  # end of warm-up or of idle hold
        self.relay_error: str | None = None
        self._setup()

    @classmethod
    def from_config(cls, gpio: GPIOBackend | None, clock: Clock, cfg: dict[str, Any]) -> Amplifier:
        """Build from the validated ``amplifier:`` section (keys as the constructor)."""
        keys = ("pin", "active_high", "warm_up_s", "idle_hold_s", "fault_pin", "fault_active_low")
        return cls(gpio, clock, **{k: cfg[k] for k in keys if k in cfg})

    def _setup(self) -> None:
        if self._gpio is None:
            return
        try:
            if self.pin is not None:
                self._gpio.setup_output(self.pin, initial=not self.active_high)
            if self.fault_pin is not None:
                pull = "up" if self.fault_active_low else "down"
                self._gpio.setup_input(self.fault_pin, pull=pull)
        except Exception as e:  # noqa: BLE001 - any backend error becomes amplifier_fault
            self.relay_error = f"amplifier gpio setup failed: {e}"
            log.error(self.relay_error)

    def _relay(self, on: bool) -> None:
        if self._gpio is None or self.pin is None:
            return
        try:
            self._gpio.write(self.pin, on == self.active_high)
            self.relay_error = None
        except Exception as e:  # noqa: BLE001 - never stop audio over a relay error
            self.relay_error = f"amplifier relay write failed: {e}"
            log.error(self.relay_error)

    # --- requests from the arbiter ---------------------------------------------------------

    def request_on(self) -> None:
        """Audio is wanted: switch on (starting the warm-up) or cancel a pending idle hold."""
        now = self._clock.monotonic()
        if self.state == OFF:
            self._relay(True)
            if self.warm_up_s > 0:
                self.state, self._until = WARMING, now + self.warm_up_s
            else:
                self.state, self._until = ON, None
        elif self.state == HOLDING:
            self.state, self._until = ON, None

    def request_off(self) -> None:
        """Audio is done: switch off after the idle hold (at once with a hold of 0)."""
        if self.state in (OFF, HOLDING):
            return
        if self.idle_hold_s <= 0:
            self._switch_off()
            return
        self.state, self._until = HOLDING, self._clock.monotonic() + self.idle_hold_s

    def is_ready(self) -> bool:
        """Whether audio may start now (relay on and warmed up)."""
        self.tick()
        return self.state in (ON, HOLDING)

    # --- timer hook ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._until if self.state in (WARMING, HOLDING) else None

    def tick(self) -> None:
        if self._until is None or self._clock.monotonic() < self._until:
            return
        if self.state == WARMING:
            self.state, self._until = ON, None
        elif self.state == HOLDING:
            self._switch_off()

    def _switch_off(self) -> None:
        self._relay(False)
        self.state, self._until = OFF, None

    # --- health ----------------------------------------------------------------------------

    def fault(self) -> bool | None:
        """The fault input (True = fault), None when no fault pin is configured or readable."""
        if self._gpio is None or self.fault_pin is None:
            return None
        try:
            level = self._gpio.read(self.fault_pin)
        except Exception as e:  # noqa: BLE001
            log.warning("amplifier fault pin read failed: %s", e)
            return None
        return (not level) if self.fault_active_low else level

    def status(self) -> dict[str, Any]:
        """For health telemetry: state, relay level, fault input and relay errors."""
        return {"state": self.state, "relay_on": self.state != OFF, "fault": self.fault(),
                "error": self.relay_error}

    def close(self) -> None:
        """Relay off now. Idempotent."""
        if self.state != OFF:
            self._switch_off()
