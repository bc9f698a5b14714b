"""3G/4G modem status over its AT command port (signal, operator, access technology, registration).

Only reads status; it never changes the modem's settings, so it can share the modem with
ModemManager or pppd as long as it has an AT port of its own (e.g. /dev/ttyUSB2 on most
Quectel/Huawei/SIMCom sticks, /dev/ttyUSB3 or ttyACM* on others).

Real modems are untidy, and every case below has been seen in the field:
- echo may be on or off (``ATE1``/``ATE0``); with echo on, anything before the echo of our own
  command is a stale answer to an earlier one and is dropped;
- unsolicited result codes (``RING``, ``+CREG: 1``, ``^RSSI:17``, ``+CMTI:…``) arrive between
  the lines of an answer; they are kept in :attr:`AtModem.urcs` and otherwise ignored;
- answers can take seconds (``AT+COPS?`` while searching), lines can be garbled by a noisy USB
  link, and a command can go unanswered: each exchange has a deadline (:class:`ModemTimeout`),
  and the next exchange first re-synchronises with a plain ``AT``;
- USB modems re-enumerate after a crash or firmware reset: the port vanishes, the next call
  reopens it (:class:`ModemPortError` while it is away).

Blocking, thread-free: call :meth:`AtModem.query` from a worker or an executor, never from the
thread that drives audio (a dead modem can hold a call for ``timeout`` seconds per command).

pyserial is imported when the port is first opened (:class:`drivers.DriverUnavailable` when it
is missing), so choosing another backend costs nothing. pyserial's ``SerialException`` is an
``OSError``: ``except OSError`` below catches both.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from drivers import DriverUnavailable
from drivers.modem.base import (
    REGISTERED,
    REGISTRATION_NAMES,
    Modem,
    ModemError,
    ModemNotResponding,
    ModemPortError,
    ModemTimeout,
    access_technology,
    empty_status,
    rssi_to_dbm,
)

if TYPE_CHECKING:
    import serial

log = logging.getLogger(__name__)


ERROR_FINALS = ("ERROR", "+CME ERROR", "+CMS ERROR", "NO CARRIER", "BUSY", "NO ANSWER",
                "NO DIALTONE", "COMMAND NOT SUPPORT")
URC_PREFIXES = (
    "RING", "+CRING", "+CLIP", "+CMTI", "+CDSI", "+CMT:", "+CIEV", "+CUSD", "+CGEV", "+QIND",
    "+NITZ", "+CTZV", "+CTZE", "*PSUTTZ", "+PBREADY", "RDY", "+STIN", "+CPIN: NOT READY",
    "^RSSI", "^HCSQ", "^MODE", "^BOOT", "^SRVST", "^SIMST", "^SYSSTART", "^CEND", "^ORIG",
    "^CONF", "^CONN", "^NWTIME", "^DSFLOWRPT",
)
# Registration reports that are also URCs when ``+CxREG=1/2`` is set. The solicited answer to
# ``AT+CREG?`` is "+CREG: <n>,<stat>[,...]", whose second field is an unquoted number; the URC is
# "+CREG: <stat>[,"<lac>","<ci>"...]": one field, or a quoted second one.
REGISTRATION_PREFIXES = ("+CREG:", "+CGREG:", "+CEREG:", "+C5GREG:")

READ_SLICE_S = 0.05  # serial read timeout: how often the deadline is checked
RESYNC_TIMEOUT_S = 2.0
SETTLE_QUIET_S = 0.2


# --- parsing (pure functions) ---------------------------------------------------------------

def _fields(line: str) -> list[str]:
    """Comma-separated fields after "+XXX:", quotes kept, commas inside quotes respected."""
    _, _, rest = line.partition(":")
    return [f.strip() for f in re.findall(r'"[^"]*"|[^,]+', rest)]


def _int(field: str) -> int | None:
    try:
        return int(field)
    except ValueError:
        return None


def parse_csq(line: str) -> dict[str, int | None]:
    """'+CSQ: 17,99' -> {"rssi": 17, "ber": None, "signal_dbm": -79}."""
    fields = _fields(line)
    if not line.startswith("+CSQ:") or len(fields) < 2:
        raise ModemError(f"unexpected +CSQ answer {line!r}")
    rssi, ber = _int(fields[0]), _int(fields[1])
    if rssi is None:
        raise ModemError(f"unexpected +CSQ answer {line!r}")
    return {
        "rssi": None if rssi == 99 else rssi,
        "ber": None if ber is None or ber == 99 else ber,
        "signal_dbm": rssi_to_dbm(rssi),
    }


def parse_cops(line: str) -> dict[str, Any]:
    """'+COPS: 0,0,"Viettel",7' -> operator "Viettel", act 7 (LTE, 4G); '+COPS: 0' -> none."""
    fields = _fields(line)
    if not line.startswith("+COPS:") or not fields:
        raise ModemError(f"unexpected +COPS answer {line!r}")
    operator = fields[2].strip('"') if len(fields) >= 3 else None
    act = _int(fields[3]) if len(fields) >= 4 else None
    return {"operator": operator or None, **access_technology(act)}


def is_solicited_registration(line: str) -> bool:
    """True for the answer to ``AT+CREG?`` (n,stat,...), False for a +CREG URC (stat,...)."""
    fields = _fields(line)
    return len(fields) >= 2 and not fields[1].startswith('"') and _int(fields[1]) is not None


def parse_registration(line: str) -> dict[str, Any]:
    """'+CEREG: 2,1,"1A2B","01C2D3E4",7' -> {"stat": 1, "registration": "home", "act": 7}."""
    fields = _fields(line)
    if not is_solicited_registration(line):
        raise ModemError(f"unexpected registration answer {line!r}")
    stat = _int(fields[1])
    act = _int(fields[4]) if len(fields) >= 5 else None
    return {"stat": stat, "registration": REGISTRATION_NAMES.get(stat, f"unknown_{stat}"),
            "act": act}


# --- the port ---------------------------------------------------------------------------------

def _open_serial(port: str, baudrate: int, timeout: float) -> serial.SerialBase:
    """Open ``port`` (a device or a pyserial URL) with pyserial, imported here and only here."""
    try:
        import serial
    except ImportError as e:
        raise DriverUnavailable(f"pyserial is not installed (pip install pyserial): {e}") from e
    try:
        return serial.serial_for_url(port, baudrate=baudrate, timeout=READ_SLICE_S,
                                     write_timeout=timeout)
    except (OSError, ValueError) as e:
        raise ModemPortError(f"cannot open modem port {port}: {e}") from e


class AtModem(Modem):
    """AT status queries on one serial port or pyserial URL (``/dev/ttyUSB2``, ``loop://``, ...)."""

    name = "at"

    def __init__(self, port: str, baudrate: int = 115200, timeout: float = 5.0, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(port, baudrate, timeout)
        self._monotonic = monotonic
        self._ser: serial.SerialBase | None = None
        self._buf = bytearray()
        self._desync = False        # a command went unanswered: resynchronise first
        self._echo: bool | None = None  # learnt from the answers; None until known
        self.urcs: deque[str] = deque(maxlen=50)
        self.reconnects = 0
        self._opened_once = False

    # lifecycle

    def open(self) -> None:
        if self._ser is not None:
            return
        self._ser = _open_serial(self.port, self.baudrate, self.timeout)
        if self._opened_once:
            self.reconnects += 1
            log.info("modem port %s reopened", self.port)
        self._opened_once = True
        self._buf.clear()
        self._desync = True  # whatever the modem was doing, start from a clean exchange

    def close(self) -> None:
        """Idempotent."""
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.close()
            except OSError:
                pass

    # exchanges

    def command(self, cmd: str, *, expect: str | None = None,
                timeout: float | None = None) -> list[str]:
        """Send ``cmd``; return its information lines (those starting with ``expect`` if given).

        Raises ModemError on an error result, ModemTimeout without a final result in time,
        ModemPortError when the port is missing or lost.
        """
        self.open()
        if self._desync:
            self._resync()
        return self._exchange(cmd, expect, self.timeout if timeout is None else timeout)

    def query(self) -> dict[str, Any]:
        """Signal, operator, technology and registration. A field the modem refuses is None.

        Raises ModemPortError when the port is gone and ModemTimeout when the modem answers
        nothing at all (that costs at most ``timeout`` + RESYNC_TIMEOUT_S); the caller then
        reports ``modem: null`` in health.
        """
        result = empty_status()
        for part in (self._query_signal, self._query_operator, self._query_registration):
            try:
                result.update(part())
            except (ModemPortError, ModemNotResponding):
                raise
            except ModemError as e:  # this field only; a timeout resynchronises on the next
                log.warning("modem: %s", e)
        return result

    # query parts

    def _query_signal(self) -> dict[str, Any]:
        return parse_csq(self._one("AT+CSQ", "+CSQ:"))

    def _query_operator(self) -> dict[str, Any]:
        # may take seconds while the modem scans; give it the full timeout
        return parse_cops(self._one("AT+COPS?", "+COPS:"))

    def _query_registration(self) -> dict[str, Any]:
        regs: dict[str, dict[str, Any]] = {}
        for name, prefix in (("creg", "+CREG:"), ("cereg", "+CEREG:")):
            cmd = f"AT{prefix[:-1]}?"
            try:
                regs[name] = parse_registration(self._one(cmd, prefix))
            except (ModemPortError, ModemNotResponding):
                raise
            except ModemError as e:  # e.g. +CEREG is ERROR on a 2G/3G-only modem
                log.debug("modem: %s", e)
        if not regs:
            raise ModemError("neither AT+CREG? nor AT+CEREG? answered")
        # LTE-only networks leave +CREG unregistered while +CEREG is home: prefer a registered one
        best = next((r for r in (regs.get("cereg"), regs.get("creg"))
                     if r and r["registration"] in REGISTERED), None)
        best = best or regs.get("creg") or regs["cereg"]
        out: dict[str, Any] = {
            "creg": regs["creg"]["registration"] if "creg" in regs else None,
            "cereg": regs["cereg"]["registration"] if "cereg" in regs else None,
            "registration": best["registration"],
            "registered": best["registration"] in REGISTERED,
        }
        return out

    def _one(self, cmd: str, prefix: str) -> str:
        lines = self.command(cmd, expect=prefix)
        if not lines:
            raise ModemError(f"{cmd}: no {prefix} line in the answer")
        return lines[-1]

    # internals

    def _resync(self) -> None:
        """After a timeout or (re)open: a plain AT, then drop whatever trails it.

        A late answer to the command that timed out may still be on its way; with echo on it
        arrives before the echo of our AT and is dropped, with echo off it may be taken for the
        AT's answer, and the AT's own OK then arrives during the settle and is dropped there.
        """
        try:
            self._exchange("AT", None, RESYNC_TIMEOUT_S)
        except ModemTimeout as e:
            self._echo = None  # perhaps the echo setting changed (a modem reset): relearn it
            raise ModemNotResponding(f"modem on {self.port} does not answer AT") from e
        except ModemError as e:
            log.debug("modem resync: %s", e)
        self._settle()
        self._desync = False

    def _settle(self, quiet_s: float = SETTLE_QUIET_S) -> None:
        """Read until the line has been quiet for ``quiet_s`` (at most RESYNC_TIMEOUT_S)."""
        limit = self._monotonic() + RESYNC_TIMEOUT_S
        quiet_until = self._monotonic() + quiet_s
        while (now := self._monotonic()) < quiet_until and now < limit:
            chunk = self._read()
            if chunk:
                self._buf += chunk
                quiet_until = self._monotonic() + quiet_s
        self._drain()

    def _exchange(self, cmd: str, expect: str | None, timeout: float) -> list[str]:
        self._drain()
        self._write((cmd + "\r").encode("ascii"))
        deadline = self._monotonic() + timeout
        info: list[str] = []
        echoed = False
        while True:
            line = self._readline(deadline, cmd)
            if line.upper() == cmd.upper():
                echoed, self._echo = True, True
                info.clear()  # anything before our echo answered an earlier command
                continue
            if self._echo and not echoed:
                if self._is_urc(line, None):
                    self.urcs.append(line)
                else:
                    log.debug("modem: stale line before echo: %r", line)
                continue
            if line == "OK":
                if not echoed:
                    self._echo = False
                return info
            if line.startswith(ERROR_FINALS):
                raise ModemError(f"{cmd}: {line}")
            if self._is_urc(line, expect):
                self.urcs.append(line)
            elif expect is None or line.startswith(expect):
                info.append(line)
            else:
                log.debug("modem: ignored line %r during %s", line, cmd)

    @staticmethod
    def _is_urc(line: str, expect: str | None) -> bool:
        if line.startswith(REGISTRATION_PREFIXES):
            return not (expect and line.startswith(expect) and is_solicited_registration(line))
        return line.startswith(URC_PREFIXES)

    def _readline(self, deadline: float, cmd: str) -> str:
        """The next non-empty line; CR and LF both end a line (echo ends with CR alone)."""
        while True:
            line = self._pop_line()
            if line is not None:
                return line
            if self._monotonic() >= deadline:
                self._desync = True
                raise ModemTimeout(f"{cmd}: no answer within the deadline")
            self._buf += self._read()

    def _pop_line(self) -> str | None:
        while True:
            match = re.search(rb"[\r\n]", self._buf)
            if match is None:
                return None
            raw = bytes(self._buf[:match.start()])
            del self._buf[:match.end()]
            line = raw.decode("ascii", errors="replace").strip()
            if line:
                return line

    def _drain(self) -> None:
        """Take in what is already waiting (URCs, stale answers) without waiting for more."""
        try:
            waiting = self._port().in_waiting
        except OSError as e:
            self._lost(e)
        if waiting:
            self._buf += self._read()
        while (line := self._pop_line()) is not None:
            if self._is_urc(line, None):
                self.urcs.append(line)
            else:
                log.debug("modem: dropped stale line %r", line)

    def _read(self) -> bytes:
        ser = self._port()
        try:
            return ser.read(max(1, ser.in_waiting))
        except OSError as e:
            self._lost(e)

    def _write(self, data: bytes) -> None:
        try:
            self._port().write(data)
            self._port().flush()
        except OSError as e:
            self._lost(e)

    def _port(self) -> serial.SerialBase:
        if self._ser is None:
            raise ModemPortError(f"modem port {self.port} is closed")
        return self._ser

    def _lost(self, e: Exception) -> NoReturn:
        self.close()
        raise ModemPortError(f"modem port {self.port} lost: {e}") from e
