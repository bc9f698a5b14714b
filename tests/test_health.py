"""agent.health.system: system sampling on this machine, vcgencmd parsing, the health payload."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.core.clock import FakeClock
from agent.health import system as health


def _fake_vcgencmd(tmp_path: Path, body: str) -> Path:
    """A stand-in vcgencmd script in its own folder, to be put first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "vcgencmd"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir


def test_collect_system_returns_sane_types_here(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    system = health.collect_system({"state": str(state), "cache": str(tmp_path / "not-yet")})

    assert isinstance(system["uptime_s"], int) and system["uptime_s"] > 0
    temp = system["cpu_temp_c"]
    assert temp is None or (isinstance(temp, float) and -40 < temp < 130)
    assert len(system["load"]) == 3 and all(x >= 0 for x in system["load"])
    mem = system["mem"]
    assert 0 < mem["available_mb"] <= mem["total_mb"]
    # a folder that does not exist yet is measured on the filesystem it will live on
    assert system["disk_free_mb"]["state"] > 0
    assert system["disk_free_mb"]["cache"] == system["disk_free_mb"]["state"]


def test_cpu_temp_takes_hottest_zone_and_skips_unreadable(tmp_path):
    for name, text in [("thermal_zone0", "48312\n"), ("thermal_zone1", "61000\n"),
                       ("thermal_zone2", "garbage\n")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "temp").write_text(text)
    assert health.read_cpu_temp_c(str(tmp_path / "thermal_zone*/temp")) == 61.0
    assert health.read_cpu_temp_c(str(tmp_path / "nothing*/temp")) is None


def test_throttled_flags_from_fake_vcgencmd_on_path(tmp_path, monkeypatch):
    bindir = _fake_vcgencmd(tmp_path, 'echo "throttled=0x50005"')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    flags = health.collect_system({})["throttled"]

    assert flags["raw"] == 0x50005
    assert flags["under_voltage"] and flags["throttled"]
    assert not flags["freq_capped"] and not flags["soft_temp_limit"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["freq_capped_occurred"] and not flags["soft_temp_limit_occurred"]


def test_throttled_none_when_tool_fails_hangs_or_is_absent(tmp_path, monkeypatch):
    bindir = _fake_vcgencmd(tmp_path, 'echo "VCHI init failed" >&2; exit 255')
    assert health.read_throttled(str(bindir / "vcgencmd")) is None

    (tmp_path / "slow").mkdir()
    slow = _fake_vcgencmd(tmp_path / "slow", "exec sleep 5")
    assert health.read_throttled(str(slow / "vcgencmd"), timeout=0.2) is None

    assert health.read_throttled(str(tmp_path / "no-such-tool")) is None


@pytest.mark.parametrize("text, expected", [
    ("throttled=0x0", 0), ("throttled=0x80008\n", 0x80008),
    ("nonsense", None), ("throttled=zz", None),
])
def test_parse_throttled(text, expected):
    flags = health.parse_throttled(text)
    assert (flags["raw"] if flags else None) == expected


def test_build_health_payload_shape_and_values():
    clock = FakeClock(now_ms=1_764_150_000_000)
    system = {"uptime_s": 42, "cpu_temp_c": 55.5, "load": [0.1, 0.2, 0.3],
              "mem": {"total_mb": 512, "available_mb": 300},
              "disk_free_mb": {"state": 1000, "cache": 150}, "throttled": None}
    extra = {"version": "0.1.0", "clock_trusted": True, "clock_source": "kernel",
             "mqtt_reconnects": 3, "outbox_depth": 7, "audio_ok": True, "playing": "c-1",
             "volume": 80, "last_level_dbfs": -18.5, "amplifier_on": True, "door_open": False,
             "modem": {"signal_dbm": -81}, "board_link": True}

    p = health.build_health(system, extra, clock)

    assert p["v"] == 1 and p["ts"] == 1_764_150_000_000
    assert p["version"] == "0.1.0" and p["uptime_s"] == 42
    assert p["system"] == {"cpu_temp_c": 55.5, "load": [0.1, 0.2, 0.3], "mem_total_mb": 512,
                           "mem_available_mb": 300, "throttled": None}
    assert p["disk_free_mb"] == {"state": 1000, "cache": 150}
    assert p["clock"] == {"trusted": True, "source": "kernel"}
    assert p["mqtt"] == {"reconnects": 3, "outbox": 7}
    assert p["audio"] == {"ok": True, "playing": "c-1", "volume": 80, "last_level_dbfs": -18.5}
    # not supplied -> null, so the payload keeps one shape for the relay
    assert p["cabinet"] == {"amplifier_on": True, "amplifier_fault": None,
                            "mains_present": None, "door_open": False}
    assert p["modem"] == {"signal_dbm": -81} and p["board"] == {"link": True}
    json.dumps(p, allow_nan=False)  # publishable as is


def test_build_health_rejects_unknown_extra_key():
    with pytest.raises(ValueError, match="volum"):
        health.build_health({}, {"volum": 3}, FakeClock())
