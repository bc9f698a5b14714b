"""scripts/install and scripts/uninstall staged into a temporary root (--prefix), and the unit.

Nothing here touches this machine: with --prefix there is no apt, no user and no systemctl.
The venv is built for real (pip, from the package index or its cache).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "ttcs-agent.service"
SCRIPTS = [ROOT / "scripts" / n for n in ("install", "uninstall", "make-certs")]
MAX_EXPOSURE = 2.5


def _index_reachable(tmp: Path) -> bool:
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(tmp), "setuptools"], capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A snapshot of the checkout without .git (its hash stays put while others edit)."""
    if not _index_reachable(tmp_path_factory.mktemp("probe")):
        pytest.skip("no Python package index reachable for building the venv")
    dest = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def install(source: Path, prefix: Path, *args: str) -> str:
    out = subprocess.run([str(source / "scripts" / "install"), "--prefix", str(prefix), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def uninstall(source: Path, prefix: Path, *args: str) -> str:
    out = subprocess.run([str(source / "scripts" / "uninstall"), "--prefix", str(prefix), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")}


def test_install_is_idempotent_and_upgrade_keeps_config_and_state(source, tmp_path):
    root = tmp_path / "root"
    opt, etc = root / "opt/ttcs-agent", root / "etc/ttcs-agent"
    install(source, root)
    first = os.readlink(opt / "venv")
    version = subprocess.run([str(opt / "venv/bin/ttcs-agent"), "version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("ttcs-agent ")
    assert (etc / "agent.yaml").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/systemd/system/ttcs-agent.service").read_bytes() == UNIT.read_bytes()
    check = subprocess.run([str(opt / "venv/bin/ttcs-agent"), "check-config", "--config",
                            str(etc / "agent.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout

    before = tree(root)
    out = install(source, root)
    assert "already installed" in out and "keeping" in out and "unit: up to date" in out
    assert tree(root) == before, "a second run with the same source changed files"

    # A technician's config and the agent's state, then an upgrade to a changed source.
    (etc / "agent.yaml").write_text("device: {id: edited-by-technician}\n")
    state = root / "var/lib/ttcs-agent"
    state.mkdir(parents=True)
    (state / "agent.db").write_bytes(b"state")
    with open(source / "agent" / "__init__.py", "a") as f:
        f.write("# upgrade\n")
    install(source, root)
    second = os.readlink(opt / "venv")
    assert second != first
    assert (etc / "agent.yaml").read_text() == "device: {id: edited-by-technician}\n"
    assert (state / "agent.db").read_bytes() == b"state"
    assert {p.name for p in (opt / "venvs").iterdir()} == {Path(first).name, Path(second).name}


def test_dry_run_changes_nothing(source, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    out = install(source, root, "--dry-run")
    assert "+ " in out
    assert list(root.iterdir()) == []


def test_uninstall_keeps_config_and_state_unless_purged(source, tmp_path):
    root = tmp_path / "root"
    install(source, root)
    (root / "var/lib/ttcs-agent").mkdir(parents=True)
    uninstall(source, root)
    assert not (root / "opt/ttcs-agent").exists()
    assert not (root / "etc/systemd/system/ttcs-agent.service").exists()
    assert (root / "etc/ttcs-agent/agent.yaml").exists()
    assert (root / "var/lib/ttcs-agent").exists()
    uninstall(source, root, "--purge")
    assert not (root / "etc/ttcs-agent").exists() and not (root / "var/lib/ttcs-agent").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_exposure_score(tmp_path):
    shutil.copy(UNIT, tmp_path / UNIT.name)
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", UNIT.name],
                         cwd=tmp_path, capture_output=True, text=True)
    m = re.search(r"Overall exposure level for ttcs-agent\.service: ([0-9.]+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_verifies(tmp_path):
    shutil.copy(UNIT, tmp_path / UNIT.name)
    out = subprocess.run(["systemd-analyze", "verify", UNIT.name], cwd=tmp_path,
                         capture_output=True, text=True)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "is not executable" not in line]  # not installed here
    assert problems == []
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=always", "User=ttcs-agent",
                   "StateDirectory=ttcs-agent", "CacheDirectory=ttcs-agent",
                   "ConfigurationDirectory=ttcs-agent"):
        assert needed in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_scripts_pass_shellcheck():
    out = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
