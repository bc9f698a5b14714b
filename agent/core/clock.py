"""Clocks: the wall clock (epoch milliseconds) and a monotonic clock, injectable for tests.

Domain logic (arbitration, scheduling, alerts) takes a :class:`Clock` so tests can drive weeks
of time in milliseconds with :class:`FakeClock`, without sleeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, milliseconds since the Unix epoch (UTC)."""

    def monotonic(self) -> float:
        """Monotonic seconds; only differences mean anything."""


TEST_OFFSET_ENV = "TTCS_TEST_CLOCK_OFFSET_MS"


class SystemClock:
    """The machine's clocks.

    TEST ONLY: when the environment variable ``TTCS_TEST_CLOCK_OFFSET_MS`` is set, the wall
    clock is shifted by that many milliseconds (so that a real agent process in a test can
    have a schedule slot a few seconds ahead although slot times are whole minutes). It is
    logged as a warning at start; never set it on a device.
    """

    def __init__(self) -> None:
        self.offset_ms = _test_offset_ms()

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def monotonic(self) -> float:
        return time.monotonic()


def _test_offset_ms() -> int:
    raw = os.environ.get(TEST_OFFSET_ENV)
    if not raw:
        return 0
    try:
        offset = int(raw)
    except ValueError:
        log.error("%s=%r is not an integer: ignored", TEST_OFFSET_ENV, raw)
        return 0
    if offset not in _warned_offsets:  # once per process, however many clocks are made
        _warned_offsets.add(offset)
        log.warning("TEST CLOCK: the wall clock is shifted by %+d ms (%s is set; never on a "
                    "device)", offset, TEST_OFFSET_ENV)
    return offset


_warned_offsets: set[int] = set()


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


TIMESYNCD_FLAG = "/run/systemd/timesync/synchronized"


def chrony_synchronised(chronyc: str | None = None, timeout_s: float = 0.5) -> bool | None:
    """True when ``chronyc -n tracking`` reports ``Leap status : Normal`` (chrony has a
    source and has set the clock), False for any other leap status (``Not synchronised``),
    None when chrony is not installed or does not answer within ``timeout_s``."""
    binary = chronyc or shutil.which("chronyc")
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-n", "tracking"], capture_output=True, text=True,
                             timeout=timeout_s, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "leap status":
            return value.strip().lower() == "normal"
    return None


class SystemSyncProbe:
    """Asks every source a Raspberry Pi OS image may have whether the clock is synchronised.

    In order: the kernel (adjtimex: ntpd, chrony with rtcsync and systemd-timesyncd clear
    STA_UNSYNC), systemd-timesyncd's flag file ``/run/systemd/timesync/synchronized`` (created
    at its first sync since boot; /run is a tmpfs) and chrony (``chronyc -n tracking``, a
    subprocess that may take up to 0.5 s: asked at most every ``chrony_every_s``, in the
    background — ``spawn`` runs it, by default on a short-lived thread — so that a caller on the
    core thread never waits for it; the latest answer is used). Returns ``(synced, source)``:
    ``(True, "kernel"|"timesyncd"|"chrony")``, ``(False, "unsynchronised")`` when a source
    answered no, ``(None, "unknown")`` when none could be asked.
    """

    def __init__(self, *, kernel: Callable[[], bool | None] = kernel_clock_synchronised,
                 timesyncd_flag: str = TIMESYNCD_FLAG,
                 chrony: Callable[[], bool | None] = chrony_synchronised,
                 chrony_every_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 spawn: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._kernel = kernel
        self._flag = timesyncd_flag
        self._chrony = chrony
        self._chrony_every_s = chrony_every_s
        self._monotonic = monotonic
        self._spawn = spawn or _spawn_daemon
        self._chrony_at: float | None = None
        self._chrony_last: bool | None = None
        self._chrony_busy = False

    def __call__(self) -> tuple[bool | None, str]:
        answers = [self._kernel()]
        if answers[0]:
            return True, "kernel"
        if os.path.exists(self._flag):
            return True, "timesyncd"
        answers.append(self._ask_chrony())
        if answers[-1]:
            return True, "chrony"
        if False in answers:
            return False, "unsynchronised"
        return None, "unknown"

    def _ask_chrony(self) -> bool | None:
        now = self._monotonic()
        due = self._chrony_at is None or now - self._chrony_at >= self._chrony_every_s
        if due and not self._chrony_busy:
            self._chrony_at = now
            self._chrony_busy = True
            self._spawn(self._refresh_chrony)
        return self._chrony_last

    def _refresh_chrony(self) -> None:
        try:
            self._chrony_last = self._chrony()
        finally:
            self._chrony_busy = False


def _spawn_daemon(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="chronyc", daemon=True).start()


class ClockTrust:
    """Whether the wall clock can be believed (SPEC §4 ``clock.trust``).

    ``always``: a board with an RTC (and tests). ``never``: for tests of the untrusted path.
    ``auto``: trusted once the clock is reported synchronised since boot (by the kernel,
    systemd-timesyncd or chrony: :class:`SystemSyncProbe`); it stays trusted after that even if
    the sync is later lost (the clock drifts slowly).

    ``probe`` returns True/False/None (None: cannot tell), or a ``(synced, source)`` pair
    whose source names who said so (``source`` then reports it).
    """

    def __init__(self, mode: str = "auto",
                 probe: Callable[[], bool | tuple[bool | None, str] | None] | None = None,
                 ) -> None:
        self.mode = mode
        self._probe = probe if probe is not None else SystemSyncProbe()
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
        answer = self._probe()
        synced, source = answer if isinstance(answer, tuple) else (answer, "kernel")
        if synced:
            self._latched = True
            self.source = source
            return True
        self.source = "unsynchronised" if synced is False else "unknown"
        return False
