#!/usr/bin/env python3
"""Measure the disk writes of an idle agent (SD-card wear), extrapolated to one hour.

Starts a private mosquitto and one agent with the sim audio/GPIO backends and the default
intervals (health every 60 s), lets it settle, then samples over a window:

- ``write_bytes`` from /proc/PID/io: bytes the agent caused to be sent to the block layer
  (what reaches the SD card, before the card's own write amplification), minus
  ``cancelled_write_bytes``;
- ``wchar`` and ``syscw``: bytes and calls of write(2) and friends (an upper bound);
- the size of the state and cache folders (growth = files that grow);
- the agent's own log output on stdout (what journald would store).

The state folder must live on a disk-backed file system (tmpfs shows no block writes), so the
default work folder is under /var/tmp.

    .venv/bin/python scripts/bench/idle_writes.py --minutes 10 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
IO_KEYS = ("wchar", "syscw", "write_bytes", "cancelled_write_bytes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_io(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            values[key.strip()] = int(value)
    return {k: values[k] for k in IO_KEYS}


def folder_bytes(path: Path) -> int:
    return sum(file_sizes(path).values())


def file_sizes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def start_broker(work: Path, port: int) -> subprocess.Popen:
    conf = work / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def write_config(work: Path, port: int) -> Path:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import protocol

    cfg = {
        "device": {"id": "bench-idle", "groups": ["bench"]},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "ttcs"},
        "security": {"trusted_keys": {"bench": protocol.public_key_b64(
            Ed25519PrivateKey.generate())}},
        "paths": {"state_dir": str(work / "state"), "cache_dir": str(work / "cache")},
        "audio": {"backend": "sim"},
        "gpio": {"backend": "sim"},
        "clock": {"trust": "always"},
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sample(pid: int, work: Path, log: Path) -> dict[str, int | float]:
    return {"t": time.monotonic(), **read_io(pid),
            "state_bytes": folder_bytes(work / "state"),
            "cache_bytes": folder_bytes(work / "cache"),
            "log_bytes": log.stat().st_size}


def per_hour(first: dict, last: dict) -> dict[str, float]:
    hours = (last["t"] - first["t"]) / 3600
    keys = [k for k in first if k != "t"]
    return {k: round((last[k] - first[k]) / hours) for k in keys}


def measure(work: Path, minutes: float, warmup_s: float) -> dict:
    port = free_port()
    broker = start_broker(work, port)
    config_path = write_config(work, port)
    log = work / "agent.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                  str(config_path)], stdout=out, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=env)
    try:
        time.sleep(warmup_s)
        if agent.poll() is not None:
            raise RuntimeError(f"agent exited: {log.read_text()[-2000:]}")
        first = sample(agent.pid, work, log)
        files_first = file_sizes(work / "state")
        time.sleep(minutes * 60)
        last = sample(agent.pid, work, log)
        files_last = file_sizes(work / "state")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        broker.terminate()
        broker.wait(5)
    return {"window_s": round(last["t"] - first["t"]), "warmup_s": warmup_s,
            "first": first, "last": last, "per_hour": per_hour(first, last),
            "state_files": {name: [files_first.get(name, 0), size]
                            for name, size in sorted(files_last.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the window")
    parser.add_argument("--workdir", default="/var/tmp", help="disk-backed parent folder")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="ttcs-idle-", dir=args.workdir) as tmp:
        result = measure(Path(tmp), args.minutes, args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    h = result["per_hour"]
    net_block = h["write_bytes"] - h["cancelled_write_bytes"]
    print(f"window {result['window_s']} s after {args.warmup:.0f} s warm-up; per hour:")
    print(f"  block-layer writes  {net_block / 1024:10.1f} KiB  (write_bytes - cancelled)")
    print(f"  write(2) bytes      {h['wchar'] / 1024:10.1f} KiB in {h['syscw']} calls")
    print(f"  state dir growth    {h['state_bytes'] / 1024:10.1f} KiB")
    print(f"  cache dir growth    {h['cache_bytes'] / 1024:10.1f} KiB")
    print(f"  log output (stdout) {h['log_bytes'] / 1024:10.1f} KiB")
    for name, (before, after) in result["state_files"].items():
        print(f"  state/{name}: {before} -> {after} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
