#!/usr/bin/env python3
"""Outbox: 24 hours of offline records delivered after reconnecting (issue #9).

Target: health every 60 s plus play records and alerts for ``--hours`` hours, all delivered
within 10 s of the agent coming back online; none lost (every event ``seq`` and every health
sample arrives), in order (first arrivals in creation order).

The backlog is written with the agent's own ``Store.enqueue`` (the same rows, transactions and
``seq`` numbering the agent writes while offline), backdated over the period; then the agent is
started with the broker down, the broker is started, and a persistent subscriber times the
delivery from the agent's ``online`` status to the last record.

    .venv/bin/python scripts/bench/outbox.py [--hours 24] [--plays-per-hour 6] [--alerts 20]
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from common import (
    AgentProcess,
    Broker,
    Keys,
    Recorder,
    agent_config,
    machine,
    parser,
    print_table,
    verdict,
    wait_until,
    workdir,
    write_json,
)

from agent.core.store import Store

DEV = "outbox-01"


def backlog(hours: float, plays_per_hour: int, alerts: int, now_ms: int) -> list[tuple]:
    """(created_ms, kind, body) for the period, oldest first."""
    start = now_ms - int(hours * 3600_000)
    rng = random.Random(1)
    rows = [(start + i * 60_000, "health", health_body(start + i * 60_000, i))
            for i in range(int(hours * 60))]
    for i in range(int(hours * plays_per_hour)):
        t = start + rng.randrange(int(hours * 3600_000))
        rows.append((t, "play", play_body(t, i)))
    for i in range(alerts):
        t = start + rng.randrange(int(hours * 3600_000))
        rows.append((t, "alert", {"v": 1, "ts": t, "type": "alert", "code": "mains_lost",
                                  "state": "raised" if i % 2 == 0 else "cleared",
                                  "detail": {"input": "mains"}}))
    return sorted(rows, key=lambda r: r[0])


def health_body(ts: int, i: int) -> dict:
    return {"v": 1, "ts": ts, "uptime_s": 86400 + i * 60, "version": "0.1.0",
            "cpu": {"temp_c": 51.2, "load1": 0.21}, "memory": {"used_mb": 180, "total_mb": 427},
            "disk": {"state_free_mb": 5120, "cache_free_mb": 5120}, "clock_trusted": True,
            "clock_source": "kernel", "mqtt_reconnects": 3, "outbox_depth": i,
            "audio": {"output_ok": True, "playing": None, "volume": 80},
            "amplifier": "off", "mains": True, "door": "closed",
            "modem": {"rssi_dbm": -81, "operator": "Viettel"}}


def play_body(ts: int, i: int) -> dict:
    return {"v": 1, "ts": ts + 300_000, "type": "play", "id": f"sched-{i}", "source": "schedule",
            "media": [{"url": "https://media.example.vn/ban-tin.mp3", "sha256": "ab" * 32}],
            "priority": "normal", "started": ts, "ended": ts + 300_000, "result": "done",
            "played_ms": 300_000, "requested_ms": 300_000}


def fill(db: Path, rows: list[tuple]) -> None:
    store = Store(str(db))
    topic = f"ttcs/dev/{DEV}"
    for created, kind, body in rows:
        body = {**body, "historical": True}
        if kind == "health":
            store.enqueue(f"{topic}/health", body, qos=1, kind="health", now_ms=created)
        else:
            store.enqueue(f"{topic}/event", body, qos=1, kind=kind, now_ms=created, event=True)
    store.close()


class Arrivals:
    def __init__(self) -> None:
        self.online_at: float | None = None
        self.last_at = 0.0
        self.seqs: list[int] = []
        self.health: list[int] = []
        self._seen: set[bytes] = set()

    def on_message(self, t: float, topic: str, payload: bytes) -> None:
        body = json.loads(payload)
        if topic.endswith("/status"):
            if body.get("state") == "online" and self.online_at is None:
                self.online_at = t
            return
        if payload in self._seen:
            return  # at least once: a re-send is byte-identical
        self._seen.add(payload)
        self.last_at = t
        if topic.endswith("/event"):
            self.seqs.append(body["seq"])
        elif topic.endswith("/health") and body.get("historical"):
            self.health.append(body["ts"])


def main() -> int:
    p = parser(__doc__.splitlines()[0], "outbox")
    p.add_argument("--hours", type=float, default=24)
    p.add_argument("--plays-per-hour", type=int, default=6)
    p.add_argument("--alerts", type=int, default=20)
    args = p.parse_args()
    base = workdir(args.workdir, "outbox")
    rows = backlog(args.hours, args.plays_per_hour, args.alerts, int(time.time() * 1000))
    n_events = sum(1 for r in rows if r[1] != "health")
    n_health = len(rows) - n_events
    broker = Broker(base / "broker", persistence=True)
    keys = Keys()
    cfg = agent_config(base, broker.port, keys, device=DEV,
                       mqtt={"reconnect_min_s": 0.5, "reconnect_max_s": 1})
    fill(base / DEV / "state" / "agent.db", rows)
    agent = AgentProcess(cfg, base / f"{DEV}.log")
    arrivals = Arrivals()
    broker.start()  # the subscriber's persistent session first, then the outage
    rec = Recorder(broker.port, [f"ttcs/dev/{DEV}/#"], arrivals.on_message,
                   client_id="outbox-rec", persistent=True)
    broker.stop()
    try:
        agent.start()
        time.sleep(2)  # offline for a while
        broker.start()
        want = set(range(1, n_events + 1))
        done = lambda: want <= set(arrivals.seqs) and len(arrivals.health) >= n_health  # noqa: E731
        try:
            wait_until(done, 120, interval=0.02, what="the whole backlog")
        except AssertionError:
            pass
    finally:
        agent.stop()
        rec.close()
        broker.stop()
    report(args, arrivals, n_events, n_health)
    return 0


def report(args, a: Arrivals, n_events: int, n_health: int) -> None:
    delivery = a.last_at - a.online_at if a.online_at else float("nan")
    got = set(a.seqs)
    lost = sorted(set(range(1, n_events + 1)) - got)
    in_order = a.seqs == sorted(a.seqs) and a.health == sorted(a.health)
    rows = [
        ("records (health + events)", f"{n_health} + {n_events}", "", ""),
        ("delivered after online (s)", f"{delivery:.2f}", "<= 10", verdict(delivery <= 10)),
        ("events lost", str(len(lost)), "0", verdict(not lost)),
        ("health samples delivered", f"{len(a.health)}/{n_health}", f"{n_health}/{n_health}",
         verdict(len(a.health) >= n_health)),
        ("in order", str(in_order), "True", verdict(in_order)),
        ("rate (records/s)", f"{(len(got) + len(a.health)) / delivery:.0f}", "", ""),
    ]
    m = machine()
    print_table(f"outbox, {args.hours:g} h offline ({m['nproc']} x {m['cpu']}, "
                f"load {m['loadavg'][0]:.2f})", rows)
    write_json(args.out, {"bench": "outbox", "machine": m, "hours": args.hours,
                          "events": n_events, "health": n_health, "delivery_s": delivery,
                          "lost_seqs": lost, "health_delivered": len(a.health),
                          "in_order": in_order, "targets": {"delivery_s": 10}})


if __name__ == "__main__":
    sys.exit(main())
