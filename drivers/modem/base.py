"""Modem backends: what the agent asks of a 3G/4G modem, and the errors every backend raises.

A modem is asked for its status with :meth:`Modem.query`, which returns the same keys from
every backend (:func:`empty_status`): ``signal_dbm``, ``rssi``, ``ber``, ``operator``, ``act``,
``tech``, ``gen``, ``registration``, ``registered``, ``creg``, ``cereg`` — the ``modem``
health field (docs/HEALTH.md). A field the modem does not give is None.

Blocking, thread-free: call :meth:`Modem.query` from a worker, never from the core thread (a
dead modem can hold a call for seconds). Backends: ``at`` (:mod:`drivers.modem.at`, a real
modem's AT port) and ``sim`` (:mod:`drivers.modem.sim`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from drivers import DriverError


class ModemError(DriverError):
    """The modem answered with an error, or could not be asked."""


class ModemTimeout(ModemError):
    """No final result code within the deadline."""


class ModemNotResponding(ModemTimeout):
    """Not even a plain ``AT`` is answered: the modem is hung or booting."""


class ModemPortError(ModemError):
    """The serial port is missing or was lost (unplugged, re-enumerating)."""


# 3GPP TS 27.007 registration <stat> -> name
REGISTRATION_NAMES: dict[int, str] = {
    0: "not_registered", 1: "home", 2: "searching", 3: "denied", 4: "unknown", 5: "roaming",
    6: "home_sms_only", 7: "roaming_sms_only", 8: "emergency_only",
    9: "home_csfb_not_preferred", 10: "roaming_csfb_not_preferred",
}
REGISTERED = ("home", "roaming", "home_sms_only", "roaming_sms_only",
              "home_csfb_not_preferred", "roaming_csfb_not_preferred")

# 3GPP TS 27.007 <AcT> -> (technology, generation)
ACCESS_TECHNOLOGIES: dict[int, tuple[str, str]] = {
    0: ("GSM", "2G"), 1: ("GSM Compact", "2G"), 2: ("UTRAN", "3G"), 3: ("EDGE", "2G"),
    4: ("HSDPA", "3G"), 5: ("HSUPA", "3G"), 6: ("HSPA", "3G"), 7: ("LTE", "4G"),
    8: ("EC-GSM-IoT", "2G"), 9: ("NB-IoT", "4G"), 10: ("LTE-5GC", "4G"), 11: ("NR-5GC", "5G"),
    12: ("NG-RAN", "5G"), 13: ("EN-DC", "5G"),
}


def empty_status() -> dict[str, Any]:
    """The answer of :meth:`Modem.query` before anything is known."""
    return {
        "signal_dbm": None, "rssi": None, "ber": None, "operator": None, "act": None,
        "tech": None, "gen": None, "registration": None, "registered": False,
        "creg": None, "cereg": None,
    }


def access_technology(act: int | None) -> dict[str, Any]:
    """``act`` with its technology and generation: 7 -> LTE, 4G."""
    tech, gen = ACCESS_TECHNOLOGIES.get(act, (None, None)) if act is not None else (None, None)
    return {"act": act, "tech": tech, "gen": gen}


def rssi_to_dbm(rssi: int | None) -> int | None:
    """27.007 +CSQ <rssi>: 0 = -113 dBm or less, 31 = -51 dBm or more, 99 = unknown."""
    if rssi is None or not 0 <= rssi <= 31:
        return None
    return -113 + 2 * rssi


class Modem(ABC):
    """Base of every modem backend, built as ``cls(port, baudrate=, timeout=)`` from the
    ``modem:`` config section (``port``, ``baudrate``, ``timeout_s``).

    ``needs_port``: whether the backend can only run with ``modem.port`` set; the agent asks
    no modem when it is not (a cabinet without one).
    """

    name = "abstract"
    needs_port = True

    def __init__(self, port: str | None = None, baudrate: int = 115200,
                 timeout: float = 5.0) -> None:
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout

    @abstractmethod
    def query(self) -> dict[str, Any]:
        """Signal, operator, technology and registration (the keys of :func:`empty_status`).

        Raises :class:`ModemPortError` when the port is gone and :class:`ModemTimeout` when the
        modem answers nothing; the caller then reports ``modem: null`` in health.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the port. Idempotent; the next :meth:`query` opens it again."""

    def __enter__(self) -> Modem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
