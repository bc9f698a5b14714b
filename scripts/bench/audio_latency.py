#!/usr/bin/env python3
"""Audio latency benchmark (prints figures; not a test).

Measures, against a private mosquitto and libvlc writing to a WAV file (``--aout=afile``):

1. baseline: a minimal paho + libvlc player (same libvlc args) — command published → its
   "started" message received, with the media already on disk;
2. the agent: signed ``play`` of cached media → its ``started`` ack received (target: within
   1.5x of the baseline). Both run as their own processes; arrival is timed in the receiving
   client's message callback. 1 and 2 are measured twice: "warm" (each one's plays back to
   back) and "idle" (taking turns, so each command finds its process idle, as in the field);
3. emergency preemption: while a normal item airs, ``play`` emergency → ``started`` (p99 target
   ≤ 250 ms);
4. ``at`` precision: the instant audio reaches the output file (first samples written after
   the pre-roll) minus the requested ``at``.

Run: ``.venv/bin/python scripts/bench/audio_latency.py [--runs 30] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import vlc  # noqa: E402

from agent.audio.tone import write_tone  # noqa: E402
from tests.conftest import (  # noqa: E402
    AgentProcess,
    Broker,
    Keys,
    Watcher,
    agent_config,
    wait_online,
)

DEV = "krongpa-phutuc-c03"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "min": min(values), "p50": statistics.median(values),
            "p90": pct(values, 90), "p99": pct(values, 99), "max": max(values),
            "mean": statistics.fmean(values)}


class Baseline:
    """The minimal player (``minimal_player.py``) in its own process, like the agent."""

    def __init__(self, port: int, out: Path, protocol: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("minimal_player.py")), str(port),
             str(out), protocol], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the minimal player did not start")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def baseline_once(watcher: Watcher, path: str, out: Path, i: int) -> tuple[float, float | None]:
    """One play on the minimal player: (command → started seen, command → first audio)."""
    cid = f"b{i}"
    watcher.clear()
    t0, w0 = time.monotonic(), time.time()
    heard = AudioWatch(out, w0)
    watcher.publish("bench/base/cmd", json.dumps({"op": "play", "id": cid, "path": path}))
    seen = watcher.arrival("bench/base/ack", lambda m: m.get("id") == cid)
    first = heard.result()
    time.sleep(0.2)
    watcher.publish("bench/base/cmd", json.dumps({"op": "stop"}))
    time.sleep(0.1)
    return (seen - t0) * 1000, None if first is None else (first - w0) * 1000


def send(watcher: Watcher, keys: Keys, typ: str, args: dict) -> tuple[str, float]:
    env = keys.command(f"dev/{DEV}", typ, args)
    t0 = time.monotonic()
    watcher.publish(f"ttcs/dev/{DEV}/cmd", env)
    return env["id"], t0


def wait_stage(watcher: Watcher, cid: str, stage: str, timeout: float = 20) -> float:
    """Monotonic time at which the ack arrived (taken in the client's message callback)."""
    return watcher.arrival("/ack", lambda a: a.get("id") == cid and a.get("stage") == stage,
                           timeout)


def agent_once(watcher: Watcher, keys: Keys, media: dict,
               out: Path) -> tuple[float, float | None, float]:
    """One signed play of cached media: (command → started ack seen, command → first audio,
    received → started inside the agent by the acks' own timestamps)."""
    watcher.clear()
    w0 = time.time()
    heard = AudioWatch(out, w0)
    cid, t0 = send(watcher, keys, "play", {"media": media})
    lat = (wait_stage(watcher, cid, "started") - t0) * 1000
    first = heard.result()
    ts = {a["stage"]: a["ts"] for a in watcher.acks(cid)}
    time.sleep(0.2)
    sid, _ = send(watcher, keys, "stop", {"all": True})
    wait_stage(watcher, sid, "done")
    audio = None if first is None else (first - w0) * 1000
    return lat, audio, float(ts["started"] - ts["received"])


def bench_pair(port: int, watcher: Watcher, keys: Keys, tone: Path, media: dict,
               base_out: Path, out: Path, runs: int, idle: bool,
               protocol: str) -> dict[str, list[float]]:
    """The baseline and the agent, ``runs`` plays each. ``idle=False``: each runs its plays
    back to back (a warm process: the command comes right after the last one's stop).
    ``idle=True``: they take turns, so each command reaches a process that sat idle for
    ~0.6 s — as in the field, where commands come minutes apart."""
    base = Baseline(port, base_out, protocol)
    time.sleep(0.5)
    r: dict[str, list[float]] = {k: [] for k in ("base", "base_audio", "agent", "agent_audio",
                                                 "inside")}
    if idle:
        order = [w for i in range(runs)
                 for w in (("base", "agent") if i % 2 == 0 else ("agent", "base"))]
    else:
        order = ["base"] * runs + ["agent"] * runs
    try:
        for i, who in enumerate(order):
            if who == "base":
                lat, audio = baseline_once(watcher, str(tone), base_out, i)
            else:
                lat, audio, inside = agent_once(watcher, keys, media, out)
                r["inside"].append(inside)
            r[who].append(lat)
            if audio is not None:
                r[who + "_audio"].append(audio)
    finally:
        base.close()
    return r


def bench_preempt(watcher: Watcher, keys: Keys, long_media: dict, media: dict,
                  runs: int) -> list[float]:
    lat = []
    for _ in range(runs):
        watcher.clear()
        normal, _ = send(watcher, keys, "play", {"media": long_media})
        wait_stage(watcher, normal, "started")
        time.sleep(0.3)
        cid, t0 = send(watcher, keys, "play", {"media": media, "priority": "emergency"})
        lat.append((wait_stage(watcher, cid, "started") - t0) * 1000)
        sid, _ = send(watcher, keys, "stop", {"all": True})
        wait_stage(watcher, sid, "done")
    return lat


def first_audio_after(out: Path, since_wall: float, until_wall: float) -> float | None:
    """Wall time at which the output file, after being reopened (truncated), first grew past
    its header: when audio reached the output."""
    truncated = False
    while time.time() < until_wall:
        try:
            size = out.stat().st_size
        except FileNotFoundError:
            size = 0
        if time.time() >= since_wall:
            if size < 1024:
                truncated = True
            elif truncated:
                return time.time()
        time.sleep(0.0002)
    return None


class AudioWatch:
    """:func:`first_audio_after` in a thread, so the ack latency is measured meanwhile."""

    def __init__(self, out: Path, since_wall: float) -> None:
        self._value: float | None = None
        self._t = threading.Thread(target=self._run, args=(out, since_wall), daemon=True)
        self._t.start()

    def _run(self, out: Path, since_wall: float) -> None:
        self._value = first_audio_after(out, since_wall, since_wall + 3)

    def result(self) -> float | None:
        self._t.join()
        return self._value


def bench_at(watcher: Watcher, keys: Keys, media: dict, out: Path, runs: int) -> dict:
    start_err, ack_err = [], []
    for _ in range(runs):
        at_s = time.time() + 2.0
        cid, _ = send(watcher, keys, "play", {"media": media, "at": int(at_s * 1000)})
        heard = first_audio_after(out, at_s - 0.8, at_s + 2.0)
        wait_stage(watcher, cid, "started")
        ack = next(a for a in watcher.acks(cid) if a["stage"] == "started")
        if heard is not None:
            start_err.append((heard - at_s) * 1000)
        ack_err.append(ack["ts"] - at_s * 1000)
        sid, _ = send(watcher, keys, "stop", {"all": True})
        wait_stage(watcher, sid, "done")
        time.sleep(0.3)
    return {"audio_minus_at_ms": summary(start_err) if start_err else None,
            "started_ack_ts_minus_at_ms": summary(ack_err)}


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--at-runs", type=int, default=10)
    ap.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                    help="MQTT version of the agent and the minimal player (default: the "
                         "agent's default, 5)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ttcs-audio-latency.json"))
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ttcs-bench-"))
    tone = Path(write_tone(str(tmp / "tone.wav"), seconds=1.5))
    long = Path(write_tone(str(tmp / "long.wav"), hz=440, seconds=20))
    handler = lambda *a, **k: Files(*a, directory=str(tmp), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def media(p: Path) -> dict:
        return {"url": f"http://127.0.0.1:{httpd.server_address[1]}/{p.name}",
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}

    # Without TCP_NODELAY, back-to-back small acks wait for delayed ACKs (~40 ms).
    broker = Broker(tmp / "broker", extra="set_tcp_nodelay true").start()
    keys = Keys()
    watcher = Watcher(broker.port, ["ttcs/#", "bench/#"])
    out = tmp / "agent-out.wav"
    cfg = agent_config(tmp, broker.port, keys,
                       audio={"backend": "vlc",
                              "vlc_args": ["--aout=afile", f"--audiofile-file={out}"]},
                       amplifier={"warm_up_s": 0, "idle_hold_s": 30},
                       mqtt={"protocol": opts.protocol},
                       security={"trusted_keys": {keys.kid: keys.public_b64},
                                 "media_hosts": ["127.0.0.1"]},
                       log={"level": "warning"})
    agent = AgentProcess(cfg, tmp / "agent.log").start()
    results: dict = {"runs": opts.runs, "protocol": opts.protocol,
                     "libvlc": vlc.libvlc_get_version().decode()}
    try:
        wait_online(watcher, DEV)
        for p in (tone, long):  # cache both first: the figures are for cached media
            cid, _ = send(watcher, keys, "play", {"media": media(p)})
            wait_stage(watcher, cid, "started", 30)
            sid, _ = send(watcher, keys, "stop", {"all": True})
            wait_stage(watcher, sid, "done")
        for mode in ("warm", "idle"):
            r = bench_pair(broker.port, watcher, keys, tone, media(tone),
                           tmp / "base-out.wav", out, opts.runs, idle=mode == "idle",
                           protocol=opts.protocol)
            results[mode] = {"baseline_started_ms": summary(r["base"]),
                             "baseline_first_audio_ms": summary(r["base_audio"]),
                             "agent_started_ms": summary(r["agent"]),
                             "agent_first_audio_ms": summary(r["agent_audio"]),
                             "agent_received_to_started_ms": summary(r["inside"])}
        results["emergency_preempt_started_ms"] = summary(
            bench_preempt(watcher, keys, media(long), media(tone), opts.runs))
        results["at"] = bench_at(watcher, keys, media(tone), out, opts.at_runs)
    finally:
        agent.stop()
        watcher.close()
        broker.stop()
        httpd.shutdown()
    for mode in ("warm", "idle"):
        m = results[mode]
        m["agent_vs_baseline_p50_ratio"] = (m["agent_started_ms"]["p50"]
                                            / m["baseline_started_ms"]["p50"])
        m["agent_vs_baseline_first_audio_p50_ratio"] = (
            m["agent_first_audio_ms"]["p50"] / m["baseline_first_audio_ms"]["p50"])
    report(results)
    Path(opts.out).write_text(json.dumps(results, indent=1))
    print(f"\nJSON written to {opts.out}")
    return 0


def report(r: dict) -> None:
    rows = []
    for mode in ("warm", "idle"):
        m = r[mode]
        rows += [(f"{mode}: baseline paho+libvlc: cmd → started", m["baseline_started_ms"]),
                 (f"{mode}: agent play (cached): cmd → started", m["agent_started_ms"]),
                 (f"{mode}: baseline: cmd → first audio", m["baseline_first_audio_ms"]),
                 (f"{mode}: agent: cmd → first audio", m["agent_first_audio_ms"]),
                 (f"{mode}: agent: received → started (ack ts)",
                  m["agent_received_to_started_ms"])]
    rows.append(("emergency preempt: cmd → started ack", r["emergency_preempt_started_ms"]))
    if r["at"]["audio_minus_at_ms"]:
        rows.append(("at: first audio written − at", r["at"]["audio_minus_at_ms"]))
    rows.append(("at: started ack ts − at", r["at"]["started_ack_ts_minus_at_ms"]))
    print(f"{'measure (ms)':48} {'n':>4} {'min':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    for name, s in rows:
        print(f"{name:48} {s['n']:>4} {s['min']:>7.1f} {s['p50']:>7.1f} {s['p90']:>7.1f} "
              f"{s['p99']:>7.1f} {s['max']:>7.1f}")
    print()
    for mode in ("warm", "idle"):
        ratio = r[mode]["agent_vs_baseline_p50_ratio"]
        print(f"{mode}: agent/baseline started p50 ratio {ratio:.2f} "
              f"(target ≤ 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); first audio "
              f"{r[mode]['agent_vs_baseline_first_audio_p50_ratio']:.2f}")
    ok_pre = r["emergency_preempt_started_ms"]["p99"] <= 250
    print(f"emergency preemption p99: {r['emergency_preempt_started_ms']['p99']:.1f} ms "
          f"(target ≤ 250: {'met' if ok_pre else 'NOT met'})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
