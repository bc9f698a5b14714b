#!/usr/bin/env python3
"""The console's fleet page at district scale (issue #17): 2,000 devices.

Set-up: mosquitto, ``ttcs-ctl serve`` as a process (relay + console, SQLite store), an admin
user, and a simulator publishing for ``--devices`` devices their retained ``status`` and
``state``, then ``health`` every ``--health-s`` seconds each (the field sends one a minute;
the default 10 s is six times the field's rate) while the page is measured.

Measured, with that traffic flowing:
- the fleet page ``/`` (all devices in the table and on the map): the server's own time (its
  ``Server-Timing`` header) and the time the client waited, over ``--requests`` loads; p50/p95;
- the live update: a device's status changed on the broker (offline, then online again) →
  its ``device`` event read from ``/events`` (server-sent events), ``--changes`` times; p50/p95.

Targets: page server time ≤ 300 ms p95; live update ≤ 2 s.

    .venv/bin/python scripts/bench/console_fleet.py [--devices 2000] [--requests 60]
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time

import paho.mqtt.client as mqtt
import requests
from common import (
    Broker,
    Keys,
    machine,
    parser,
    percentile,
    print_table,
    rss_kb,
    verdict,
    wait_until,
    workdir,
    write_json,
)
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port
from tests.console_support import PASSWORD, Serve, add_user, ctl_config


def device(i: int) -> str:
    return f"gialai-krongpa-x{i // 50:02d}-c{i % 50:02d}"


SILENT: set[str] = set()  # devices "down" for the live measurement: no health from them


def simulator(port: int, n: int, health_s: float, stop: threading.Event) -> threading.Thread:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sim")
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    now = int(time.time() * 1000)
    for i in range(n):
        d = device(i)
        client.publish(f"ttcs/dev/{d}/status", json.dumps(
            {"v": 1, "state": "online", "ts": now, "session": 1}), qos=1, retain=True)
        state = {"v": 1, "ts": now, "device": d, "version": "0.1.0", "session": 1,
                 "playing": {"id": "sched-sang", "priority": "normal"} if i % 7 == 0 else None,
                 "volume": 60 + i % 30, "queue": [],
                 "alerts": [{"code": "door_open", "key": "cabinet"}] if i % 97 == 0 else []}
        client.publish(f"ttcs/dev/{d}/state", json.dumps(state), qos=1, retain=True)

    def run() -> None:
        health = {"v": 1, "system": {"cpu_temp_c": 48, "load": [0.3, 0.2, 0.1]},
                  "audio": {"volume": 70}, "modem": {"signal_dbm": -71}}
        per = health_s / n
        i = 0
        next_t = time.monotonic()
        while not stop.is_set():
            d = device(i % n)
            if d not in SILENT:
                client.publish(f"ttcs/dev/{d}/health",
                               json.dumps({**health, "ts": int(time.time() * 1000)}), qos=0)
            i += 1
            next_t += per
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        client.disconnect()
        client.loop_stop()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.client = client  # type: ignore[attr-defined]
    return t


def login(base: str) -> requests.Session:
    s = requests.Session()
    page = s.get(base + "/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = s.post(base + "/login", data={"name": "admin", "password": PASSWORD, "csrf": token})
    r.raise_for_status()
    return s


def main() -> int:
    p = parser(__doc__.split("\n")[0], "console_fleet")
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--health-s", type=float, default=10.0)
    args = p.parse_args()
    work = workdir(args.workdir, "console_fleet")
    broker = Broker(work / "broker").start()
    port = free_port()
    config = ctl_config(work, broker.port, Keys(), port, live_interval_s=0.5)  # the default
    add_user(config, work, "admin", "admin")
    serve = Serve(config, port, work / "serve.log").start()
    stop = threading.Event()
    sim = simulator(broker.port, args.devices, args.health_s, stop)
    results: dict = {"machine_before": machine(), "devices": args.devices,
                     "health_per_s": args.devices / args.health_s}
    try:
        s = login(serve.url)
        wait_until(lambda: len(s.get(serve.url + "/api/fleet").json()["devices"])
                   >= args.devices, 120, interval=0.5, what="every device in the fleet")
        server_ms, client_ms = [], []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            r = s.get(serve.url + "/")
            client_ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            server_ms.append(float(r.headers["server-timing"].split("dur=")[1]))
        rows = r.text.count('<tr id="dev-')
        assert rows == args.devices, rows
        live = measure_live(serve.url, s, sim.client, args.devices, args.changes)
        results.update({
            "page_bytes": len(r.content), "rows": rows,
            "server_ms": {"p50": percentile(server_ms, 50), "p95": percentile(server_ms, 95),
                          "max": max(server_ms)},
            "client_ms": {"p50": percentile(client_ms, 50), "p95": percentile(client_ms, 95)},
            "live_s": {"p50": percentile(live, 50), "p95": percentile(live, 95),
                       "max": max(live)},
            "serve_rss_mb": rss_kb(serve.proc.pid) / 1024, "machine_after": machine()})
    finally:
        stop.set()
        sim.join(5)
        serve.stop()
        broker.stop()
    ok_page = results["server_ms"]["p95"] <= 300
    ok_live = results["live_s"]["max"] <= 2.0
    print_table(f"console fleet page, {args.devices} devices, "
                f"{results['health_per_s']:.0f} health msg/s; load before"
                f" {results['machine_before']['loadavg'][0]:.2f}", [
        ("page server time p95", f"{results['server_ms']['p95']:.0f} ms", "≤ 300 ms",
         verdict(ok_page)),
        ("page server time p50", f"{results['server_ms']['p50']:.0f} ms", "", ""),
        ("page as the client waited p95", f"{results['client_ms']['p95']:.0f} ms", "", ""),
        ("page size", f"{results['page_bytes'] / 1024:.0f} KiB", "", ""),
        ("live update p50 / p95 / max", f"{results['live_s']['p50']:.2f} /"
         f" {results['live_s']['p95']:.2f} / {results['live_s']['max']:.2f} s", "≤ 2 s",
         verdict(ok_live)),
        ("serve process RSS (relay + console)", f"{results['serve_rss_mb']:.0f} MB", "", "")])
    write_json(args.out, results)
    return 0 if ok_page and ok_live else 1


def measure_live(base: str, s: requests.Session, client, n: int, changes: int) -> list[float]:
    """Status changes published → their ``device`` event on ``/events``."""
    arrived: dict[str, float] = {}
    stream = s.get(base + "/events", stream=True, timeout=30)
    want: dict[str, str] = {}

    def read() -> None:
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "device":
                d = json.loads(line[6:])
                link = "offline" if d["status"] == "offline" else "online"  # or playing
                if want.get(d["device"]) == link:
                    arrived.setdefault(d["device"] + link, time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    rnd = random.Random(17)
    out = []
    for k in range(changes):
        d = device(rnd.randrange(n))
        SILENT.add(d)  # a device that is down sends no health (which would bring it back)
        for state in ("offline", "online"):
            want[d] = state
            t0 = time.monotonic()
            body = {"v": 1, "state": state, "ts": int(time.time() * 1000), "session": 1 + k}
            if state == "offline":
                body["reason"] = "lost"
            client.publish(f"ttcs/dev/{d}/status", json.dumps(body), qos=1, retain=True)
            wait_until(lambda d=d, state=state: d + state in arrived, 10, interval=0.01,
                       what=f"{d} {state} on /events")
            out.append(arrived.pop(d + state) - t0)
        SILENT.discard(d)
    stream.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
