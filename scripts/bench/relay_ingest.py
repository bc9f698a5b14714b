#!/usr/bin/env python3
"""Relay ingest: sustained messages per second into the relay's store (issue #19).

Synthetic device messages in the field's mix (per device a health sample each minute, play
records, a few alerts and status changes) go the relay's own way: a producer thread stands in
for paho's network thread and only enqueues (``ctl.ingest.Writer.put``); the writer thread
stores them with ``Relay.handle_batch`` (one transaction per batch). Measured: messages stored
per second from the first put to the last commit, on SQLite (``synchronous=FULL``, WAL) or on
PostgreSQL (``--db postgresql://…``). Also the heartbeat tick at ``--tick-devices`` devices
(by the due-time index; none due, then all due).

Target: ≥ 8,000 msg/s on SQLite. On a shared machine the wall-clock rate follows the load;
the messages stored per CPU-second of the relay's process (both threads) are printed too.

    .venv/bin/python scripts/bench/relay_ingest.py [--messages 100000] [--devices 3000]
        [--db postgresql://…] [--tick-devices 100000] [--mqtt]

``--mqtt`` also runs the whole path: mosquitto, ``ttcs-ctl relay`` as a process, a publisher
(QoS 1); timed from the first publish until every message is in the database.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

from common import machine, parser, print_table, verdict, workdir, write_json

from ctl.ingest import Writer
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore

# recent: inside the health window (the relay prunes older samples at its first tick)
T0 = (int(time.time()) - 3600) // 60 * 60_000
# how the relay is started (RELAY_PROFILE=wrapper.py: under a profiler of one's own)
RELAY_CMD = [os.environ["RELAY_PROFILE"]] if os.environ.get("RELAY_PROFILE") else ["-m", "ctl"]


def messages(n: int, devices: int, seed: int = 1) -> list[tuple[str, bytes, bool, int]]:
    rnd = random.Random(seed)
    seq = [0] * devices
    out = []
    health = {"v": 1, "version": "1.0", "session": 3, "uptime_s": 86400, "agent_uptime_s": 500,
              "system": {"cpu_temp_c": 48.5, "load": [0.3, 0.2, 0.1], "mem_total_mb": 427,
                         "mem_available_mb": 250, "throttled": None},
              "disk_free_mb": {"state": 900, "cache": 4000},
              "clock": {"trusted": True, "source": "kernel"},
              "mqtt": {"reconnects": 0, "outbox": 0},
              "audio": {"ok": True, "playing": None, "volume": 70, "last_level_dbfs": -20.5},
              "cabinet": {"amplifier_on": False, "amplifier_fault": False,
                          "mains_present": True, "door_open": False},
              "modem": {"signal_dbm": -71, "operator": "Viettel", "tech": "LTE"},
              "board": {"link": True}}
    for i in range(n):
        d = i % devices
        now = T0 + (i // devices) * 60_000 + d
        dev = f"prov-dist-com-c{d:05d}"
        r = rnd.random()
        if r < 0.80:
            leaf, body = "health", {**health, "ts": now}
        elif r < 0.97:
            seq[d] += 1
            leaf, body = "event", {"v": 1, "seq": seq[d], "ts": now, "type": "play",
                                   "id": f"c-{i}", "origin": "schedule", "kind": "file",
                                   "priority": "normal", "started": now - 600_000,
                                   "ended": now, "result": "done", "played_ms": 600_000,
                                   "requested_ms": 600_000, "segment": 0, "repeat": 1}
        elif r < 0.99:
            seq[d] += 1
            leaf, body = "event", {"v": 1, "seq": seq[d], "ts": now, "type": "alert",
                                   "state": rnd.choice(("raised", "cleared")),
                                   "code": "door_open", "key": None}
        else:
            leaf, body = "status", {"v": 1, "state": "online", "ts": now, "session": 3}
        out.append((f"ttcs/dev/{dev}/{leaf}", json.dumps(body).encode(), False, now))
    return out


def ingest(target: str, msgs: list) -> dict:
    store = RelayStore(target)
    relay = Relay(store, RelaySettings(channels=["webhook"]))
    writer = Writer(relay)

    def produce() -> None:
        for m in msgs:
            writer.put(*m)

    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    producer = threading.Thread(target=produce)
    producer.start()
    producer.join()
    writer.stop()
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = store.one("SELECT COUNT(*) AS n FROM events")["n"]
    store.close()
    c = relay.counters
    return {"messages": len(msgs), "seconds": round(took, 2), "msg_per_s": round(len(msgs) / took),
            "cpu_s": round(cpu, 2), "msg_per_cpu_s": round(len(msgs) / cpu), "load_before": load,
            "batches": writer.batches, "dropped": c.dropped, "events_stored": n,
            "messages_per_batch": round(len(msgs) / max(1, writer.batches), 1)}


def through_mqtt(wd, msgs: list, timeout_s: float = 600, relays: int = 1,
                 protocol: str = "5", live_rate: float = 0) -> dict:
    """The whole path, as after an outage: a mosquitto, ``ttcs-ctl relay`` as its own process
    (SQLite) started once for its persistent session and stopped, ``msgs`` published (QoS 1,
    no status messages: each one leaves a row to count) and queued by the broker; then the
    relay is started again and timed from its connection until every message is stored.
    ``relays`` > 1: that many relay processes on one SQLite file sharing the subscriptions
    (``relay.shared_group``), timed from the first one's connection. ``live_rate``: the relays
    run first and the messages are published at that rate meanwhile (:func:`publish_paced`):
    sustained ingest rather than a catch-up."""
    import sqlite3
    import subprocess
    import sys

    import yaml

    from tests.conftest import MOSQUITTO, ROOT, free_port, wait_until

    msgs = [m for m in msgs if not m[0].endswith("/status")]
    port = free_port()
    conf = wd / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 0\nmax_inflight_messages 1000\n"
                    f"log_dest file {wd / 'mosquitto.log'}\nlog_type error\n{user}")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    db = wd / "mqtt.db"
    for f in (db, wd / "mqtt.db-wal", wd / "mqtt.db-shm"):
        if f.exists():
            f.unlink()
    cfgs = []
    for i in range(relays):
        cfg = wd / f"ctl{i}.yaml"
        cfg.write_text(yaml.safe_dump({
            "mqtt": {"host": "127.0.0.1", "port": port, "protocol": protocol},
            "relay": {"db_path": str(db), "tick_s": 1, "client_id": f"ttcs-relay-{i}",
                      "shared_group": "relays" if relays > 1 else None}}))
        cfgs.append(cfg)
    logs = [wd / f"relay{i}.log" for i in range(relays)]
    for f in logs:
        f.write_bytes(b"")
    procs: list = []
    try:
        time.sleep(0.5)
        def start_relays(times: int) -> list:
            out = [subprocess.Popen([sys.executable, *RELAY_CMD, "--config", str(cfg), "relay"],
                                    cwd=ROOT, stdout=open(f, "ab"), stderr=subprocess.STDOUT)
                   for cfg, f in zip(cfgs, logs, strict=True)]
            wait_until(lambda: min(f.read_bytes().count(b"relay connected") for f in logs)
                       >= times, 60, interval=0.005, what="relay connected")
            return out

        procs = start_relays(1)
        for proc in procs:
            proc.terminate()
            proc.wait(60)

        def stored() -> int:
            c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return c.execute("SELECT (SELECT COUNT(*) FROM events) + (SELECT"
                                 " COALESCE(SUM(n), 0) FROM health_5m)").fetchone()[0]
            finally:
                c.close()

        live = {}
        if live_rate:  # relays running, messages published at live_rate meanwhile
            procs = start_relays(2)
            start = time.perf_counter()
            live = publish_paced(port, msgs, live_rate, stored)
            published = live["publish_s"]
        else:  # queued by the broker for the relays' sessions, as fast as it takes them
            published = publish_paced(port, msgs, 15_000, None)["publish_s"]
            procs = start_relays(2)
            start = time.perf_counter()
        while stored() < len(msgs) and time.perf_counter() - start < timeout_s:
            time.sleep(0.1)
        took = time.perf_counter() - start
        n = stored()
        if live:
            live["drained_s"] = round(took - live["publish_s"], 2)
        relay_cpu = 0.0
        for proc in procs:
            fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            relay_cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        load = os.getloadavg()[0]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        broker.terminate()
        broker.wait(10)
    return {"messages": len(msgs), "stored": n, "seconds": round(took, 2),
            "msg_per_s": round(len(msgs) / took), "published_before_s": round(published, 2),
            "relay_cpu_s": round(relay_cpu, 2), "relays": relays, "protocol": protocol,
            "msg_per_relay_cpu_s": round(len(msgs) / max(relay_cpu, 0.01)),
            "load_after": round(load, 1), **live}


def publish_paced(port: int, msgs: list, rate: float, stored) -> dict:
    """Publish ``msgs`` (QoS 1) at ``rate`` a second from one gmqtt connection (cheaper than
    paho: the publisher shares the 2 cores with the relays and the broker), in steps of
    10 ms; ``stored()`` (if given) is sampled each second: the backlog (published − stored)
    shows whether the relays keep up. Returns the rates and the largest backlog."""
    import asyncio

    import gmqtt

    backlog: list[int] = []

    async def run() -> float:
        c = gmqtt.Client("bench-pub-live")
        # 3.1.1: no Receive Maximum from the broker to respect (gmqtt does not hold back
        # QoS 1 publications for it; an MQTT 5 publisher past it is disconnected)
        await c.connect("127.0.0.1", port, version=gmqtt.constants.MQTTv311)
        t0, sent, next_sample = time.perf_counter(), 0, 1.0
        while sent < len(msgs):
            elapsed = time.perf_counter() - t0
            due = min(len(msgs), int(elapsed * rate))
            for topic, payload, _, _ in msgs[sent:due]:
                c.publish(topic, payload, qos=1)
            sent = max(sent, due)
            if stored is not None and elapsed >= next_sample:
                next_sample += 1.0
                backlog.append(sent - stored())
            await asyncio.sleep(0.01)
        took = time.perf_counter() - t0
        await c.disconnect()
        return took

    took = asyncio.run(run())
    # stored per second in the second half of the run (samples a second apart; the last one
    # is left out: it races the end): the rate kept once the relays are warm
    half = backlog[len(backlog) // 2:-1]
    steady = round(rate - (half[-1] - half[0]) / (len(half) - 1)) if len(half) > 1 else None
    return {"live_rate": rate, "publish_s": round(took, 2),
            "published_per_s": round(len(msgs) / took), "steady_stored_per_s": steady,
            "backlog_max": max(backlog, default=0), "backlog_samples": backlog}


def tick(target: str, n: int) -> dict:
    """The heartbeat check at ``n`` online devices: none due, then every one due."""
    store = RelayStore(target)
    with store.tx():
        store.many("INSERT INTO devices(device, online, last_seen_ms, first_seen_ms,"
                   " next_check_ms) VALUES(?, 1, ?, ?, ?)",
                   [(f"d{i:06d}", T0, T0, T0 + 180_000 + i) for i in range(n)])
    relay = Relay(store, RelaySettings(heartbeat_default_s=60, missed_beats=3))
    out = {}
    for name, now in (("none_due_ms", T0 + 1000), ("all_due_ms", T0 + 400_000)):
        start = time.perf_counter()
        while True:  # a tick handles at most 5,000 due devices; the next ticks the rest
            with store.tx():
                relay._check_heartbeats(now)
            if name == "none_due_ms" or not store.one(
                    "SELECT 1 AS x FROM devices WHERE next_check_ms < ? LIMIT 1", now):
                break
        out[name] = round((time.perf_counter() - start) * 1000, 2)
    store.close()
    return out


def _mqtt_row(mq: dict) -> tuple:
    head = (f"through mosquitto: {mq['relays']} relay process(es), MQTT {mq['protocol']},"
            f" {'live' if mq.get('live_rate') else 'catching up'}")
    cpu = (f"relay CPU {mq['relay_cpu_s']} s = {mq['msg_per_relay_cpu_s']} msg per CPU-s;"
           f" load {mq['load_after']}")
    if mq.get("live_rate"):
        # kept up with ≥ 8,000 a second: everything stored, within 2 s of the last, and once
        # warm (the second half) at the rate published (within 2 %: the pacing's granularity)
        ok = mq["stored"] == mq["messages"] and mq["live_rate"] >= 8000 \
            and (mq["steady_stored_per_s"] or 0) >= 0.98 * mq["live_rate"] \
            and mq["drained_s"] <= 2.0
        return (head, f"{mq['steady_stored_per_s']} msg/s stored in the second half while"
                f" {mq['published_per_s']} msg/s were published for {mq['publish_s']} s;"
                f" {mq['stored']} of {mq['messages']} stored {mq['drained_s']} s after the"
                f" last; backlog max {mq['backlog_max']}; {cpu})", "≥ 8,000 msg/s",
                verdict(ok))
    return (head, f"{mq['msg_per_s']} msg/s ({mq['stored']} of {mq['messages']} queued by"
            f" the broker, stored {mq['seconds']} s after the relay connected; {cpu})",
            "≥ 8,000 msg/s", verdict(mq["stored"] == mq["messages"]
                                     and mq["msg_per_s"] >= 8000))


def main() -> None:
    p = parser(__doc__.splitlines()[0], "relay_ingest")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=3000)
    p.add_argument("--db", default=None, help="postgresql://… (default: SQLite in --workdir)")
    p.add_argument("--tick-devices", type=int, default=100_000)
    p.add_argument("--mqtt", action="store_true",
                   help="also through mosquitto and the relay process (SQLite)")
    p.add_argument("--mqtt-only", action="store_true", help="only the --mqtt part")
    p.add_argument("--relays", type=int, default=1,
                   help="--mqtt: relay processes sharing the subscriptions")
    p.add_argument("--protocol", default="5", choices=["5", "3.1.1"],
                   help="--mqtt: the relays' MQTT version")
    p.add_argument("--live-rate", type=float, default=0,
                   help="--mqtt: publish at this rate while the relays run (default: queue"
                        " everything first, then time the catch-up)")
    a = p.parse_args()
    wd = workdir(a.workdir, "relay_ingest")
    target = a.db or str(wd / "relay.db")
    msgs = messages(a.messages, a.devices)
    if a.mqtt_only:
        mq = through_mqtt(wd, msgs, relays=a.relays, protocol=a.protocol,
                          live_rate=a.live_rate)
        print_table("relay ingest through mosquitto (SQLite)", [_mqtt_row(mq)])
        write_json(a.out, {"machine": machine(), "db": "sqlite", "mqtt": mq})
        return
    res = ingest(target, msgs)
    tick_target = a.db or str(wd / "tick.db")
    if a.db:
        s = RelayStore(a.db)
        s.x("DELETE FROM devices")
        s.close()
    ticks = tick(tick_target, a.tick_devices) if a.tick_devices else {}
    ok = res["msg_per_s"] >= 8000 if not a.db else None
    mq = through_mqtt(wd, msgs, relays=a.relays, protocol=a.protocol,
                          live_rate=a.live_rate) if a.mqtt else None
    print_table(f"relay ingest ({'PostgreSQL' if a.db else 'SQLite'})", [
        ("sustained ingest", f"{res['msg_per_s']} msg/s ({res['messages']} in {res['seconds']} s,"
         f" {res['messages_per_batch']} per batch; load {res['load_before']:.1f})",
         "≥ 8,000 msg/s (SQLite)", verdict(ok)),
        ("per CPU-second of the relay", f"{res['msg_per_cpu_s']} msg", "", "-"),
        ("dropped", str(res["dropped"]), "0", verdict(res["dropped"] == 0)),
        *[(f"tick at {a.tick_devices} devices, {k[:-3].replace('_', ' ')}", f"{v} ms", "", "-")
          for k, v in ticks.items()],
        *([_mqtt_row(mq)] if mq else [])])
    write_json(a.out, {"machine": machine(), "db": "postgresql" if a.db else "sqlite",
                       "ingest": res, "tick": ticks, "tick_devices": a.tick_devices,
                       "mqtt": mq})


if __name__ == "__main__":
    main()
