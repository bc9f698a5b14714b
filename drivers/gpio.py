"""GPIO backends: RPi.GPIO API (rpi-lgpio on a Pi) and a complete sim with test helpers."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from drivers import DriverUnavailable, resolve

log = logging.getLogger(__name__)


class GPIOBackend(ABC):
    """Pins are BCM numbers. Inputs are read as raw levels; polarity is the caller's business."""

    name = "abstract"

    @abstractmethod
    def setup_output(self, pin: int, initial: bool = False) -> None: ...

    @abstractmethod
    def write(self, pin: int, value: bool) -> None: ...

    @abstractmethod
    def setup_input(self, pin: int, pull: str = "up") -> None:
        """``pull``: "up", "down" or "none"."""

    @abstractmethod
    def read(self, pin: int) -> bool: ...

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release the pins. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SIM_INPUTS_ENV = "TTCS_SIM_GPIO_INPUTS"


class SimGPIO(GPIOBackend):
    """In-memory pins. Tests drive inputs with :meth:`drive` and read the recorded history.

    Test hook for a real agent process: when the environment variable ``TTCS_SIM_GPIO_INPUTS``
    (or ``options["inputs_file"]``) names a JSON file ``{"17": 0, "27": 1}`` (BCM pin -> raw
    level), input pins read those levels; the file is read again whenever it changes, so a test
    can open a cabinet door by rewriting it. A missing or malformed file is ignored (logged
    once); pins it does not name keep their pull level.
    """

    name = "sim"

    def __init__(self, options: dict | None = None) -> None:
        self._lock = threading.Lock()
        self.levels: dict[int, bool] = {}
        self.modes: dict[int, str] = {}
        self.history: list[tuple[float, int, bool]] = []
        self.on_change: Callable[[int, bool], None] | None = None
        self._inputs_file = (options or {}).get("inputs_file") or os.environ.get(SIM_INPUTS_ENV)
        self._inputs_stamp: tuple[int, int] | None = None
        self._inputs_warned = False

    def setup_output(self, pin: int, initial: bool = False) -> None:
        with self._lock:
            self.modes[pin] = "out"
        self.write(pin, initial)

    def write(self, pin: int, value: bool) -> None:
        with self._lock:
            self.levels[pin] = bool(value)
            self.history.append((time.monotonic(), pin, bool(value)))

    def setup_input(self, pin: int, pull: str = "up") -> None:
        with self._lock:
            self.modes[pin] = "in"
            self.levels.setdefault(pin, pull == "up")
            self._inputs_stamp = None  # the hook file (if any) applies to this pin too

    def read(self, pin: int) -> bool:
        if self._inputs_file:
            self._load_inputs_file()
        with self._lock:
            return self.levels.get(pin, False)

    def _load_inputs_file(self) -> None:
        """Apply the input levels of the hook file when it changed since the last read."""
        path = str(self._inputs_file)
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._inputs_stamp:
                return
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            levels = {int(pin): bool(level) for pin, level in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError) as e:
            if not self._inputs_warned:
                log.warning("sim gpio inputs file %s unusable: %s", path, e)
                self._inputs_warned = True
            return
        self._inputs_stamp, self._inputs_warned = stamp, False
        with self._lock:
            for pin, level in levels.items():
                if self.modes.get(pin) != "out":
                    self.levels[pin] = level
                    self.history.append((time.monotonic(), pin, level))

    # test helpers
    def drive(self, pin: int, value: bool) -> None:
        """Set an input pin's level as the outside world would."""
        self.write(pin, value)
        if self.on_change:
            self.on_change(pin, bool(value))

    def states(self, pin: int) -> list[bool]:
        return [v for _, p, v in self.history if p == pin]


class RpiGPIO(GPIOBackend):
    """The RPi.GPIO API, provided on current Raspberry Pi OS by rpi-lgpio."""

    name = "lgpio"

    def __init__(self, options: dict | None = None) -> None:
        try:
            import RPi.GPIO as GPIO
        except (ImportError, RuntimeError) as e:
            raise DriverUnavailable(f"RPi.GPIO (rpi-lgpio) unavailable: {e}") from e
        self._gpio = GPIO
        GPIO.setwarnings(False)
        GPIO.setmode(GPIO.BCM)
        self._pins: set[int] = set()

    def setup_output(self, pin: int, initial: bool = False) -> None:
        level = self._gpio.HIGH if initial else self._gpio.LOW
        self._gpio.setup(pin, self._gpio.OUT, initial=level)
        self._pins.add(pin)

    def write(self, pin: int, value: bool) -> None:
        self._gpio.output(pin, self._gpio.HIGH if value else self._gpio.LOW)

    def setup_input(self, pin: int, pull: str = "up") -> None:
        pud = {"up": self._gpio.PUD_UP, "down": self._gpio.PUD_DOWN}.get(pull, self._gpio.PUD_OFF)
        self._gpio.setup(pin, self._gpio.IN, pull_up_down=pud)
        self._pins.add(pin)

    def read(self, pin: int) -> bool:
        return bool(self._gpio.input(pin))

    def close(self) -> None:
        if self._pins:
            self._gpio.cleanup(list(self._pins))
            self._pins.clear()


def open_gpio(name: str, options: dict | None = None) -> GPIOBackend:
    """Open the backend registered as ``name`` (``drivers.REGISTRY["gpio"]``); fall back to the
    sim with a clear log line off a Pi."""
    try:
        return resolve("gpio", name)(options)
    except DriverUnavailable as e:
        log.warning("gpio backend %r unavailable (%s); using the sim backend: "
                    "no relay will switch", name, e)
    return resolve("gpio", "sim")(options)
