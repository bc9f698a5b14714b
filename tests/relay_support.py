"""What the relay's process tests share: a local HTTP stand-in (webhook receiver or Telegram
Bot API), ``ttcs-ctl relay`` as its own process, and its config. A test module imports the
fixtures it uses by their function names (``http_fixture`` is the fixture ``http``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Watcher, stop_process, wait_until


class HttpStandIn:
    """Answers POSTs with the next scripted status (then 200), recording path, JSON and
    headers: a webhook receiver, or a Telegram Bot API server (``{"ok": true}``)."""

    def __init__(self, statuses: list[int] | None = None, body: dict | None = None) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        self.statuses = list(statuses or [])
        reply = json.dumps(body or {"ok": True, "result": {"message_id": 1}}).encode()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append((self.path, data,
                                          {**self.headers, "_at": time.monotonic()}))
                status = stand_in.statuses.pop(0) if stand_in.statuses else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply if status == 200 else b'{"ok": false}')

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.url = self.base + "/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def times(self) -> list[float]:
        """``time.monotonic()`` at which each request came in."""
        return [headers["_at"] for _, _, headers in self.requests]

    @property
    def received(self) -> list[dict]:
        return [data for _, data, _ in self.requests]

    @property
    def keys(self) -> list[str | None]:
        return [headers.get("Idempotency-Key") for _, _, headers in self.requests]

    def items(self) -> list[dict]:
        """The webhook items of every notification received."""
        return [i for r in self.received for i in r["items"]]

    def texts(self) -> list[str]:
        """The text of every notification (webhook) or message (Telegram) received."""
        return [r["text"] for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="http")
def http_fixture():
    servers: list[HttpStandIn] = []

    def make(**kw) -> HttpStandIn:
        s = HttpStandIn(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(name="webhook")
def webhook_fixture(http):
    return http()


@pytest.fixture(name="w")
def watcher_fixture(broker):
    """A client recording every message under ``ttcs/`` on the test's broker; it publishes
    too (as a device would, on its own topics)."""
    w = Watcher(broker.port, ["ttcs/#"])
    yield w
    w.close()


class RelayProcess:
    def __init__(self, cfg_path: Path, log_path: Path) -> None:
        self.cfg_path, self.log_path = cfg_path, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> RelayProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctl", "--config",
                                      str(self.cfg_path), "relay"], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_connected(self, times: int = 1) -> RelayProcess:
        """Wait until the relay has connected to the broker ``times`` times (log lines)."""
        wait_until(lambda: self.log().count("relay connected") >= times, 15,
                   what="relay connected")
        return self


@pytest.fixture(name="relay_proc")
def relay_proc_fixture(tmp_path):
    """``relay_proc(cfg_path)``: the relay as a process, connected to the broker
    (``connected=False``: just started)."""
    started: list[RelayProcess] = []

    def make(cfg_path: Path, connected: bool = True) -> RelayProcess:
        r = RelayProcess(cfg_path, tmp_path / "relay.log").start()
        started.append(r)
        return r.wait_connected(sum(p.log_path == r.log_path for p in started)) \
            if connected else r

    yield make
    for r in started:
        r.stop()


def relay_config(tmp_path: Path, port: int, url: str | None, alerts: dict | None = None,
                 **relay) -> Path:
    cfg = {"mqtt": {"host": "127.0.0.1", "port": port},
           "relay": {"db_path": str(tmp_path / "relay.db"), "group_wait_s": 1,
                     "group_interval_s": 2, "tick_s": 0.2,
                     "groups": {"krongpa": ["krongpa-*"]}, **relay},
           "alerts": {"webhook_url": url, "retry": {"backoff_s": 0.5}, **(alerts or {})}}
    path = tmp_path / "ctl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
