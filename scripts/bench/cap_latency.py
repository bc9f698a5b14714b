#!/usr/bin/env python3
"""CAP latency: ``ttcs-ctl cap ingest`` to ``started`` on every agent of the area (issue #16).

Target (EN 54-16's voice-alarm figure): p99 <= 3 s for 200 agents, cached TTS aside.

N real agents (sim audio, espeak-ng TTS) on one mosquitto, all in group ``krongpa``; a CAP
1.2 flood warning by geocode (``VN-DISTRICT=0640`` -> ``grp/krongpa``) is ingested by the
command line as a user runs it — a new ``python -m ctl cap ingest FILE --no-wait`` process
each round: Python start-up, schema validation, areas, signing and publishing included — and,
in as many other rounds, by a running process as ``cap watch`` handles a message it found
(``Handler.handle`` in this process: no interpreter start-up). The latency of a device is from
just before that process is started (or ``handle`` called) to the arrival of its ``started``
ack at a subscriber on the same machine; the arrival of the command itself at that subscriber
splits it into the controller's part and the fleet's. A warm-up round renders the spoken text
on every agent first (each round is a new message with the same text: the TTS cache hit that
"cached TTS aside" means). Between rounds every agent is stopped (``stop {"all": true}``)
and the fleet left alone for ``--gap-s``.

Agents start in batches of ``--batch`` (a cold start of 200 Pythons on 2 CPUs would
otherwise measure the scheduler), and the run waits ``--settle-s`` after the last one.

    .venv/bin/python scripts/bench/cap_latency.py [--agents 200] [--rounds 5]
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from common import (
    ROOT,
    Broker,
    Keys,
    Recorder,
    machine,
    parser,
    percentile,
    print_table,
    verdict,
    wait_until,
    workdir,
    write_json,
)
from fleet import Fleet

from agent import protocol

VN = timezone(timedelta(hours=7))
STAGES = ("received", "queued", "started")
FIXTURE = ROOT / "tests" / "cap" / "vn" / "flood-ba-river.xml"


class Acks:
    def __init__(self) -> None:
        self.online: dict[str, float] = {}
        self.cmds: dict[str, float] = {}  # command id -> when the subscriber saw it published
        self.split: dict[str, list[float]] = {}  # stage -> seconds after the publication
        self.stages: dict[tuple[str, str], dict[str, float]] = {}  # (id, stage) -> device -> t

    def on_message(self, t: float, topic: str, payload: bytes) -> None:
        device, kind = topic.split("/")[2], topic.split("/")[3]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if topic.endswith("/cmd"):
            self.cmds.setdefault(body.get("id"), t)
        elif kind == "status" and body.get("state") == "online":
            self.online[device] = t
        elif kind == "ack":
            self.stages.setdefault((body.get("id"), body.get("stage")), {}).setdefault(device, t)

    def of(self, prefix: str, stage: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (cmd_id, st), devices in list(self.stages.items()):
            if st == stage and str(cmd_id).startswith(prefix):
                for d, t in devices.items():
                    out[d] = min(t, out.get(d, t))
        return out


def message(k: int) -> bytes:
    now = datetime.now(VN).replace(microsecond=0)
    text = string.Template(FIXTURE.read_text(encoding="utf-8")).substitute(
        SENT=now.isoformat(), EXPIRES=(now + timedelta(hours=1)).isoformat())
    # one language block: a round measures the first thing heard
    head, _, rest = text.partition("<info>")
    first, _, _ = rest.partition("</info>")
    text = head + "<info>" + first + "</info>\n</alert>\n"
    return text.replace("LU-SONGBA-014", f"LU-SONGBA-B{k:03d}-{int(time.time())}").encode()


def ctl_config(base: Path, port: int, keys: Keys) -> Path:
    from cryptography.hazmat.primitives import serialization

    key_file = base / "ctl.key"
    key_file.write_bytes(keys.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_file.chmod(0o600)
    path = base / "ctl.yaml"
    path.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": port},
        "signing": {"kid": keys.kid, "key_file": str(key_file)},
        "relay": {"db_path": str(base / "relay.db")},
        "cap": {"geocodes": {"VN-DISTRICT=0640": ["krongpa"]}, "repeat": 1},
    }))
    return path


def ingest_round(cfg: Path, base: Path, acks: Acks, n: int, k: int,
                 handler=None) -> tuple[list[float], float]:
    """Latencies of the devices' ``started`` and of the command's publication (s)."""
    path = base / f"alert-{k}.xml"
    path.write_bytes(message(k))
    t0 = time.monotonic()
    if handler is None:
        proc = subprocess.run([sys.executable, "-m", "ctl", "--config", str(cfg), "cap",
                               "ingest", str(path), "--no-wait"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        code, lines = proc.returncode, proc.stdout.splitlines()
    else:  # as cap watch does with a message it found
        out = handler.handle(path.read_bytes(), str(path), wait=False)
        code, lines = out.code, out.lines
    if code != 0:
        raise RuntimeError(f"ingest failed ({code}): {lines}")
    say = next(ln.split()[2] for ln in lines if ln.startswith("sent say"))
    try:
        wait_until(lambda: len(acks.of(say, "started")) >= n, 30, interval=0.02,
                   what="started on every agent")
    except AssertionError:
        pass  # reported as missing
    published = acks.cmds.get(say, float("nan")) - t0
    for stage in STAGES if k else ():  # not the warm-up round (it renders the speech)
        for t in acks.of(say, stage).values():
            acks.split.setdefault(stage, []).append(t - t0 - published)
    return [t - t0 for t in acks.of(say, "started").values()], published


def in_process_handler(cfg_path: Path):
    from agent.config import load_file
    from ctl.cap.cli import make_handler
    from ctl.cap.record import CapRecord
    from ctl.config import CTL_SCHEMA

    cfg = load_file(str(cfg_path), CTL_SCHEMA)
    record = CapRecord.open(cfg)
    handler, _link = make_handler(cfg, record, shared=True)  # one connection, as cap watch
    return handler, record


def stop_all(rec: Recorder, keys: Keys, acks: Acks, n: int, k: int) -> None:
    env = keys.command("grp/all", "stop", {"all": True}, cmd_id=f"bench-stop-{k}-{time.time()}")
    rec.publish("ttcs/grp/all/cmd", protocol.canonical(env))
    try:
        wait_until(lambda: len(acks.of(env["id"], "done")) >= n, 30, interval=0.05,
                   what="stopped everywhere")
    except AssertionError:
        pass


def main() -> int:
    p = parser(__doc__.splitlines()[0], "cap_latency")
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=10, help="agents started at a time")
    p.add_argument("--settle-s", type=float, default=15, help="wait after start-up")
    p.add_argument("--gap-s", type=float, default=5,
                   help="quiet time between rounds (the last round's stop, play records and"
                        " state settle)")
    args = p.parse_args()
    base = workdir(args.workdir, "cap")
    broker = Broker(base / "broker",
                    extra="max_connections -1\nmax_queued_messages 100000\n").start()
    keys, acks = Keys(), Acks()
    rec = Recorder(broker.port, ["ttcs/dev/+/status", "ttcs/dev/+/ack", "ttcs/grp/+/cmd"],
                   acks.on_message,
                   client_id="cap-rec")
    fleet = Fleet(base, broker.port, keys, args.agents)
    cfg = ctl_config(base, broker.port, keys)
    results = {"process": ([], [], []), "watch": ([], [], [])}  # latencies, published, n
    handler, record = in_process_handler(cfg)
    try:
        start_s = fleet.start(acks.online, batch=args.batch)
        time.sleep(args.settle_s)
        load_before = machine()["loadavg"][0]
        warm, _ = ingest_round(cfg, base, acks, args.agents, 0)  # renders the TTS once
        stop_all(rec, keys, acks, args.agents, 0)
        for k in range(1, 2 * args.rounds + 1):
            time.sleep(args.gap_s)
            mode = "process" if k % 2 else "watch"
            lat, pub = ingest_round(cfg, base, acks, args.agents, k,
                                    None if mode == "process" else handler)
            results[mode][0].extend(lat)
            results[mode][1].append(pub)
            results[mode][2].append(len(lat))
            stop_all(rec, keys, acks, args.agents, k)
        load_after = machine()["loadavg"][0]
    finally:
        record.close()
        fleet.stop()
        rec.close()
        broker.stop()
    latencies, _, complete = results["process"]
    n = args.agents
    p99 = percentile(latencies, 99)
    w_lat, w_pub, w_complete = results["watch"]
    w_p99 = percentile(w_lat, 99)
    rows = [
        ("agents (group krongpa)", str(n), "", ""),
        (f"start-up, batches of {args.batch} (s)", f"{start_s:.1f}", "", ""),
        ("warm-up round (TTS rendered): started", f"{len(warm)}/{n}", "", ""),
        ("warm-up round, p99 (s)", f"{percentile(warm, 99):.3f}", "", ""),
        ("rounds complete", f"{sum(c == n for c in complete)}/{len(complete)}",
         f"{len(complete)}/{len(complete)}", verdict(all(c == n for c in complete))),
        ("cap ingest -> started, p50 (s)", f"{percentile(latencies, 50):.3f}", "", ""),
        ("cap ingest -> started, p99 (s)", f"{p99:.3f}", "<= 3", verdict(p99 <= 3)),
        ("cap ingest -> started, max (s)", f"{max(latencies, default=float('nan')):.3f}", "",
         ""),
        ("  of which: ingest -> command published, p50 (s)",
         f"{percentile(results['process'][1], 50):.3f}", "", ""),
        ("running process (cap watch): rounds complete",
         f"{sum(c == n for c in w_complete)}/{len(w_complete)}", "", ""),
        ("  handle -> started, p50 (s)", f"{percentile(w_lat, 50):.3f}", "", ""),
        ("  handle -> started, p99 (s)", f"{w_p99:.3f}", "<= 3", verdict(w_p99 <= 3)),
        ("  of which: handle -> command published, p50 (s)", f"{percentile(w_pub, 50):.3f}",
         "", ""),
        *[(f"  publication -> {st}, p50 / p99 (s)",
           f"{percentile(acks.split.get(st, []), 50):.3f} /"
           f" {percentile(acks.split.get(st, []), 99):.3f}", "", "") for st in STAGES],
        ("load average, 1 min, before / after the rounds",
         f"{load_before:.1f} / {load_after:.1f}", "", ""),
    ]
    m = machine()
    print_table(f"cap_latency ({m['nproc']} x {m['cpu']}, load {m['loadavg'][0]:.2f})", rows)
    write_json(args.out, {"bench": "cap_latency", "machine": m, "agents": n,
                          "start_s": start_s, "warmup_s": warm, "latencies_s": latencies,
                          "complete": complete, "p99_s": p99,
                          "published_s": results["process"][1], "watch": {
                              "latencies_s": w_lat, "published_s": w_pub,
                              "complete": w_complete, "p99_s": w_p99},
                          "load": [load_before, load_after], "targets": {"p99_s": 3}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
