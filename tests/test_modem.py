"""drivers.modem.at against a scripted fake modem on a pty, opened by the real pyserial."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers import DriverError
from drivers.modem.at import (
    AtModem,
    is_solicited_registration,
    parse_cops,
    parse_csq,
    parse_registration,
)
from drivers.modem.base import ModemError, ModemPortError, ModemTimeout, rssi_to_dbm

# A reply is a list of steps: str = a line sent as "\r\n<line>\r\n", bytes = sent raw,
# float = a pause in seconds. None = the command is never answered.
Script = dict[str, list | None]

HEALTHY: Script = {
    "AT": ["OK"],
    "AT+CSQ": [0.3, "+CSQ: 17,99", "", "OK"],
    "AT+COPS?": ['+COPS: 0,0,"Viettel",7', "OK"],
    "AT+CREG?": ["+CREG: 0,1", "OK"],
    "AT+CEREG?": ['+CEREG: 2,1,"1A2B","01C2D3E4",7', "OK"],
}


class FakeModem:
    """Answers AT commands on the master side of a pty, like a USB modem's AT port."""

    def __init__(self, script: Script, echo: bool = True) -> None:
        self.script = dict(script)
        self.echo = echo
        self.received: list[str] = []
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        with self._lock:
            os.write(self.master, data)

    def line(self, text: str) -> None:
        self.send(b"\r\n" + text.encode() + b"\r\n")

    def stop(self) -> None:
        """Stop answering and remove the port, as an unplugged USB modem does."""
        self._stop.set()
        self._thread.join(2)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 1024)
            except OSError:
                return
            buf += chunk
            while b"\r" in buf:
                raw, _, buf = buf.partition(b"\r")
                cmd = raw.decode(errors="replace").strip()
                if cmd:
                    self._answer(cmd)

    def _answer(self, cmd: str) -> None:
        self.received.append(cmd)
        if self.echo:
            self.send(cmd.encode() + b"\r")
        if cmd.upper() in ("ATE0", "ATE1"):
            self.echo = cmd.upper() == "ATE1"
            self.line("OK")
            return
        reply = self.script.get(cmd, ["ERROR"])
        if reply is None:
            return
        for step in reply:
            if isinstance(step, float):
                time.sleep(step)
            elif isinstance(step, bytes):
                self.send(step)
            elif step:
                self.line(step)


@pytest.fixture
def fake_factory() -> Iterator:
    made: list[FakeModem] = []

    def make(script: Script = HEALTHY, echo: bool = True) -> FakeModem:
        fake = FakeModem(script, echo)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


EXPECTED_HEALTHY = {
    "signal_dbm": -79, "rssi": 17, "ber": None, "operator": "Viettel", "act": 7, "tech": "LTE",
    "gen": "4G", "registration": "home", "registered": True, "creg": "home", "cereg": "home",
}


@pytest.mark.parametrize("echo", [True, False])
def test_query_through_slow_answer_urcs_and_garbage(fake_factory, echo):
    script = dict(HEALTHY)
    # slow, with a URC in the middle, then a garbled line, then the answer
    script["AT+CSQ"] = [0.4, "+CREG: 1", "RING", b"\r\n\xff\xfe@\x00#\r\n", "+CSQ: 17,99",
                        "^RSSI:18", "OK"]
    fake = fake_factory(script, echo=echo)
    with AtModem(fake.path, timeout=2.0) as modem:
        assert modem.query() == EXPECTED_HEALTHY
        assert "RING" in modem.urcs and "+CREG: 1" in modem.urcs and "^RSSI:18" in modem.urcs
    assert fake.received[0] == "AT"  # the first exchange synchronises
    assert fake.received[1:] == ["AT+CSQ", "AT+COPS?", "AT+CREG?", "AT+CEREG?"]


def test_command_never_answered_times_out_and_next_command_works(fake_factory):
    script = dict(HEALTHY)
    script["AT+COPS?"] = None
    fake = fake_factory(script)
    with AtModem(fake.path, timeout=0.5) as modem:
        start = time.monotonic()
        with pytest.raises(ModemTimeout):
            modem.command("AT+COPS?", expect="+COPS:")
        assert 0.5 <= time.monotonic() - start < 3.0
        assert modem.command("AT+CSQ", expect="+CSQ:") == ["+CSQ: 17,99"]
        # the unanswered field is None, the others are still reported
        result = modem.query()
    assert result["operator"] is None and result["signal_dbm"] == -79 and result["registered"]


