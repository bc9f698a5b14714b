"""Shared helpers for the benchmarks: the machine, brokers and agents, tables and JSON.

The benches reuse the test harness (``tests/conftest.py``: a real mosquitto on a free port,
agent processes, signing keys), so they measure the same parts the tests exercise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from tests.conftest import (  # noqa: E402,F401 - re-exported for the benches
    AgentProcess,
    Broker,
    Keys,
    agent_config,
    wait_until,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parser(description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(ROOT / "bench-results" / f"{name}.json"),
                   help="where to write the JSON results (default: %(default)s)")
    p.add_argument("--workdir", default=None,
                   help="folder for brokers, configs and state (default: a new temp folder)")
    return p


def workdir(arg: str | None, name: str) -> Path:
    if arg:
        Path(arg).mkdir(parents=True, exist_ok=True)
        return Path(arg)
    return Path(tempfile.mkdtemp(prefix=f"ttcs-bench-{name}-"))


# --- the machine -----------------------------------------------------------------------------

def machine() -> dict:
    """What the figures came from, and how busy the machine was."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gb": round(mem_kb / 2**20, 1),
            "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit}


def rss_kb(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- statistics and output -------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """Rows of (metric, measured, target, verdict)."""
    header = ("metric", "measured", "target", "ok")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    print(f"\n{title}")
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"\nresults written to {path}")


# --- MQTT --------------------------------------------------------------------------------------

class Recorder:
    """A subscriber that hands each message, with its arrival time, to ``on_message``."""

    def __init__(self, port: int, topics: list[str], on_message, client_id: str = "bench-rec",
                 persistent: bool = False) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"{client_id}-{os.getpid()}", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, msg: on_message(time.monotonic(), msg.topic,
                                                              bytes(msg.payload))
        self.client.reconnect_delay_set(0.05, 0.2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("recorder did not subscribe")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
