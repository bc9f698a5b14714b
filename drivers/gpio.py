"""GPIO backends: RPi.GPIO API (rpi-lgpio on a Pi) and a complete sim with test helpers."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from drivers import DriverUnavailable

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

    def close(self) -> None:
        """Release the pins. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SimGPIO(GPIOBackend):
    """In-memory pins. Tests drive inputs with :meth:`drive` and read the recorded history."""

    name = "sim"

    def __init__(self, options: dict | None = None) -> None:
        self._lock = threading.Lock()
        self.levels: dict[int, bool] = {}
        self.modes: dict[int, str] = {}
        self.history: list[tuple[float, int, bool]] = []
        self.on_change: Callable[[int, bool], None] | None = None

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

    def read(self, pin: int) -> bool:
        with self._lock:
            return self.levels.get(pin, False)

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
        self._gpio.setup(pin, self._gpio.OUT, initial=self._gpio.HIGH if initial else self._gpio.LOW)
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
    """Open the configured backend; fall back to the sim with a clear log line off a Pi."""
    if name == "sim":
        return SimGPIO(options)
    try:
        return RpiGPIO(options)
    except DriverUnavailable as e:
        log.warning("gpio backend %r unavailable (%s); using the sim backend: no relay will switch", name, e)
        return SimGPIO(options)