def test_late_answer_to_a_timed_out_command_is_not_taken_for_the_next_one(fake_factory):
    script = dict(HEALTHY)
    script["AT+COPS?"] = [0.8, '+COPS: 0,0,"Mobifone",2', "OK"]  # later than the deadline
    fake = fake_factory(script)
    with AtModem(fake.path, timeout=0.5) as modem:
        modem.command("AT")
        with pytest.raises(ModemTimeout):
            modem.command("AT+COPS?", expect="+COPS:")
        time.sleep(0.1)  # the late answer arrives while the next exchange is under way
        assert modem.command("AT+CSQ", expect="+CSQ:") == ["+CSQ: 17,99"]
        assert modem.command("AT+CREG?", expect="+CREG:") == ["+CREG: 0,1"]


def test_error_results_raise_modem_error_and_partial_support_is_tolerated(fake_factory):
    script = dict(HEALTHY)
    script["AT+CEREG?"] = ["ERROR"]  # a 3G-only stick
    script["AT+COPS?"] = ["+CME ERROR: 30"]  # no network service
    script["AT+CREG?"] = ['+CREG: 0,5,"00C3","0010AAD1",2', "OK"]
    fake = fake_factory(script)
    with AtModem(fake.path, timeout=1.0) as modem:
        with pytest.raises(ModemError, match=r"\+CME ERROR: 30"):
            modem.command("AT+COPS?", expect="+COPS:")
        result = modem.query()
    assert result["operator"] is None and result["cereg"] is None
    assert result["registration"] == "roaming" and result["registered"] is True
    assert isinstance(ModemError("x"), DriverError)


def test_silent_modem_raises_timeout_from_query(fake_factory):
    fake = fake_factory({key: None for key in HEALTHY})
    with AtModem(fake.path, timeout=0.3) as modem, pytest.raises(ModemTimeout):
        modem.query()


def test_reconnects_when_the_port_vanishes_and_comes_back(fake_factory, tmp_path: Path):
    link = tmp_path / "ttyModem"  # like a udev symlink that follows re-enumeration
    first = fake_factory()
    link.symlink_to(first.path)
    with AtModem(str(link), timeout=1.0) as modem:
        assert modem.query()["signal_dbm"] == -79
        first.stop()  # unplugged
        with pytest.raises(ModemPortError):
            modem.query()
        link.unlink()
        with pytest.raises(ModemPortError, match="cannot open"):
            modem.query()
        script = dict(HEALTHY)
        script["AT+CSQ"] = ["+CSQ: 25,0", "OK"]
        second = fake_factory(script)
        link.symlink_to(second.path)
        assert modem.query()["signal_dbm"] == -63
        assert modem.reconnects == 1


def test_missing_port_is_a_modem_error_not_a_crash(tmp_path):
    modem = AtModem(str(tmp_path / "ttyUSB9"))
    with pytest.raises(ModemPortError):
        modem.query()
    modem.close()
    modem.close()  # idempotent


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("rssi, dbm", [(0, -113), (1, -111), (17, -79), (31, -51), (99, None),
                                       (None, None), (32, None)])
def test_rssi_to_dbm(rssi, dbm):
    assert rssi_to_dbm(rssi) == dbm


def test_parse_csq():
    assert parse_csq("+CSQ: 99,99") == {"rssi": None, "ber": None, "signal_dbm": None}
    assert parse_csq("+CSQ: 5,3") == {"rssi": 5, "ber": 3, "signal_dbm": -103}
    with pytest.raises(ModemError):
        parse_csq("+CSQ: garbage")


@pytest.mark.parametrize("line, operator, tech, gen", [
    ('+COPS: 0,0,"Viettel",7', "Viettel", "LTE", "4G"),
    ('+COPS: 0,0,"VN VINAPHONE",2', "VN VINAPHONE", "UTRAN", "3G"),
    ('+COPS: 0,2,"45204",0', "45204", "GSM", "2G"),
    ('+COPS: 1,0,"Vietnamobile"', "Vietnamobile", None, None),
    ("+COPS: 0", None, None, None),
])
def test_parse_cops(line, operator, tech, gen):
    parsed = parse_cops(line)
    assert (parsed["operator"], parsed["tech"], parsed["gen"]) == (operator, tech, gen)


@pytest.mark.parametrize("line, solicited", [
    ("+CREG: 0,1", True), ('+CEREG: 2,5,"1A2B","01C2D3E4",7', True), ("+CREG: 1", False),
    ('+CREG: 1,"00C3","0010AAD1",7', False),
])
def test_registration_answer_told_apart_from_urc(line, solicited):
    assert is_solicited_registration(line) is solicited


@pytest.mark.parametrize("stat, name", [(0, "not_registered"), (1, "home"), (2, "searching"),
                                        (3, "denied"), (4, "unknown"), (5, "roaming"),
                                        (42, "unknown_42")])
def test_registration_names(stat, name):
    assert parse_registration(f"+CREG: 0,{stat}")["registration"] == name
