#!/usr/bin/env python3
"""Measure the disk writes the airing journal adds while an item airs (SD-card wear).

The same agent and sampling as ``idle_writes.py`` (a private mosquitto, sim audio, default
intervals, ``/proc/PID/io`` and the state folder), over two windows of the same length: first
idle, then while a long ``play`` command airs (a WAV of a few hours, served from a local HTTP
server; the sim output airs nothing but keeps the item on air). The difference, per hour, is
what airing costs: the journal's position every ``audio.journal_interval_s`` plus whatever
else an airing item writes. ``--interval`` sets that key (default 10, the agent's default).

    .venv/bin/python scripts/bench/airing_writes.py --minutes 5 [--interval 10] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from idle_writes import ROOT, free_port, per_hour, sample, start_broker, write_config

sys.path.insert(0, str(ROOT))

from agent.audio.tone import write_tone
from tests.conftest import Keys, Watcher, wait_online
from tests.test_schedule_service import MediaServer

DEVICE = "bench-idle"  # idle_writes' device id


def configure(work: Path, port: int, keys: Keys, interval_s: float) -> Path:
    """idle_writes' config, plus the signing key, the media host and the journal interval."""
    path = write_config(work, port)
    cfg = yaml.safe_load(path.read_text())
    cfg["security"] = {"trusted_keys": {keys.kid: keys.public_b64},
                       "media_hosts": ["127.0.0.1"]}
    cfg["audio"]["journal_interval_s"] = interval_s
    path.write_text(yaml.safe_dump(cfg))
    return path


def window(pid: int, work: Path, log: Path, minutes: float) -> dict:
    first = sample(pid, work, log)
    time.sleep(minutes * 60)
    last = sample(pid, work, log)
    return {"window_s": round(last["t"] - first["t"]), "per_hour": per_hour(first, last)}


def measure(work: Path, minutes: float, warmup_s: float, interval_s: float) -> dict:
    (work / "www").mkdir()
    wav = work / "www" / "long.wav"
    write_tone(str(wav), seconds=minutes * 60 * 3, rate=8000)  # airs past the window
    media = MediaServer(work / "www")
    keys = Keys()
    port = free_port()
    broker = start_broker(work, port)
    log = work / "agent.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                  str(configure(work, port, keys, interval_s))],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    watcher = Watcher(port, ["ttcs/#"])
    try:
        wait_online(watcher, DEVICE)
        time.sleep(warmup_s)
        idle = window(agent.pid, work, log, minutes)
        cmd = keys.command(f"dev/{DEVICE}", "play", {"media": {
            "url": media.url("long.wav"), "sha256": hashlib.sha256(wav.read_bytes()).hexdigest()}})
        watcher.publish(f"ttcs/dev/{DEVICE}/cmd", cmd)
        watcher.wait_ack(cmd["id"], "started", 60)
        time.sleep(15)  # the command's own writes (replay id, acks) settle
        airing = window(agent.pid, work, log, minutes)
        if any(a.get("stage") in ("done", "failed") for a in watcher.acks(cmd["id"])):
            raise RuntimeError("the item stopped airing inside the window")
    finally:
        watcher.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        broker.terminate()
        broker.wait(5)
        media.close()
    extra = {k: airing["per_hour"][k] - idle["per_hour"][k] for k in idle["per_hour"]}
    return {"interval_s": interval_s, "idle": idle, "airing": airing, "extra_per_hour": extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each window")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="audio.journal_interval_s")
    parser.add_argument("--workdir", default="/var/tmp", help="disk-backed parent folder")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttcs-airing-", dir=args.workdir) as tmp:
        result = measure(Path(tmp), args.minutes, args.warmup, args.interval)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"journal every {args.interval:g} s; windows of {args.minutes:g} min; per hour:")
    for name in ("idle", "airing", "extra_per_hour"):
        h = result[name] if name == "extra_per_hour" else result[name]["per_hour"]
        block = h["write_bytes"] - h["cancelled_write_bytes"]
        print(f"  {name:15s} block-layer {block / 1024:9.1f} KiB  write(2) "
              f"{h['wchar'] / 1024:9.1f} KiB in {h['syscw']} calls  state dir "
              f"{h['state_bytes'] / 1024:+8.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
