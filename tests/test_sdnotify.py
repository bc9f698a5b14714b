"""sd_notify: READY=1 before the broker is reachable, WATCHDOG=1 only from a running core loop.

A fake $NOTIFY_SOCKET (a unix datagram socket the test binds) stands in for systemd.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from agent.core import sdnotify
from agent.core.clock import SystemClock
from tests.conftest import Broker, Watcher, agent_config, free_port, wait_online, wait_until
from tests.fakes import make_core


class NotifySocket:
    """Records every datagram sent to it, with its arrival time (monotonic)."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"ttcs-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # sun_path: 108 bytes
            self.env = os.path.join(self._dir, "notify")
            self.sock.bind(self.env)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.received.append((time.monotonic(), data.decode()))

    def times(self, message: str, since: float = 0.0) -> list[float]:
        with self._lock:
            return [t for t, m in self.received if m == message and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        if not self.env.startswith("@"):
            os.unlink(self.env)
            os.rmdir(self._dir)


@pytest.fixture
def notify_socket():
    s = NotifySocket()
    yield s
    s.close()


# --- the module ----------------------------------------------------------------------------

def test_no_op_outside_systemd(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog_interval_s() is None


def test_messages_reach_the_socket(monkeypatch, notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.ready() and sdnotify.watchdog() and sdnotify.status("two\nlines")
    wait_until(lambda: len(notify_socket.received) == 3, 2, what="three datagrams")
    assert [m for _, m in notify_socket.received] == ["READY=1", "WATCHDOG=1", "STATUS=two lines"]


def test_abstract_socket(monkeypatch):
    s = NotifySocket(abstract=True)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", s.env)
        assert sdnotify.ready()
        wait_until(lambda: s.times("READY=1"), 2, what="READY=1 on an abstract socket")
    finally:
        s.close()


def test_unreachable_socket_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.ready() is False


@pytest.mark.parametrize("usec, pid, expected", [
    ("8000000", None, 8.0), ("8000000", "self", 8.0), ("8000000", "1", None),
    ("0", None, None), ("", None, None), ("abc", None, None), ("-5", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_interval_s() == expected


# --- the core loop (in process): a handler that hangs stops the pings ---------------------

def test_core_pings_only_while_its_loop_runs(monkeypatch, notify_socket, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # 1 s: a ping at least every 0.5 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    core = make_core(tmp_path, clock=SystemClock())
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: notify_socket.times("READY=1"), 5, what="READY=1")
        wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 3, 5, what="pings")
        core.post(time.sleep, 2.5)  # a handler stuck for 2.5 s
        time.sleep(0.3)
        hung_from = time.monotonic()
        time.sleep(2.0)
        assert notify_socket.times("WATCHDOG=1", since=hung_from) == [], \
            "the core pinged the watchdog while its loop was stuck"
        wait_until(lambda: notify_socket.times("WATCHDOG=1", since=hung_from), 3,
                   what="pings again once the handler returned")
    finally:
        core.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert notify_socket.times("STOPPING=1")


# --- a real agent process --------------------------------------------------------------------

def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_agent_process_ready_without_broker_then_watchdog(notify_socket, tmp_path, keys,
                                                          agent_factory, monkeypatch):
    port = free_port()  # nothing listens here yet
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = agent_factory(agent_config(tmp_path, port, keys))
    wait_until(lambda: notify_socket.times("READY=1"), 30, what="READY=1 with no broker")
    # Periodic pings, at least every WatchdogSec/2 (1 s) plus scheduling slack.
    wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 4, 10, what="4 pings")
    assert max(_gaps(notify_socket.times("WATCHDOG=1"))) < 1.6

    # The broker appears only now: the agent that said READY comes online.
    broker = Broker(tmp_path / "broker", port=port).start()
    try:
        watcher = Watcher(port, ["ttcs/dev/+/status"])
        wait_online(watcher, "krongpa-phutuc-c03", timeout=20)
        watcher.close()

        # A frozen process sends nothing; once it runs again the pings resume.
        agent.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(2.5)
        assert notify_socket.times("WATCHDOG=1", since=stopped_at + 0.1) == []
        agent.signal(signal.SIGCONT)
        wait_until(lambda: notify_socket.times("WATCHDOG=1", since=stopped_at + 2.5), 5,
                   what="pings after SIGCONT")
        assert agent.stop() == 0
    finally:
        broker.stop()
    assert notify_socket.times("STOPPING=1")


def test_agent_process_without_systemd_sends_nothing(tmp_path, keys, agent_factory,
                                                     notify_socket, monkeypatch):
    # No NOTIFY_SOCKET in the environment: the agent runs normally and stays silent.
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    agent = agent_factory(agent_config(tmp_path, free_port(), keys))
    wait_until(lambda: Path(tmp_path / "krongpa-phutuc-c03" / "state" / "agent.pid").exists(),
               20, what="agent started")
    time.sleep(1.5)
    assert agent.alive()
    assert notify_socket.received == []
