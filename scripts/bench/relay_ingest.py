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
        [--db postgresql://…] [--tick-devices 100000]
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

T0 = 1_764_000_000_000


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


def main() -> None:
    p = parser(__doc__.splitlines()[0], "relay_ingest")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=3000)
    p.add_argument("--db", default=None, help="postgresql://… (default: SQLite in --workdir)")
    p.add_argument("--tick-devices", type=int, default=100_000)
    a = p.parse_args()
    wd = workdir(a.workdir, "relay_ingest")
    target = a.db or str(wd / "relay.db")
    msgs = messages(a.messages, a.devices)
    res = ingest(target, msgs)
    tick_target = a.db or str(wd / "tick.db")
    if a.db:
        s = RelayStore(a.db)
        s.x("DELETE FROM devices")
        s.close()
    ticks = tick(tick_target, a.tick_devices) if a.tick_devices else {}
    ok = res["msg_per_s"] >= 8000 if not a.db else None
    print_table(f"relay ingest ({'PostgreSQL' if a.db else 'SQLite'})", [
        ("sustained ingest", f"{res['msg_per_s']} msg/s ({res['messages']} in {res['seconds']} s,"
         f" {res['messages_per_batch']} per batch; load {res['load_before']:.1f})",
         "≥ 8,000 msg/s (SQLite)", verdict(ok)),
        ("per CPU-second of the relay", f"{res['msg_per_cpu_s']} msg", "", "-"),
        ("dropped", str(res["dropped"]), "0", verdict(res["dropped"] == 0)),
        *[(f"tick at {a.tick_devices} devices, {k[:-3].replace('_', ' ')}", f"{v} ms", "", "-")
          for k, v in ticks.items()]])
    write_json(a.out, {"machine": machine(), "db": "postgresql" if a.db else "sqlite",
                       "ingest": res, "tick": ticks, "tick_devices": a.tick_devices})


if __name__ == "__main__":
    main()
