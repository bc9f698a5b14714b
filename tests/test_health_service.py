"""agent.health.service: cabinet inputs, system sampling and the modem wired into the core.

In-process tests drive a real core (tests/fakes.py) on a FakeClock with SimGPIO pins and a
scripted fake modem on a pty (or the sim modem); the last test runs the agent as a process against mosquitto.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import render_status
from agent.core.clock import FakeClock
from agent.health import service as health_service
from drivers.gpio import SIM_INPUTS_ENV, SimGPIO
from drivers.modem.sim import SimModem
from tests.conftest import ROOT, Broker, Watcher, agent_config, wait_online, wait_until
from tests.fakes import make_core
from tests.test_modem import HEALTHY, FakeModem

DOOR, MAINS, AMP = 17, 27, 22
CABINET = {"door": {"pin": DOOR, "debounce_ms": 200},
           "mains": {"pin": MAINS, "active_low": False, "pull": "down", "debounce_ms": 500}}


class Rig:
    """A core with the health service installed, driven by a FakeClock."""

    def __init__(self, tmp_path: Path, extra: dict | None = None,
                 sampler: Callable[[dict], dict] | None = None) -> None:
        self.clock = FakeClock()
        self.core = make_core(tmp_path, clock=self.clock,
                              extra={"cabinet": CABINET, **(extra or {})})
        self.core.link.connect()
        self.samples: list[dict] = []
        self.gpio = SimGPIO()
        self.service = health_service.HealthService(
            self.core, self.core.cfg, gpio=self.gpio, sample_system=sampler or self._sample)
        self.service.start()
        self.gpio.drive(MAINS, True)  # mains present unless a test cuts it
        self.system = {"cpu_temp_c": 50.0, "disk_free_mb": {"state": 5000, "cache": 5000}}
        self.settle()

    def _sample(self, paths: dict) -> dict:
        self.samples.append(paths)
        return dict(self.system)

    def settle(self, timeout: float = 20.0) -> None:
        """Run the core until no worker (system sample, modem query) is in flight."""
        end = time.monotonic() + timeout
        while True:
            self.core.run_pending()
            if not (self.service._sampling or self.service._modem_busy):
                return
            assert time.monotonic() < end, "worker did not finish"
            time.sleep(0.005)

    def advance(self, seconds: float, step: float = 0.2) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.settle()

    def alerts(self, code: str | None = None) -> list[dict]:
        return [e for e in self.core.link.json("/event")
                if e["type"] == "alert" and (code is None or e["code"] == code)]

    def health(self) -> dict:
        self.core.link.published.clear()
        self.service.send_health()
        wait_until(lambda: self.settle() or self.core.link.json("/health"), 20, what="health")
        return self.core.link.json("/health")[-1]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.service.stop()


def test_door_open_raised_after_debounce_and_cleared_after_close(rig):
    alerts = rig.core.cfg["alerts"]
    opened_ms = rig.clock.now_ms() + 400  # first poll sees it at +0.2 s, debounced at +0.4 s
    rig.gpio.drive(DOOR, False)  # active low: the switch opens to ground = door open
    rig.advance(alerts["raise_after_s"])
    assert rig.alerts() == []  # 0.2 s debounce + 5 s alert debounce not yet over
    rig.advance(0.6)
    [raised] = rig.alerts("door_open")
    assert raised["state"] == "raised" and raised["since"] == opened_ms
    assert raised["detail"] == {"input": "door", "pin": DOOR}
    assert [a["code"] for a in rig.core.snapshot()["alerts"]] == ["door_open"]
    rig.gpio.drive(DOOR, True)
    rig.advance(alerts["clear_after_s"])
    assert len(rig.alerts()) == 1
    rig.advance(1.0)
    assert [a["state"] for a in rig.alerts("door_open")] == ["raised", "cleared"]
    assert rig.core.snapshot()["alerts"] == []


def test_mains_lost_with_active_high_sense_and_health_fields(rig):
    health = rig.health()
    assert health["cabinet"] == {"amplifier_on": None, "amplifier_fault": None,
                                 "mains_present": True, "door_open": False}
    rig.gpio.drive(MAINS, False)
    rig.advance(6.0)
    assert [(a["code"], a["state"]) for a in rig.alerts()] == [("mains_lost", "raised")]
    health = rig.health()
    assert health["cabinet"]["mains_present"] is False and health["modem"] is None
    # the last health is kept for `ttcs-agent status`
    kept = json.loads((Path(rig.core.cfg["paths"]["state_dir"]) / "health.json").read_text())
    assert kept["cabinet"]["mains_present"] is False and kept["system"]["cpu_temp_c"] == 50.0


@pytest.mark.parametrize("open_s, closed_s", [(2, 2), (10, 40)])
def test_flapping_door_for_an_hour_produces_few_events(rig, open_s, closed_s):
    # both well past the 0.2 s contact debounce; 40 s closed is past the 30 s alert clear
    for _ in range(3600 // (open_s + closed_s)):
        rig.gpio.drive(DOOR, False)
        rig.advance(open_s, step=0.5)
        rig.gpio.drive(DOOR, True)
        rig.advance(closed_s, step=0.5)
    events = rig.alerts("door_open")
    assert 1 <= len(events) <= 4, events
    assert events[0]["state"] == "raised" and events[-1]["state"] == "raised"
    [active] = rig.core.snapshot()["alerts"]
    assert active["code"] == "door_open"
    if closed_s > rig.core.cfg["alerts"]["clear_after_s"]:
        assert active.get("flapping") is True  # the clear is withheld, not lost
    rig.advance(rig.core.cfg["alerts"]["flap_clear_after_s"] + 5, step=1.0)
    assert rig.alerts("door_open")[-1]["state"] == "cleared"


def test_cpu_temp_and_disk_low_from_config_thresholds_within_100_s(tmp_path):
    r = Rig(tmp_path, extra={"health": {"interval_s": 60, "disk_min_free_mb": 300},
                             "alerts": {"cpu_temp": {"raise_c": 65, "clear_c": 60}}})
    r.system = {"cpu_temp_c": 66.0, "disk_free_mb": {"state": 250, "cache": 5000}}
    r.advance(100, step=1.0)  # no health message in this test: the 10 s samples suffice
    assert {(a["code"], a.get("key")) for a in r.alerts()} == {("cpu_temp", None),
                                                              ("disk_low", "state")}
    [disk] = r.alerts("disk_low")
    assert disk["detail"] == {"metric": "disk_free_mb", "value": 250, "threshold": 300,
                              "path": "state"}
    r.system = {"cpu_temp_c": 62.0, "disk_free_mb": {"state": 320, "cache": 5000}}
    r.advance(120, step=1.0)  # 62 °C is inside the hysteresis band; 320 MB below the margin
    assert len(r.alerts()) == 2
    r.system = {"cpu_temp_c": 55.0, "disk_free_mb": {"state": 400, "cache": 5000}}
    r.advance(120, step=1.0)
    assert sorted((a["code"], a["state"]) for a in r.alerts()) == [
        ("cpu_temp", "cleared"), ("cpu_temp", "raised"), ("disk_low", "cleared"),
        ("disk_low", "raised")]
    assert r.samples[0] == {"state": r.core.cfg["paths"]["state_dir"],
                            "cache": r.core.cfg["paths"]["cache_dir"]}
    r.service.stop()


def test_a_broken_sampler_never_stops_the_service(tmp_path):
    results: list = [RuntimeError("boom"), {"cpu_temp_c": "hot", "disk_free_mb": {"state": None}},
                     ["not", "a", "dict"], {"cpu_temp_c": float("nan")}]

    def sampler(paths: dict) -> dict:
        item = results.pop(0) if results else {"cpu_temp_c": 90.0}
        if isinstance(item, Exception):
            raise item
        return item

    r = Rig(tmp_path, sampler=sampler)
    r.advance(120, step=1.0)
    assert [a["code"] for a in r.alerts()] == ["cpu_temp"]
    r.service.stop()


def test_amplifier_fault_input_raises_its_alert(tmp_path):
    r = Rig(tmp_path, extra={"cabinet": {**CABINET, "amplifier_fault": {"pin": AMP}}})
    assert r.health()["cabinet"]["amplifier_fault"] is False
    r.gpio.drive(AMP, False)
    r.advance(6.0)
    assert [(a["code"], a["detail"]) for a in r.alerts()] == [
        ("amplifier_fault", {"input": "amplifier_fault", "pin": AMP})]
    assert r.health()["cabinet"]["amplifier_fault"] is True


def test_amplifier_fault_pin_of_the_audio_service_wins(tmp_path, caplog):
    r = Rig(tmp_path, extra={"cabinet": {**CABINET, "amplifier_fault": {"pin": AMP}},
                             "amplifier": {"fault_pin": 23}})
    assert "cabinet.amplifier_fault ignored" in caplog.text
    assert AMP not in r.gpio.modes and "amplifier_fault" not in r.service.health_fields()


def test_bad_cabinet_wiring_disables_inputs_but_not_the_agent(tmp_path, caplog):
    # check-config refuses this wiring; the service still defends itself if handed it
    core = make_core(tmp_path, extra={"cabinet": {"door": {"pin": 5}, "mains": {"pin": 6}}})
    core.cfg["cabinet"]["mains"]["pin"] = 5
    service = health_service.install(core, core.cfg, gpio=SimGPIO())
    assert service.cabinet is None and "BCM 5 is already used" in caplog.text
    assert service.health_fields() == {}


def test_the_gpio_backend_handed_in_is_used_and_not_closed(tmp_path):
    core = make_core(tmp_path, extra={"cabinet": CABINET})
    gpio = SimGPIO()
    closed: list[bool] = []
    gpio.close = lambda: closed.append(True)  # type: ignore[method-assign]
    service = health_service.install(core, core.cfg, gpio=gpio)
    assert service.gpio is gpio and gpio.modes == {DOOR: "in", MAINS: "in"}
    service.stop()
    assert closed == []


def test_sim_gpio_inputs_file_hook(tmp_path, monkeypatch):
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({str(DOOR): 0}))
    monkeypatch.setenv(SIM_INPUTS_ENV, str(levels))
    gpio = SimGPIO()
    gpio.setup_input(DOOR, "up")
    gpio.setup_input(MAINS, "up")
    assert gpio.read(DOOR) is False and gpio.read(MAINS) is True
    levels.write_text(json.dumps({str(DOOR): 1, str(MAINS): 0}))
    assert gpio.read(DOOR) is True and gpio.read(MAINS) is False
    levels.write_text("{not json")
    assert gpio.read(DOOR) is True  # a broken file keeps the last levels


# --- modem on a pty -----------------------------------------------------------------------

@pytest.fixture
def fake_modem():
    made: list[FakeModem] = []

    def make(script: dict) -> FakeModem:
        made.append(FakeModem(script))
        return made[-1]

    yield make
    for fake in made:
        fake.stop()


def test_modem_fields_in_health_and_weak_signal_alert(tmp_path, fake_modem):
    script = dict(HEALTHY)
    script["AT+CSQ"] = ["+CSQ: 3,99", "OK"]  # -107 dBm: below the -105 dBm default
    fake = fake_modem(script)
    r = Rig(tmp_path, extra={"modem": {"port": fake.path, "timeout_s": 2, "interval_s": 10}})
    r.advance(2.0)  # the first query
    modem = r.health()["modem"]
    assert modem["signal_dbm"] == -107 and modem["operator"] == "Viettel"
    assert modem["tech"] == "LTE" and modem["registered"] is True
    r.advance(60, step=1.0)
    [alert] = r.alerts("modem_signal")
    assert alert["state"] == "raised" and alert["detail"]["value"] == -107
    script["AT+CSQ"] = ["+CSQ: 20,99", "OK"]  # -73 dBm
    fake.script = script
    r.advance(150, step=1.0)
    assert [a["state"] for a in r.alerts("modem_signal")] == ["raised", "cleared"]
    r.service.stop()


def test_unplugged_modem_reports_null_and_recovers_nothing_crashes(tmp_path, fake_modem):
    fake = fake_modem(HEALTHY)
    link = tmp_path / "ttyModem"
    link.symlink_to(fake.path)
    r = Rig(tmp_path, extra={"modem": {"port": str(link), "timeout_s": 1, "interval_s": 10}})
    r.advance(2.0)
    assert r.health()["modem"]["signal_dbm"] == -79
    fake.stop()
    r.advance(10.0, step=1.0)
    assert r.health()["modem"] is None and r.service.modem_error
    link.unlink()
    link.symlink_to(fake_modem(HEALTHY).path)
    r.advance(10.0, step=1.0)
    assert r.health()["modem"]["operator"] == "Viettel" and r.service.modem_error is None
    r.service.stop()


def test_sim_modem_chosen_by_name_without_a_port(tmp_path):
    r = Rig(tmp_path, extra={"modem": {"backend": "sim", "interval_s": 10}})
    sim = r.service.modem
    assert isinstance(sim, SimModem)
    r.advance(2.0)
    assert r.health()["modem"]["signal_dbm"] == -79
    sim.set_signal(-109)
    r.advance(70, step=1.0)
    [alert] = r.alerts("modem_signal")
    assert alert["state"] == "raised" and alert["detail"]["value"] == -109
    sim.vanish()
    r.advance(10.0, step=1.0)
    assert r.health()["modem"] is None and "lost" in r.service.modem_error
    sim.recover()
    r.advance(10.0, step=1.0)
    assert r.health()["modem"]["signal_dbm"] == -109 and r.service.modem_error is None
    r.service.stop()
    assert sim.closed


# --- status rendering -----------------------------------------------------------------------

def test_status_shows_alerts_and_last_health(rig):
    rig.gpio.drive(DOOR, False)
    rig.advance(6.0)
    rig.health()
    rig.core.publish_state(force=True)
    state_dir = Path(rig.core.cfg["paths"]["state_dir"])
    st = json.loads((state_dir / "status.json").read_text())
    st["health"] = json.loads((state_dir / "health.json").read_text())
    text = render_status(st, True)
    assert "door_open" in text and "RAISED" in text
    assert "door OPEN" in text and "mains present" in text
    assert "cpu 50.0 °C" in text


# --- the agent as a process ----------------------------------------------------------------

DEV = "krongpa-phutuc-c03"


def test_offline_agent_delivers_door_alert_historical_when_broker_appears(
        tmp_path, keys, agent_factory, monkeypatch):
    levels = tmp_path / "gpio-levels.json"
    levels.write_text(json.dumps({str(DOOR): 0, str(MAINS): 1}))  # door open, mains present
    monkeypatch.setenv(SIM_INPUTS_ENV, str(levels))
    broker = Broker(tmp_path / "persistent-broker", persistence=True).start()
    watcher = Watcher(broker.port, ["ttcs/#"], persistent=True)
    broker.stop()
    try:
        cfg = agent_config(
            tmp_path, broker.port, keys, cabinet=CABINET, health={"interval_s": 5},
            alerts={"raise_after_s": 1, "clear_after_s": 1})
        agent = agent_factory(cfg)
        status_file = tmp_path / DEV / "state" / "status.json"

        def door_alert_active() -> bool:
            try:
                st = json.loads(status_file.read_text())
            except (OSError, ValueError):
                return False
            alerts = ((st.get("state") or {}).get("alerts")) or []
            return any(a["code"] == "door_open" for a in alerts)

        wait_until(door_alert_active, 30, what="door_open active while offline")
        assert agent.alive(), agent.log()
        wait_until(lambda: (tmp_path / DEV / "state" / "health.json").exists(), 30,
                   what="health kept offline")
        out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "DISCONNECTED" in out.stdout and "door_open" in out.stdout
        assert "door OPEN" in out.stdout

        broker.start()
        raised = wait_until(lambda: [e for e in watcher.json(f"dev/{DEV}/event")
                                     if e.get("code") == "door_open"], 30, what="door alert")[0]
        assert raised["state"] == "raised" and raised["historical"] is True
        assert raised["type"] == "alert" and isinstance(raised["seq"], int)
        wait_online(watcher, DEV)

        health = wait_until(lambda: [h for h in watcher.json(f"dev/{DEV}/health")
                                     if not h.get("historical")], 30, what="live health")[-1]
        for group, fields in {
            "system": ("cpu_temp_c", "load", "mem_total_mb", "mem_available_mb", "throttled"),
            "clock": ("trusted", "source"), "mqtt": ("reconnects", "outbox"),
            "audio": ("ok", "playing", "volume", "last_level_dbfs"),
            "cabinet": ("amplifier_on", "amplifier_fault", "mains_present", "door_open"),
            "board": ("link",),
        }.items():
            assert set(fields) <= set(health[group]), (group, health[group])
        assert {"v", "ts", "version", "uptime_s", "disk_free_mb", "modem"} <= set(health)
        assert health["cabinet"]["door_open"] is True and health["cabinet"]["mains_present"]
        assert set(health["disk_free_mb"]) == {"state", "cache"}
        assert health["clock"]["trusted"] is True and health["mqtt"]["reconnects"] >= 0
        # samples taken offline were kept and are sent flagged historical
        assert any(h.get("historical") is True for h in watcher.json(f"dev/{DEV}/health"))

        levels.write_text(json.dumps({str(DOOR): 1, str(MAINS): 1}))  # door closed
        cleared = wait_until(lambda: [e for e in watcher.json(f"dev/{DEV}/event")
                                      if e.get("code") == "door_open"
                                      and e.get("state") == "cleared"], 30, what="cleared")[0]
        assert cleared.get("historical") is not True
    finally:
        watcher.close()
        broker.stop()
