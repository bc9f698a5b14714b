"""Clocks: the wall clock (epoch milliseconds) and a monotonic clock, injectable for tests.

Domain logic (arbitration, scheduling, alerts) takes a :class:`Clock` so tests can drive weeks
of time in milliseconds with :class:`FakeClock`, without sleeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, milliseconds since the Unix epoch (UTC)."""

    def monotonic(self) -> float:
        """Monotonic seconds; only differences mean anything."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to. ``jump`` moves the wall clock alone (an NTP step)."""

    def __init__(self, now_ms: int = 1_764_150_000_000, mono: float = 1000.0) -> None:
        self._wall = now_ms
        self._mono = mono

    def now_ms(self) -> int:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += round(seconds * 1000)

    def jump(self, delta_ms: int) -> None:
        self._wall += delta_ms


# --- clock trust -------------------------------------------------------------------------

class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux); only the leading fields matter to us, the
    # rest is padding large enough for every architecture.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


TIME_ERROR = 5  # adjtimex() return value: the clock is not synchronised


def kernel_clock_synchronised() -> bool | None:
    """True/False from adjtimex(2) (what NTP daemons set), None when it cannot be asked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        rc = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if rc < 0:
        return None
    return rc != TIME_ERROR


class ClockTrust:
    """Whether the wall clock can be believed (SPEC §4 ``clock.trust``).

    ``always``: a board with an RTC (and tests). ``never``: for tests of the untrusted path.
    ``auto``: trusted once the kernel reports the clock synchronised since boot; it stays
    trusted after that even if the sync is later lost (the clock drifts slowly).
    """

    def __init__(self, mode: str = "auto", probe=kernel_clock_synchronised) -> None:
        self.mode = mode
        self._probe = probe
        self._latched = False
        self.source = mode

    def trusted(self) -> bool:
        if self.mode == "always":
            self.source = "config"
            return True
        if self.mode == "never":
            self.source = "config"
            return False
        if self._latched:
            return True
        synced = self._probe()
        if synced:
            self._latched = True
            self.source = "kernel"
            return True
        self.source = "unsynchronised" if synced is False else "unknown"
        return False
