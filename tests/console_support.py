"""Helpers for the console's tests: a ctl.yaml for a broker, users made with the real
``ttcs-ctl user add``, a ``ttcs-ctl serve`` process, and a headless Chromium (the
distribution's chromium + chromedriver) driven by Selenium."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

from tests.conftest import ROOT, stop_process, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "mật-khẩu-đủ-dài"


def write_key(folder: Path, keys) -> Path:
    path = folder / "district.pem"
    path.write_bytes(keys.private.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def ctl_config(folder: Path, broker_port: int, keys, http_port: int, **console) -> Path:
    cfg = {
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "topic_prefix": "ttcs"},
        "signing": {"kid": keys.kid, "key_file": str(write_key(folder, keys))},
        "relay": {"db_path": str(folder / "relay.db"), "tick_s": 0.2,
                  "groups": {"krongpa": ["krongpa-*"], "phutuc": ["krongpa-phutuc-*"],
                             "chuse": ["krongpa-chuse-*"]}},
        "media": {"dir": str(folder / "media"),
                  "base_url": f"http://127.0.0.1:{http_port}/media"},
        "locations": {"phutuc": [13.27, 108.68], "chuse": [13.33, 108.72],
                      "krongpa-phutuc-c03": [13.28, 108.66]},
        "console": {"listen": f"127.0.0.1:{http_port}", "lockout_after": 3,
                    "login_per_minute": 60, "live_interval_s": 0.3, **console},
    }
    path = folder / "ctl.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def ctl_here(config: Path, *args: str) -> int:
    """``ttcs-ctl ARGS`` in this process (the real command line, no interpreter start)."""
    from ctl.main import main

    return main(["--config", str(config), *args])


def add_user(config: Path, folder: Path, name: str, role: str, *extra: str) -> None:
    pw = folder / f"{name}.pw"
    pw.write_text(PASSWORD + "\n")
    code = ctl_here(config, "user", "add", name, "--role", role, "--password-file", str(pw),
                    *extra)
    assert code == 0


class Serve:
    """``ttcs-ctl serve`` in its own process."""

    def __init__(self, config: Path, port: int, log: Path, *args: str) -> None:
        self.config, self.port, self.log_path, self.args = config, port, log, args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Serve:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctl", "--config", str(self.config),
                                      "serve", *self.args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until(self._up, 20, what=f"console on {self.url}")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited: {self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        return stop_process(self.proc, timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900", "--lang=vi"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def login(driver, base: str, name: str, password: str = PASSWORD) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
