#!/usr/bin/env python3
"""What an idle MQTT connection costs the load generator: CPU per keepalive and memory (issue #19).

N clients of one library (``paho``: the old generator's selector loop over paho clients;
``gmqtt``: one asyncio loop; ``minimal``: ``loadgen_mqtt.Client`` in one asyncio loop)
connect to a quiet mosquitto, as the simulated devices do (MQTT 5, persistent session, a
will, a subscription), then stay idle for ``--idle-s``: only keepalive pings. Each library
runs in its own process, which reports its CPU seconds and resident memory over the idle
time and per client. A short ``--keepalive`` multiplies the pings to make them measurable.

    .venv/bin/python scripts/bench/mqtt_idle.py --clients 3000 --keepalive 10 --idle-s 40
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import time

from common import ROOT, machine, parser, write_json
from loadgen import QuietBroker
from loadgen_mqtt import Client

LIBS = ("minimal", "gmqtt", "paho")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _minimal(n: int, port: int, keepalive: int, idle_s: float) -> dict:
    up = 0

    def connected(_present: bool, c: list) -> None:
        nonlocal up
        up += 1
        c[0].subscribe(f"idle/{c[0].client_id}/cmd")

    clients = []
    for i in range(n):
        box: list = []
        c = Client(f"idle-{i}", keepalive, will_topic=f"idle/{i}/status", will_payload=b"x",
                   on_connect=lambda p, box=box: connected(p, box),
                   on_message=lambda t, p: None, on_lost=lambda e: None)
        box.append(c)
        clients.append(c)
        await c.connect("127.0.0.1", port)
    while up < n:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    rss, cpu, t = _rss_kb(), _cpu(), time.monotonic()
    slots = max(1, keepalive // 4)
    k = 0
    while time.monotonic() < t + idle_s:  # the fleet's pinger: a slice of the clients a second
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for c in clients[k % slots::slots]:
            c.ping_if_idle(now, keepalive / 2)
        k += 1
    return {"cpu_s": _cpu() - cpu, "rss_kb": rss, "wall_s": time.monotonic() - t,
            "connected_at_end": sum(c.connected for c in clients)}


async def _gmqtt(n: int, port: int, keepalive: int, idle_s: float) -> dict:
    import gmqtt

    clients = []
    for i in range(n):
        c = gmqtt.Client(f"idle-{i}", clean_session=False, session_expiry_interval=86400,
                         will_message=gmqtt.Message(f"idle/{i}/status", b"x", qos=1,
                                                    retain=True))
        c.set_config({"reconnect_retries": 0})
        await c.connect("127.0.0.1", port, keepalive=keepalive)
        c.subscribe(f"idle/{i}/cmd", qos=1)
        clients.append(c)
    await asyncio.sleep(1.0)
    rss, cpu, t = _rss_kb(), _cpu(), time.monotonic()
    await asyncio.sleep(idle_s)
    return {"cpu_s": _cpu() - cpu, "rss_kb": rss, "wall_s": time.monotonic() - t,
            "connected_at_end": sum(c.is_connected for c in clients)}


def _paho(n: int, port: int, keepalive: int, idle_s: float) -> dict:
    import selectors

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    sel = selectors.DefaultSelector()
    clients = []
    for i in range(n):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"idle-{i}",
                        protocol=mqtt.MQTTv5)
        c.will_set(f"idle/{i}/status", b"x", 1, True)
        c.on_connect = lambda c, u, f, rc, p, i=i: c.subscribe(f"idle/{i}/cmd", 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        c.connect("127.0.0.1", port, keepalive=keepalive, clean_start=False, properties=props)
        sel.register(c.socket(), selectors.EVENT_READ, c)
        clients.append(c)

    def loop(until: float, misc_at: list) -> None:  # the old generator's Fleet.run
        last = 0.0
        while time.monotonic() < until:
            for key, _ in sel.select(0.05):
                key.data.loop_read()
                if key.data.want_write():
                    key.data.loop_write()
            now = time.monotonic()
            if now - last >= 1.0:
                last = now
                for c in clients[misc_at[0]::10]:
                    c.loop_misc()
                    if c.want_write():
                        c.loop_write()
                misc_at[0] = (misc_at[0] + 1) % 10

    for c in clients:
        c.loop_write()
    loop(time.monotonic() + 5.0, [0])
    rss, cpu, t = _rss_kb(), _cpu(), time.monotonic()
    loop(t + idle_s, [0])
    return {"cpu_s": _cpu() - cpu, "rss_kb": rss, "wall_s": time.monotonic() - t,
            "connected_at_end": sum(c.is_connected() for c in clients)}


def child(lib: str, n: int, port: int, keepalive: int, idle_s: float) -> None:
    base = _rss_kb()
    if lib == "paho":
        out = _paho(n, port, keepalive, idle_s)
    else:
        out = asyncio.run((_minimal if lib == "minimal" else _gmqtt)(n, port, keepalive,
                                                                     idle_s))
    out["rss_before_kb"] = base
    print(json.dumps(out), flush=True)


def main() -> int:
    p = parser("Idle cost of an MQTT connection in the load generator (issue #19).", "mqtt_idle")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--keepalive", type=int, default=10)
    p.add_argument("--idle-s", type=float, default=40.0)
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--child", default="")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.child:
        child(args.child, args.clients, args.port, args.keepalive, args.idle_s)
        return 0
    from common import workdir

    folder = workdir(args.workdir, "mqtt-idle")
    results = {"clients": args.clients, "keepalive_s": args.keepalive, "idle_s": args.idle_s,
               "libs": {}}
    for lib in args.libs.split(","):
        broker = QuietBroker(folder / f"broker-{lib}").start()
        try:
            out = subprocess.run([sys.executable, __file__, "--child", lib, "--clients",
                                  str(args.clients), "--port", str(broker.port),
                                  "--keepalive", str(args.keepalive), "--idle-s",
                                  str(args.idle_s)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=args.idle_s + 300)
        finally:
            broker.stop()
        if out.returncode:
            results["libs"][lib] = {"error": out.stderr[-2000:]}
            print(lib, "failed:", out.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        periods = r["wall_s"] / args.keepalive
        r["cpu_us_per_client_per_keepalive"] = round(r["cpu_s"] / args.clients / periods * 1e6, 1)
        r["cpu_pct_of_a_core"] = round(100 * r["cpu_s"] / r["wall_s"], 2)
        r["kb_per_client"] = round((r["rss_kb"] - r["rss_before_kb"]) / args.clients, 1)
        results["libs"][lib] = r
        print(lib, json.dumps(r), flush=True)
    results["machine"] = machine()
    results["pid"] = os.getpid()
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
