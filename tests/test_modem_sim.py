"""drivers.modem: the registry entry, the sim backend and its helpers, pyserial imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import drivers
from drivers import DriverUnavailable
from drivers.modem.at import AtModem
from drivers.modem.base import (
    Modem,
    ModemNotResponding,
    ModemPortError,
    ModemTimeout,
    empty_status,
)
from drivers.modem.sim import SimModem
from tests.conftest import ROOT


def test_registry_names_both_backends_behind_one_base():
    assert list(drivers.REGISTRY["modem"]) == ["at", "sim"]
    assert drivers.resolve("modem", "at") is AtModem
    assert drivers.resolve("modem", "sim") is SimModem
    assert issubclass(AtModem, Modem) and issubclass(SimModem, Modem)
    assert AtModem.needs_port and not SimModem.needs_port
    with pytest.raises(DriverUnavailable, match="no modem backend named 'gsm'"):
        drivers.resolve("modem", "gsm")


def test_sim_answers_like_a_healthy_lte_modem():
    modem = drivers.resolve("modem", "sim")(None, baudrate=115200, timeout=5.0)
    status = modem.query()
    assert set(status) == set(empty_status())
    assert status == {"signal_dbm": -79, "rssi": 17, "ber": None, "operator": "Viettel",
                      "act": 7, "tech": "LTE", "gen": "4G", "registration": "home",
                      "registered": True, "creg": "home", "cereg": "home"}
    assert modem.queries == 1


def test_sim_helpers_change_the_answer():
    modem = SimModem()
    modem.set_signal(-107)
    modem.set_operator("VN VINAPHONE", act=2)
    modem.set_registration("roaming")
    status = modem.query()
    assert status["signal_dbm"] == -107 and status["rssi"] == 3
    assert (status["operator"], status["tech"], status["gen"]) == ("VN VINAPHONE", "UTRAN", "3G")
    assert status["registration"] == "roaming" and status["registered"] is True
    modem.set_signal(None)
    modem.set_registration("searching")
    status = modem.query()
    assert status["signal_dbm"] is None and status["rssi"] is None
    assert status["registered"] is False
    modem.set_signal(-200)
    assert modem.query()["signal_dbm"] == -113, "clamped to what CSQ can say"


def test_sim_fails_vanishes_and_recovers():
    modem = SimModem("/dev/ttyUSB2")
    modem.fail()
    with pytest.raises(ModemNotResponding):
        modem.query()
    modem.fail(ModemTimeout("AT+COPS?: no answer within the deadline"))
    with pytest.raises(ModemTimeout, match="COPS"):
        modem.query()
    modem.vanish()
    with pytest.raises(ModemPortError, match="/dev/ttyUSB2"):
        modem.query()
    modem.recover()
    assert modem.query()["registered"] is True
    with modem:
        pass
    assert modem.closed
    modem.close()  # idempotent


def test_at_backend_imports_pyserial_only_when_it_opens_the_port():
    code = ("import sys, drivers\n"
            "drivers.resolve('modem', 'at')\n"
            "assert 'serial' not in sys.modules, 'pyserial imported at module load'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_at_backend_without_pyserial_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "serial", None)  # import serial raises ImportError
    modem = AtModem(str(tmp_path / "ttyUSB2"))
    with pytest.raises(DriverUnavailable, match="pyserial"):
        modem.query()
    modem.close()
