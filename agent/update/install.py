"""Installing a verified bundle into a new venv beside the running one (blocking: a worker).

Offline (``pip install --no-index --find-links``), isolated from any pip configuration of the
machine, byte-compiled (the unit's file system is read-only at run time), and checked with the
new version's own ``check-config`` against the live config before anything is switched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from agent.update.bundle import WHEELS, BundleError, extract
from agent.update.layout import Layout

PIP_TAIL = 15  # lines of pip's output kept in a failed ack
TIMEOUT_S = 1800


class UpdateError(Exception):
    """``reason``: the ack's reason code (disk_space, install, config, media_checksum)."""

    def __init__(self, reason: str, message: str, detail: dict | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail or {}


def check_space(folder: Path, need: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UpdateError("disk_space", f"{free // 2**20} MB free in {folder}, "
                          f"{need // 2**20} MB needed", {"free_mb": free // 2**20,
                                                        "need_mb": need // 2**20})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, find-links or constraints from the host
    env["PIP_NO_CACHE_DIR"] = "1"  # no cache in the agent's home, the state folder
    return env


class Jobs:
    """Runs the install's commands one at a time; :meth:`stop` (any thread: the agent is
    stopping) kills the one running and refuses the next, so a stop never waits for pip."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    def run(self, cmd: list[str], reason: str, what: str) -> str:
        try:
            with self._lock:
                if self._stopped:
                    raise UpdateError(reason, f"{what}: the agent is stopping")
                self._proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True,
                                                     env=_env())
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.stop_current()
            raise UpdateError(reason, f"{what}: {e}") from None
        finally:
            with self._lock:
                self._proc = None
        if proc.returncode != 0:
            lines = out.strip().splitlines()[-PIP_TAIL:]
            raise UpdateError(reason, f"{what} failed (exit {proc.returncode})", {"output": lines})
        return out

    def stop_current(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self.stop_current()


def system_site(venv: Path) -> bool:
    try:
        cfg = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return False
    return "include-system-site-packages = true" in cfg


def install(layout: Layout, bundle: Path, *, version: str, config_path: str,
            like: str | None, jobs: Jobs | None = None) -> str:
    """Unpack and verify ``bundle``, build ``venvs/VERSION`` from it, check the live config
    with it. Return ``venvs/VERSION``; raise :class:`UpdateError`. ``like``: the running
    venv (``venvs/NAME``), whose ``--system-site-packages`` choice the new one copies."""
    run = (jobs or Jobs()).run
    work = layout.prefix / "incoming" / version
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        try:
            manifest = extract(bundle, work)
        except BundleError as e:
            raise UpdateError("media_checksum", str(e)) from None
        if manifest["version"] != version:
            raise UpdateError("install", f"the bundle holds version {manifest['version']}, "
                              f"not {version}")
        target = layout.venvs / version
        shutil.rmtree(target, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        flags = ["--system-site-packages"] if like and system_site(layout.prefix / like) else []
        run([base, "-m", "venv", *flags, str(target)], "install", "python -m venv")
        try:
            run([str(target / "bin" / "python"), "-m", "pip", "install", "--no-index",
                 "--disable-pip-version-check", "--no-warn-script-location", "--no-cache-dir",
                 "--find-links", str(work / WHEELS), f"ttcs-agent=={version}"],
                "install", "pip install")
            run([str(target / "bin" / "python"), "-m", "compileall", "-q", str(target / "lib")],
                "install", "compileall")
            _check_config(run, target, config_path)
        except UpdateError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return f"venvs/{version}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_config(run, target: Path, config_path: str) -> None:
    try:
        run([str(target / "bin" / "ttcs-agent"), "check-config", "--config", config_path],
            "config", "the new version's check-config")
    except UpdateError as e:
        e.detail = {"problems": e.detail.get("output", [])}
        e.message = "the new version refuses the running config"
        raise
