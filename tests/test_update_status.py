"""What ``ttcs-agent status`` and ``doctor`` say about versions and updates (docs/UPDATE.md),
and the update window."""

from __future__ import annotations

import os
import time
from datetime import datetime

from agent import config, doctor
from agent.status import render_update
from agent.update.layout import Layout
from agent.update.service import in_window


def installed(tmp_path, *names: str, current: str) -> Layout:
    layout = Layout(tmp_path)
    for i, name in enumerate(names):
        (layout.venvs / name).mkdir(parents=True)
        stamp = time.time() - 100 + i
        os.utime(layout.venvs / name, (stamp, stamp))
    layout.switch(f"venvs/{current}")
    return layout


def test_status_shows_running_previous_and_an_update_on_probation(tmp_path):
    layout = installed(tmp_path, "0.1.0", "0.2.0", current="0.2.0")
    layout.write({"state": "probation", "id": "c-1", "version": "0.2.0", "from": "venvs/0.1.0",
                  "to": "venvs/0.2.0", "starts": 1})
    assert render_update(layout.describe()) == [
        "versions: running 0.2.0, previous 0.1.0",
        "update:   0.2.0 probation, start 1 (command c-1)"]


def test_status_and_doctor_show_a_rollback(tmp_path):
    layout = installed(tmp_path, "0.0.9", "0.1.0", "0.3.0", current="0.1.0")
    layout.write({"state": "rolled_back", "id": "c-2", "version": "0.3.0",
                  "from": "venvs/0.1.0", "to": "venvs/0.3.0", "why": "3 starts without a commit"})
    lines = render_update(layout.describe())
    assert lines == ["versions: running 0.1.0, previous 0.0.9",  # not the failed 0.3.0
                     "update:   0.3.0 ROLLED BACK: 3 starts without a commit"]
    cfg = config.parse(f"device: {{id: d1}}\nupdate: {{prefix: {tmp_path}}}\n")
    [finding] = doctor.check_update(cfg)
    assert finding.level == "WARN" and "rolled back" in finding.message


def test_doctor_is_quiet_without_installed_versions(tmp_path):
    cfg = config.parse(f"device: {{id: d1}}\nupdate: {{prefix: {tmp_path}}}\n")
    [finding] = doctor.check_update(cfg)
    assert finding.level == "ok"


def test_window_may_span_midnight():
    at = lambda hm: datetime(2026, 1, 1, *map(int, hm.split(":")))  # noqa: E731
    assert in_window(None, at("12:00"))
    assert in_window("01:00-04:00", at("01:00")) and not in_window("01:00-04:00", at("04:00"))
    assert in_window("23:00-02:00", at("23:30")) and in_window("23:00-02:00", at("01:59"))
    assert not in_window("23:00-02:00", at("12:00"))


def test_config_refuses_a_bad_window():
    import pytest

    with pytest.raises(config.ConfigError, match=r"update\.window"):
        config.parse("device: {id: d1}\nupdate: {window: '25:00-02:00'}\n")


def test_install_puts_the_boot_guard_outside_every_venv(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([str(root / "scripts" / "install"), "--prefix", str(tmp_path),
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert (f"install -m 0755 {root}/scripts/boot-guard {tmp_path}/opt/ttcs-agent/boot-guard"
            in out)
