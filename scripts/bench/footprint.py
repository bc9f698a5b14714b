#!/usr/bin/env python3
"""Footprint of one agent: start to online, idle RSS, idle CPU (issue #9).

Targets: start to online <= 2 s, idle RSS <= 45 MB, idle CPU <= 1 % of a core.

The agent runs with simulated hardware (audio sim, gpio sim, no board) against a local
mosquitto, with the default intervals (health every 60 s, state at most every 1 s). "Start to
online" is from spawning the process to its retained ``online`` status arriving at a
subscriber; each start is a restart of the same device (a store that already exists).

    .venv/bin/python scripts/bench/footprint.py [--starts 5] [--idle-s 60] [--importtime]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import (
    ROOT,
    AgentProcess,
    Broker,
    Keys,
    Recorder,
    agent_config,
    cpu_s,
    machine,
    parser,
    percentile,
    print_table,
    pss_kb,
    rss_kb,
    verdict,
    wait_until,
    workdir,
    write_json,
)

DEV = "footprint-01"


def start_to_online(agent: AgentProcess, onlines: list[tuple[float, dict]]) -> float:
    before = len(onlines)
    t0 = time.monotonic()
    agent.start()
    wait_until(lambda: len(onlines) > before, 30, interval=0.005, what="online")
    return onlines[before][0] - t0


def idle_figures(pid: int, settle_s: float, idle_s: float) -> dict:
    time.sleep(settle_s)
    rss_start = rss_kb(pid)
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(idle_s)
    c1, t1 = cpu_s(pid), time.monotonic()
    return {"rss_mb": rss_kb(pid) / 1024, "rss_mb_at_idle_start": rss_start / 1024,
            "pss_mb": pss_kb(pid) / 1024, "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
            "idle_s": round(t1 - t0, 1)}


def top_imports(n: int = 12) -> list[tuple[int, str]]:
    """The slowest imports (cumulative microseconds) of ``python -m agent version``."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent", "version"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cum_us, name = line.split(":", 1)[1].split("|")
        rows.append((int(cum_us), name.strip()))
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    p = parser(__doc__.splitlines()[0], "footprint")
    p.add_argument("--starts", type=int, default=5, help="agent starts to time")
    p.add_argument("--settle-s", type=float, default=10, help="wait before the idle window")
    p.add_argument("--idle-s", type=float, default=60, help="idle window for CPU")
    p.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    args = p.parse_args()
    base = workdir(args.workdir, "footprint")
    broker = Broker(base / "broker").start()
    onlines: list[tuple[float, dict]] = []

    def on_message(t: float, topic: str, payload: bytes) -> None:
        body = json.loads(payload)
        if body.get("state") == "online":
            onlines.append((t, body))

    rec = Recorder(broker.port, [f"ttcs/dev/{DEV}/status"], on_message)
    keys = Keys()
    cfg = agent_config(base, broker.port, keys, device=DEV, state={"min_interval_s": 1.0},
                       mqtt={"reconnect_min_s": 1, "reconnect_max_s": 30})
    agent = AgentProcess(cfg, base / f"{DEV}.log")
    starts: list[float] = []
    try:
        for i in range(args.starts):
            starts.append(start_to_online(agent, onlines))
            if i < args.starts - 1:
                agent.stop()
        idle = idle_figures(agent.proc.pid, args.settle_s, args.idle_s)
    finally:
        agent.stop()
        rec.close()
        broker.stop()
    imports = top_imports() if args.importtime else []
    report(args, starts, idle, imports)
    return 0


def report(args, starts: list[float], idle: dict, imports: list[tuple[int, str]]) -> None:
    worst = max(starts)
    rows = [
        ("start to online, median (s)", f"{percentile(starts, 50):.2f}", "", ""),
        ("start to online, worst (s)", f"{worst:.2f}", "<= 2", verdict(worst <= 2)),
        ("idle RSS (MB)", f"{idle['rss_mb']:.1f}", "<= 45", verdict(idle["rss_mb"] <= 45)),
        ("idle PSS (MB)", f"{idle['pss_mb']:.1f}", "", ""),
        (f"idle CPU over {idle['idle_s']:g} s (% of a core)", f"{idle['cpu_pct']:.2f}", "<= 1",
         verdict(idle["cpu_pct"] <= 1)),
    ]
    m = machine()
    print_table(f"footprint ({m['nproc']} x {m['cpu']}, load {m['loadavg'][0]:.2f})", rows)
    if imports:
        print("\nslowest imports of `python -m agent version` (cumulative ms):")
        for us, name in imports:
            print(f"  {us / 1000:8.1f}  {name}")
    write_json(args.out, {"bench": "footprint", "machine": m, "starts_s": starts, **idle,
                          "top_imports_us": imports,
                          "targets": {"start_s": 2, "rss_mb": 45, "cpu_pct": 1}})


if __name__ == "__main__":
    sys.exit(main())
