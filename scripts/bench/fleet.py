#!/usr/bin/env python3
"""Fleet: N agent processes (simulated hardware) on one mosquitto (issue #9).

Targets: a signed ``grp/all`` ping reaches ``done`` on every agent with p99 <= 1 s; after a
broker restart every agent is back online within 30 s, spread out by the jittered backoff
(no thundering herd: the busiest 100 ms holds a small share of the reconnections).

Agents use the shipped reconnect defaults (1 s doubling to 30 s, jittered) and default
intervals. Latency is from just before the controller's publish to the arrival of each
agent's ``done`` ack at a subscriber on the same machine.

    .venv/bin/python scripts/bench/fleet.py [--agents 200] [--rounds 5] [--down-s 3]
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from common import (
    AgentProcess,
    Broker,
    Keys,
    Recorder,
    agent_config,
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

from agent import protocol


class Fleet:
    def __init__(self, base: Path, port: int, keys: Keys, n: int) -> None:
        self.devices = [f"fleet-{i:03d}" for i in range(n)]
        self.agents = [AgentProcess(
            agent_config(base, port, keys, device=d, state={"min_interval_s": 1.0},
                         mqtt={"reconnect_min_s": 1, "reconnect_max_s": 30}),
            base / f"{d}.log") for d in self.devices]

    def start(self, online: dict[str, float], batch: int = 10) -> float:
        """Start every agent, ``batch`` at a time (a cold start of N Pythons on few cores
        would otherwise measure the scheduler); return the seconds it took."""
        t0 = time.monotonic()
        for i in range(0, len(self.agents), batch):
            for a in self.agents[i:i + batch]:
                a.start()
            wait_until(lambda k=i + batch: len(online) >= min(k, len(self.agents)), 120,
                       what="a batch online")
        return time.monotonic() - t0

    def stop(self) -> None:
        for a in self.agents:
            if a.alive():
                a.signal(15)
        for a in self.agents:
            a.stop(10)


class Tracker:
    """Arrival times of online statuses and done acks, by device."""

    def __init__(self) -> None:
        self.online: dict[str, float] = {}
        self.online_ts: dict[str, int] = {}
        self.done: dict[str, dict[str, float]] = {}

    def on_message(self, t: float, topic: str, payload: bytes) -> None:
        device, kind = topic.split("/")[2], topic.split("/")[3]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if kind == "status" and body.get("state") == "online":
            self.online[device] = t
            self.online_ts[device] = body.get("ts", 0)
        elif kind == "ack" and body.get("stage") == "done":
            self.done.setdefault(body.get("id"), {}).setdefault(device, t)


def ping_round(rec: Recorder, keys: Keys, tracker: Tracker, n: int, k: int) -> list[float]:
    env = keys.command("grp/all", "ping", cmd_id=f"fleet-{int(time.time())}-{k}")
    t0 = time.monotonic()
    rec.publish("ttcs/grp/all/cmd", protocol.canonical(env))
    try:
        wait_until(lambda: len(tracker.done.get(env["id"], {})) >= n, 30, interval=0.02,
                   what="done from every agent")
    except AssertionError:
        pass  # reported as missing
    return [t - t0 for t in tracker.done.get(env["id"], {}).values()]


def broker_restart(broker: Broker, tracker: Tracker, n: int, down_s: float) -> dict:
    broker.stop()
    time.sleep(down_s)
    start_ms = int(time.time() * 1000)
    t0 = time.monotonic()
    broker.start()
    fresh = lambda: {d: ts for d, ts in tracker.online_ts.items() if ts >= start_ms}  # noqa: E731
    try:
        wait_until(lambda: len(fresh()) >= n, 120, interval=0.05, what="all back online")
    except AssertionError:
        pass
    back = sorted((ts - start_ms) / 1000 for ts in fresh().values())
    per_100ms = Counter(int(s * 10) for s in back)
    return {"down_s": down_s, "back": len(back), "all_back_s": back[-1] if back else None,
            "median_back_s": percentile(back, 50), "busiest_100ms": max(per_100ms.values(),
                                                                         default=0),
            "wall_s": time.monotonic() - t0, "back_s": back}


def main() -> int:
    p = parser(__doc__.splitlines()[0], "fleet")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="grp/all ping rounds")
    p.add_argument("--down-s", type=float, default=3, help="how long the broker stays down")
    p.add_argument("--settle-s", type=float, default=10, help="wait after start-up")
    args = p.parse_args()
    base = workdir(args.workdir, "fleet")
    broker = Broker(base / "broker", persistence=True,
                    extra="max_connections -1\nmax_queued_messages 100000\n").start()
    keys, tracker = Keys(), Tracker()
    rec = Recorder(broker.port, ["ttcs/dev/+/status", "ttcs/dev/+/ack"], tracker.on_message,
                   client_id="fleet-rec", persistent=True)
    fleet = Fleet(base, broker.port, keys, args.agents)
    try:
        start_s = fleet.start(tracker.online)
        time.sleep(args.settle_s)
        rss = [rss_kb(a.proc.pid) / 1024 for a in fleet.agents if a.alive()]
        latencies, complete = [], []
        for k in range(args.rounds):
            lat = ping_round(rec, keys, tracker, args.agents, k)
            latencies += lat
            complete.append(len(lat))
            time.sleep(1)
        restart = broker_restart(broker, tracker, args.agents, args.down_s)
        time.sleep(2)
        after = ping_round(rec, keys, tracker, args.agents, args.rounds)
    finally:
        fleet.stop()
        rec.close()
        broker.stop()
    report(args, start_s, rss, latencies, complete, restart, after)
    return 0


def report(args, start_s: float, rss: list[float], latencies: list[float], complete: list[int],
           restart: dict, after: list[float]) -> None:
    n = args.agents
    p99 = percentile(latencies, 99)
    all_back = restart["all_back_s"]
    rows = [
        ("agents", str(n), "", ""),
        ("start-up, batches of 10 (s)", f"{start_s:.1f}", "", ""),
        ("RSS per agent, median (MB)", f"{percentile(rss, 50):.1f}", "", ""),
        ("grp/all ping rounds complete", f"{sum(c == n for c in complete)}/{len(complete)}",
         f"{len(complete)}/{len(complete)}", verdict(all(c == n for c in complete))),
        ("grp/all -> done, p50 (s)", f"{percentile(latencies, 50):.3f}", "", ""),
        ("grp/all -> done, p99 (s)", f"{p99:.3f}", "<= 1", verdict(p99 <= 1)),
        ("grp/all -> done, max (s)", f"{max(latencies, default=float('nan')):.3f}", "", ""),
        (f"broker down {args.down_s:g} s: back online", f"{restart['back']}/{n}", f"{n}/{n}",
         verdict(restart["back"] == n)),
        ("  all back after broker start (s)", "-" if all_back is None else f"{all_back:.1f}",
         "<= 30", verdict(all_back is not None and all_back <= 30)),
        ("  median back (s)", f"{restart['median_back_s']:.1f}", "", ""),
        ("  busiest 100 ms (reconnections)", str(restart["busiest_100ms"]), "", ""),
        ("grp/all after restart: done", f"{len(after)}/{n}", f"{n}/{n}", verdict(len(after) == n)),
    ]
    m = machine()
    print_table(f"fleet ({m['nproc']} x {m['cpu']}, load {m['loadavg'][0]:.2f})", rows)
    write_json(args.out, {"bench": "fleet", "machine": m, "agents": n, "start_s": start_s,
                          "rss_mb": rss, "latencies_s": latencies, "complete": complete,
                          "p99_s": p99, "restart": restart, "after_restart_s": after,
                          "targets": {"p99_s": 1, "all_back_s": 30}})


if __name__ == "__main__":
    sys.exit(main())
