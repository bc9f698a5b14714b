"""Shared fixtures: a real mosquitto on a free port, real agent processes, a watching client."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.core.mqtt import no_delay

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 10) -> int | None:
    """Send ``sig`` to a running ``proc``, wait ``timeout`` s, then kill it; its exit code."""
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode if proc else None


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Broker:
    """A mosquitto process on a free loopback port, stopped by PID."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = "",
                 persistence: bool = False) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> Broker:
        conf = self.folder / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {self.folder}/\n"
            f"log_dest file {self.folder / 'mosquitto.log'}\nlog_type all\n{user}{self.extra}\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, what=f"mosquitto on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        self.proc = None

    def log(self) -> str:
        try:
            return (self.folder / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def _nested_deeper_than(payload: bytes, limit: int) -> bool:
    """Whether JSON ``payload`` nests deeper than ``limit`` (strings skipped). Decoding a
    payload nested thousands deep hits the recursion limit, and the RecursionError it leaves
    behind later surfaces as an unraisable exception in whichever test is running."""
    depth, in_string, escaped = 0, False, False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class Watcher:
    """A test client that records every message under a prefix."""

    def __init__(self, port: int, topics: list[str], protocol_version=mqtt.MQTTv5,
                 persistent: bool = False) -> None:
        """``persistent``: a session the broker keeps (with a persistent broker, messages
        published while this client is away are delivered when it is back)."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self.arrived: list[float] = []  # time.monotonic() at which each message came in
        self._parsed: list[tuple[str, dict | None]] = []  # (topic, JSON object or None)
        self._lock = threading.Condition()
        self._subscribed = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}-{id(self)}",
                                  protocol=protocol_version)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self._subscribed.put(True)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = None
        if persistent:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        if protocol_version == mqtt.MQTTv5:
            self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        else:
            self.client.connect("127.0.0.1", port)
        no_delay(self.client)
        self.client.loop_start()
        self._subscribed.get(timeout=10)

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        payload = bytes(msg.payload)
        body = None
        if not _nested_deeper_than(payload, 100):  # hostile test input: never near the limit
            try:
                body = json.loads(payload)
            except (ValueError, RecursionError):
                body = None
        if not isinstance(body, dict):
            body = None
        with self._lock:
            self.messages.append((msg.topic, payload, bool(msg.retain)))
            self.arrived.append(now)
            self._parsed.append((msg.topic, body))
            self._lock.notify_all()

    def json(self, suffix: str) -> list[dict]:
        with self._lock:
            return [b for t, b in self._parsed if b is not None and t.endswith(suffix)]

    def wait_for(self, pred, timeout: float = 10.0, what: str = "message"):
        """Wait, without polling, until ``pred()`` (called under the lock after each
        message) returns something true; return it."""
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                value = pred()
                if value:
                    return value
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._lock.wait(left)

    def arrival(self, suffix: str, pred, timeout: float = 10.0) -> float:
        """Wait for the first message on a topic ending in ``suffix`` whose JSON body
        satisfies ``pred``; return when it came in (``time.monotonic()``, taken on arrival)."""
        def find():
            for (t, body), at in zip(self._parsed, self.arrived, strict=True):
                if body is not None and t.endswith(suffix) and pred(body):
                    return at
            return None
        return self.wait_for(find, timeout, what=f"message on {suffix}")

    def acks(self, cmd_id=..., device: str | None = None) -> list[dict]:
        suffix = f"dev/{device}/ack" if device else "/ack"
        return [a for a in self.json(suffix) if cmd_id is ... or a.get("id") == cmd_id]

    def wait_ack(self, cmd_id, stage: str, timeout: float = 10.0, device: str | None = None) -> dict:
        return self.wait_for(lambda: next((a for a in self.acks(cmd_id, device)
                                           if a.get("stage") == stage), None),
                             timeout, what=f"ack {cmd_id} {stage}")

    def publish(self, topic: str, payload: bytes | str | dict, retain: bool = False, qos: int = 1):
        if isinstance(payload, dict):
            payload = protocol.canonical(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self.arrived.clear()
            self._parsed.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Keys:
    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.kid = "district-ctl-1"
        self.public_b64 = protocol.public_key_b64(self.private)
        self._n = 0

    def command(self, target: str, typ: str, args: dict | None = None, *, cmd_id: str | None = None,
                ts: int | None = None, exp: int | None = None, sign: bool = True, **extra) -> dict:
        self._n += 1
        env = {"v": 1, "id": cmd_id or f"c-{os.getpid()}-{self._n}-{time.monotonic_ns()}",
               "type": typ, "target": target, "ts": ts if ts is not None else int(time.time() * 1000),
               "args": args or {}, **extra}
        if exp is not None:
            env["exp"] = exp
        return protocol.sign(env, self.private, self.kid) if sign else env


@pytest.fixture
def keys():
    return Keys()


def agent_config(tmp_path: Path, port: int, keys: Keys, device: str = "krongpa-phutuc-c03",
                 **overrides) -> Path:
    cfg = {
        "device": {"id": device, "groups": ["gialai", "krongpa"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "ttcs",
                 "reconnect_min_s": 0.2, "reconnect_max_s": 1},
        "security": {"trusted_keys": {keys.kid: keys.public_b64}},
        "paths": {"state_dir": str(tmp_path / device / "state"),
                  "cache_dir": str(tmp_path / device / "cache")},
        "audio": {"backend": "sim"},
        "gpio": {"backend": "sim"},
        "clock": {"trust": "always"},
        "state": {"min_interval_s": 0.2},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{device}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


class AgentProcess:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                      str(self.config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10) -> int | None:
        return stop_process(self.proc, timeout=timeout)

    def alive(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent_factory(tmp_path):
    started: list[AgentProcess] = []

    def make(config_path: Path, start: bool = True) -> AgentProcess:
        a = AgentProcess(config_path, tmp_path / f"{config_path.stem}.log")
        started.append(a)
        return a.start() if start else a

    yield make
    for a in started:
        a.stop()


def wait_online(watcher: Watcher, device: str, timeout: float = 15, session: int | None = None):
    def ok():
        for s in reversed(watcher.json(f"dev/{device}/status")):
            if s.get("state") == "online" and (session is None or s.get("session") == session):
                return s
        return None

    return wait_until(ok, timeout, what=f"{device} online")
