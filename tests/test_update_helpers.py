"""Helpers for the update tests (no tests here): bundles built from this checkout, a
Range-capable HTTP server that can cut downloads, and a supervisor doing what systemd does
with the unit's settings."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ctl import release

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ttcs-agent.service"


def requirements() -> list[str]:
    text = (ROOT / "setup.py").read_text()
    block = text.split("install_requires=[", 1)[1].split("]", 1)[0]
    return re.findall(r'"([^"]+)"', block)


def make_wheelhouse(folder: Path) -> Path:
    """The dependencies as wheels for this machine (pip download), and the build backend."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "-d", str(folder), *requirements(), "setuptools>=61", "wheel"],
                   check=True, capture_output=True)
    return folder


def make_bundle(out: Path, wheelhouse: Path, version: str, patches=()) -> Path:
    """A bundle of a temp copy of this checkout, its version set to ``version`` and each
    ``(file, text)`` appended to that file (a test fault)."""
    src = out / f"src-{version}"
    src.mkdir(parents=True)
    release.source_snapshot(ROOT, src)
    init = src / "agent" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"',
                           init.read_text()))
    for name, text in patches:
        path = src / name
        path.write_text(f"{path.read_text()}\n\n{text}")
    bundle, manifest = release.build(src, out / "bundles", platforms=["native"],
                                     index_args=["--no-index", f"--find-links={wheelhouse}"],
                                     log=lambda *a: None)
    assert manifest["platforms"]["native"]["complete"], manifest
    return bundle


class FileServer:
    """Serves a folder over HTTP with Range; ``cuts``: that many responses are cut after
    half of their body."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cuts = 0
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) of each GET
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = server.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                server.ranges.append((self.path, rng))
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                if server.cuts > 0:
                    server.cuts -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


class Supervisor:
    """What systemd does for the unit, read from the unit file: ExecStartPre= (a leading
    ``-``: failure ignored), ExecStart=, Restart=always with RestartSec=, Environment=, and
    Type=notify's watchdog: no WATCHDOG=1 on $NOTIFY_SOCKET for WatchdogSec= after READY=1
    gets SIGABRT, then SIGKILL after TimeoutAbortSec=. Paths under /opt/ttcs-agent and the
    config path are mapped into the test's folders."""

    def __init__(self, prefix: Path, config: Path, log: Path) -> None:
        s = unit_settings()
        assert s["Restart"] == ["always"] and s["Type"] == ["notify"]
        self.restart_s = float(s["RestartSec"][0])
        self.watchdog_s = float(s["WatchdogSec"][0])
        self.abort_s = float(s["TimeoutAbortSec"][0])
        self.env = dict(kv.split("=", 1) for e in s.get("Environment", []) for kv in shlex.split(e))

        def mapped(cmd: str) -> list[str]:
            cmd = cmd.replace("/opt/ttcs-agent", str(prefix))
            cmd = cmd.replace("/etc/ttcs-agent/agent.yaml", str(config))
            return shlex.split(cmd.lstrip("-+!@:"))

        self.pre = [mapped(c) for c in s.get("ExecStartPre", [])]
        self.main = mapped(s["ExecStart"][0])
        self.log_path = log
        self.config = config
        self.starts: list[float] = []  # time.monotonic() of each main start
        self.exits: list[int] = []
        self.aborted = 0  # starts ended by the watchdog
        self.proc: subprocess.Popen | None = None
        self._stopping = False
        self._sock_dir = tempfile.mkdtemp(prefix="sv-")  # a short path: sun_path is 108 bytes
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(f"{self._sock_dir}/notify")
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": f"{self._sock_dir}/notify",
               "WATCHDOG_USEC": str(int(self.watchdog_s * 1e6))}
        with open(self.log_path, "ab") as log:
            while not self._stopping:
                for cmd in self.pre:
                    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.proc = subprocess.Popen(self.main, stdout=log, stderr=subprocess.STDOUT,
                                             env=env)
                self.starts.append(time.monotonic())
                self.exits.append(self._serve(self.proc))
                if not self._stopping:
                    time.sleep(self.restart_s)

    def _serve(self, proc: subprocess.Popen) -> int:
        last: float | None = None  # the watchdog runs from READY=1 on
        while proc.poll() is None:
            try:
                msg = self._sock.recv(4096).decode()
            except TimeoutError:
                msg = ""
            if "READY=1" in msg or "WATCHDOG=1" in msg:
                last = time.monotonic()
            if last is not None and time.monotonic() - last > self.watchdog_s:
                self.aborted += 1
                proc.send_signal(signal.SIGABRT)
                try:
                    proc.wait(self.abort_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
        return proc.wait()

    def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(20)
        self._sock.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
