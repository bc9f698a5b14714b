"""A sim modem: answers :meth:`SimModem.query` from its settings, with test helpers.

Chosen with ``modem.backend: sim`` (no ``modem.port`` needed). It starts healthy: -79 dBm,
Viettel, LTE, registered at home. Tests (or a demo) change what it answers:

- :meth:`SimModem.set_signal` (dBm, or None for "unknown", CSQ 99);
- :meth:`SimModem.set_operator` (name and access technology);
- :meth:`SimModem.set_registration` (``home``, ``roaming``, ``searching``, ``denied``…);
- :meth:`SimModem.fail` (queries raise, :class:`ModemNotResponding` unless told otherwise),
  :meth:`SimModem.vanish` (the port is gone: :class:`ModemPortError`), :meth:`SimModem.recover`.

Thread-safe: the agent queries from a worker while a test changes the answers.
"""

from __future__ import annotations

import threading
from typing import Any

from drivers.modem.base import (
    REGISTERED,
    Modem,
    ModemError,
    ModemNotResponding,
    ModemPortError,
    access_technology,
    empty_status,
    rssi_to_dbm,
)


class SimModem(Modem):
    name = "sim"
    needs_port = False

    def __init__(self, port: str | None = None, baudrate: int = 115200,
                 timeout: float = 5.0) -> None:
        super().__init__(port or "sim", baudrate, timeout)
        self._lock = threading.Lock()
        self._status = empty_status()
        self._error: ModemError | None = None
        self.queries = 0  # how many times query() was called (answered or not)
        self.closed = False
        self.set_signal(-79)
        self.set_operator("Viettel", act=7)
        self.set_registration("home")

    def query(self) -> dict[str, Any]:
        with self._lock:
            self.queries += 1
            self.closed = False
            if self._error is not None:
                raise self._error
            return dict(self._status)

    def close(self) -> None:
        self.closed = True

    # --- test helpers ---------------------------------------------------------------------

    def set_signal(self, dbm: int | None, ber: int | None = None) -> None:
        """Signal as a modem reports it: ``dbm`` is rounded to the nearest CSQ step (2 dB,
        -113 to -51); None is "unknown" (CSQ 99)."""
        rssi = None if dbm is None else max(0, min(31, round((dbm + 113) / 2)))
        with self._lock:
            self._status.update(rssi=rssi, ber=ber, signal_dbm=rssi_to_dbm(rssi))

    def set_operator(self, operator: str | None, act: int | None = 7) -> None:
        """Operator name (None: none) and 27.007 access technology (7 LTE, 2 UTRAN, 0 GSM…)."""
        with self._lock:
            self._status.update(operator=operator, **access_technology(act))

    def set_registration(self, registration: str | None) -> None:
        """``home``, ``roaming``, ``searching``, ``denied``, ``not_registered``… (the names of
        :data:`drivers.modem.base.REGISTRATION_NAMES`), for both +CREG and +CEREG."""
        with self._lock:
            self._status.update(registration=registration, creg=registration,
                                cereg=registration, registered=registration in REGISTERED)

    def fail(self, error: ModemError | None = None) -> None:
        """Every query raises ``error`` (default: the modem does not answer) until
        :meth:`recover`."""
        with self._lock:
            self._error = error or ModemNotResponding(f"modem on {self.port} does not answer AT")

    def vanish(self) -> None:
        """The port is gone, as an unplugged USB modem's: queries raise ModemPortError."""
        self.fail(ModemPortError(f"modem port {self.port} lost: unplugged"))

    def recover(self) -> None:
        """Answer again, with the settings as they are."""
        with self._lock:
            self._error = None
