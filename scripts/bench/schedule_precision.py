#!/usr/bin/env python3
"""Schedule start precision (prints figures; not a test).

Real agents (``python -m agent run``) against a private mosquitto, each given a signed
``desired/schedule`` document with one slot a few seconds ahead, airing a cached WAV served by a
local HTTP server on sim audio or libvlc writing to a file (``--aout=afile``). Slot times are
whole minutes, so each agent runs with the test-only wall-clock offset
(``TTCS_TEST_CLOCK_OFFSET_MS``, agent/core/clock.py) that puts a minute boundary where the
benchmark wants it; agents run ``--parallel`` at a time, their slots ``--spacing`` s apart.

Measured per slot, in the agent's own clock: ``started − due``, where ``started`` is the play
record's start (the moment the arbiter told the output to play, after the pre-roll) and
``due`` the slot's time. With ``--backend vlc --parallel 1`` also the moment the first samples
reached the output file minus the slot time (wall clock of this machine, offset removed).

Target (issue #4): a slot starts within 50 ms of its time.

Run: ``.venv/bin/python scripts/bench/schedule_precision.py [--slots 20] [--backend sim|vlc]``.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import sys
import threading
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    AgentProcess,
    Broker,
    Keys,
    agent_config,
    machine,
    parser,
    percentile,
    print_table,
    verdict,
    wait_until,
    workdir,
    write_json,
)

from agent import protocol
from agent.audio.tone import write_tone
from tests.conftest import Watcher

HCM = ZoneInfo("Asia/Ho_Chi_Minh")
TARGET_MS = 50.0


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            partial(_Files, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def schedule_for(keys: Keys, device: str, media: dict, slot_ms: int) -> bytes:
    local = datetime.fromtimestamp(slot_ms / 1000, HCM)
    item = {"id": "bench", "media": media, "days": ["mon", "tue", "wed", "thu", "fri", "sat",
                                                    "sun"], "times": [local.strftime("%H:%M")]}
    env = keys.command(f"dev/{device}", "schedule", {"items": [item]}, rev=1)
    return protocol.canonical(env)


def start_agent(work: Path, port: int, keys: Keys, device: str, offset_ms: int,
                opts) -> tuple[AgentProcess, Path]:
    out = work / device / "afile.wav"
    sections: dict = {"security": {"media_hosts": ["127.0.0.1"]},
                      "log": {"level": opts.log_level}}
    if opts.backend == "vlc":
        sections["audio"] = {"backend": "vlc",
                             "vlc_args": ["--aout=afile", f"--audiofile-file={out}"]}
    cfg = agent_config(work, port, keys, device=device, **sections)
    os.environ["TTCS_TEST_CLOCK_OFFSET_MS"] = str(offset_ms)
    try:
        return AgentProcess(cfg, work / f"{device}.log").start(), out
    finally:
        del os.environ["TTCS_TEST_CLOCK_OFFSET_MS"]


def first_audio(out: Path, since: float, until: float) -> float | None:
    """Wall time at which the afile output first grew past its header (polled: bench only)."""
    while time.time() < until:
        try:
            if time.time() >= since and out.stat().st_size > 1024:
                return time.time()
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return None


def run_round(work: Path, port: int, keys: Keys, watcher: Watcher, media: dict, n: int,
              first: int, opts) -> list[dict]:
    """``n`` agents, slot i at now + lead + i * spacing; returns one result per slot."""
    t0 = time.time() * 1000 + opts.lead * 1000
    agents, plans = [], []
    for i in range(n):
        device = f"bench-{first + i:03d}"
        real = t0 + i * opts.spacing * 1000
        due = round(real / 60_000) * 60_000  # agent time
        offset = int(due - real)
        watcher.publish(f"ttcs/dev/{device}/desired/schedule",
                        schedule_for(keys, device, media, due), retain=True)
        agent, out = start_agent(work, port, keys, device, offset, opts)
        agents.append(agent)
        plans.append({"device": device, "due": due, "offset": offset, "real_due": real,
                      "out": out})
    heard = None
    if opts.backend == "vlc" and n == 1:
        p = plans[0]
        heard = first_audio(p["out"], p["real_due"] / 1000 - 1.0, p["real_due"] / 1000 + 5)
    results = [collect(watcher, p, heard) for p in plans]
    for a in agents:
        a.stop()
    return results


def collect(watcher: Watcher, plan: dict, heard: float | None) -> dict:
    def record():
        return next((e for e in watcher.json(f"dev/{plan['device']}/event")
                     if e.get("type") == "play" and e.get("origin") == "schedule"), None)

    try:
        rec = wait_until(record, 30, what=f"{plan['device']} play record")
    except AssertionError:
        return {"device": plan["device"], "due": plan["due"], "missed": True}
    out = {"device": plan["device"], "due": plan["due"], "started": rec["started"],
           "result": rec["result"], "error_ms": rec["started"] - plan["due"]}
    if heard is not None:
        out["audio_error_ms"] = round(heard * 1000 - plan["real_due"], 1)
    return out


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": max(values), "min": min(values)}


def main() -> int:
    ap = parser(__doc__.splitlines()[0], "schedule_precision")
    ap.add_argument("--slots", type=int, default=20, help="slots measured in all")
    ap.add_argument("--parallel", type=int, default=5, help="agents (slots) per round")
    ap.add_argument("--spacing", type=float, default=2.0, help="seconds between slots")
    ap.add_argument("--lead", type=float, default=12.0, help="seconds from start to 1st slot")
    ap.add_argument("--backend", choices=("sim", "vlc"), default="sim")
    ap.add_argument("--log-level", default="warning", help="the agents' (logs in the workdir)")
    opts = ap.parse_args()
    work = workdir(opts.workdir, "schedule")
    www = work / "www"
    www.mkdir(exist_ok=True)
    tone = Path(write_tone(str(www / "tone.wav"), seconds=1.0))
    httpd, http_port = serve(www)
    media = {"url": f"http://127.0.0.1:{http_port}/tone.wav",
             "sha256": hashlib.sha256(tone.read_bytes()).hexdigest()}
    broker = Broker(work / "broker").start()
    watcher = Watcher(broker.port, ["ttcs/#"])
    keys = Keys()
    results: list[dict] = []
    try:
        while len(results) < opts.slots:
            n = min(opts.parallel, opts.slots - len(results))
            results += run_round(work, broker.port, keys, watcher, media, n, len(results), opts)
            print(f"  {len(results)}/{opts.slots} slots measured", flush=True)
    finally:
        watcher.close()
        broker.stop()
        httpd.shutdown()
    return report(results, opts)


def report(results: list[dict], opts) -> int:
    errors = [r["error_ms"] for r in results if "error_ms" in r]
    audio = [r["audio_error_ms"] for r in results if "audio_error_ms" in r]
    missed = sum(1 for r in results if r.get("missed"))
    s = stats(errors)
    worst = max((abs(e) for e in errors), default=float("nan"))
    rows = [(f"started - due, {k}", f"{s[k]:.0f} ms", "", "") for k in ("p50", "p95", "p99")]
    rows.append(("started - due, worst |error|", f"{worst:.0f} ms", f"<= {TARGET_MS:.0f} ms",
                 verdict(bool(errors) and worst <= TARGET_MS and not missed)))
    rows.append(("slots without a play record", str(missed), "0", verdict(missed == 0)))
    if audio:
        a = stats(audio)
        rows.append(("first audio in file - due, p50/max", f"{a['p50']:.0f}/{a['max']:.0f} ms",
                     "", ""))
    print_table(f"schedule start precision ({opts.backend}, {len(results)} slots, "
                f"{opts.parallel} agents at a time, {opts.spacing:g} s apart)", rows)
    write_json(opts.out, {"bench": "schedule_precision", "machine": machine(),
                          "options": vars(opts), "started_minus_due_ms": s,
                          "audio_minus_due_ms": stats(audio), "missed": missed,
                          "slots": results})
    return 0 if errors and worst <= TARGET_MS and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
