#!/usr/bin/env python3
"""Load generator: N simulated devices against mosquitto and real ``ttcs-ctl relay`` (issue #19).

Each simulated device is its own MQTT connection (client id = device id, persistent session,
will ``offline``/``lost``); worker processes run thousands each in one asyncio loop
(``loadgen_device.py``, on the minimal client of ``loadgen_mqtt.py``: why, there). What a
device sends is in ``loadgen_device.py``. Scenario:

1. a burst: every device connects within ``--burst-s``;
2. traffic for ``--run-s``; ``--down-s`` after ``--down-at-s`` the relays are stopped
   (SIGTERM) for ``--down-s`` seconds and started again; ``--pause-s`` after ``--pause-at-s``
   they are frozen (SIGSTOP: a relay that falls behind, the broker queueing for it) and
   thawed (SIGCONT);
3. ``--kill`` devices drop their link without a word (the broker sends their will);
   ``--silent`` devices keep their link but publish nothing from ``--silent-at-s``;
4. the generator stops producing and waits up to ``--settle-s`` until the relay's store holds
   every seq of every device (or has it recorded as lost).

It prints ingest rate, lag (relay receive time − event time), the brokers' drop counters
(``$SYS/broker/...``), keepalive timeouts at the brokers, links the generator lost, gaps
asked for and filled, devices left with no known link state, the offline-notification
latency, and heartbeat offline notices for devices that were neither killed nor silent
(false offline: the target is 0). ``--broker-extra`` adds lines to mosquitto's config, e.g.
``'max_queued_messages 1000'`` (the setting that lost messages in the field) to compare with
the recommended ``config/mosquitto.conf.example`` settings (the default here).

    .venv/bin/python scripts/bench/loadgen.py --devices 2000 --procs 2 --down-s 60
    .venv/bin/python scripts/bench/loadgen.py --devices 2000 --procs 2 --run-s 420 \
        --health-s 60 --keepalive 60 --event-s 600 --pause-at-s 150 --pause-s 120 --silent 10
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from common import ROOT, Broker, Keys, machine, parser, percentile, wait_until, workdir, write_json
from loadgen_device import PREFIX, now_ms, run_worker
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import MOSQUITTO

# What config/mosquitto.conf.example recommends for the relay's session (docs/DEPLOY.md).
RECOMMENDED = ("max_queued_messages 200000\nmax_queued_bytes 268435456\n"
               "set_tcp_nodelay true\n")


# --- the controller side: broker, relay, $SYS counters, the verdict ---------------------------

class QuietBroker(Broker):
    """A mosquitto that logs errors and notices only: at tens of thousands of clients
    ``log_type all`` (every packet) costs the broker more than the traffic."""

    def start(self) -> QuietBroker:
        conf = self.folder / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        f"persistence false\nlog_dest file {self.folder / 'mosquitto.log'}\n"
                        f"log_type error\nlog_type warning\nlog_type notice\n{user}"
                        f"{self.extra}\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, what=f"mosquitto on port {self.port}")
        return self


BRIDGED = ("status", "state", "health", "event", "ack")


def leaf_bridge(index: int, core_port: int) -> str:
    """A leaf broker's bridge to the core one (a broker per province under a national one):
    what devices publish goes up, their commands come down; a persistent bridge session."""
    return (f"connection core-{index}\naddress 127.0.0.1:{core_port}\n"
            f"remote_clientid leaf-{index}\ncleansession false\n"
            "bridge_protocol_version mqttv311\n"
            + "".join(f"topic {PREFIX}/dev/+/{leaf} out 1\n" for leaf in BRIDGED)
            + f"topic {PREFIX}/dev/+/cmd in 1\n")

class SysCounters:
    """The broker's ``$SYS`` counters (mosquitto publishes them every ``sys_interval``)."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, str] = {}
        self.peak = 0  # clients connected at most
        self.before_outage: int | None = None  # drops up to the relay's outage (the burst)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"loadgen-sys-{os.getpid()}",
                        protocol=mqtt.MQTTv5)
        c.on_connect = lambda c, u, f, rc, p: c.subscribe("$SYS/broker/#", 0)
        c.on_message = lambda c, u, m: self.values.__setitem__(
            m.topic[len("$SYS/broker/"):], m.payload.decode(errors="replace"))
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def get(self, key: str) -> int:
        try:
            return int(float(self.values.get(key, "0")))
        except ValueError:
            return 0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def relay_process(folder: Path, port: int, keys: Keys, args,
                  index: int = 0) -> tuple[Path, callable]:
    from cryptography.hazmat.primitives import serialization

    key = folder / "ctl.key"
    key.write_bytes(keys.private.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(key, 0o600)
    db = folder / "relay.db"
    import yaml

    cfg = {"mqtt": {"host": "127.0.0.1", "port": port},
           "signing": {"kid": keys.kid, "key_file": str(key)},
           "relay": {"db_path": str(db), "tick_s": 0.5, "gap_wait_s": args.gap_wait_s,
                     "gap_retry_s": 5, "gap_retry_max_s": 30, "status_reread_s": 10,
                     "heartbeat_default_s": args.health_s,
                     "client_id": "ttcs-relay" if index == 0 else f"ttcs-relay-{index}",
                     "shared_group": "relays" if args.relays > 1 else None},
           "alerts": {}}
    name = "relay" if index == 0 else f"relay{index}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(folder / f"{name}.log", "ab")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ctl", "--config", str(path), "relay"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return db, start


def _q(db: Path, sql: str, *params):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()


def completeness(db: Path, last: dict[str, int]) -> tuple[int, int]:
    """(seqs missing from the relay's store, seqs recorded lost) over every device."""
    have = dict(_q(db, "SELECT device, COUNT(*) FROM events GROUP BY device"))
    lost = dict(_q(db, "SELECT device, SUM(hi - lo + 1) FROM seq_lost GROUP BY device"))
    missing = sum(max(0, n - have.get(d, 0) - (lost.get(d) or 0)) for d, n in last.items())
    return missing, sum(v or 0 for v in lost.values())


def main() -> int:
    p = parser("Simulated devices against mosquitto and the relay (issue #19).", "loadgen")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--burst-s", type=float, default=1.0)
    p.add_argument("--run-s", type=float, default=120.0)
    p.add_argument("--event-s", type=float, default=20.0, help="mean seconds between events")
    p.add_argument("--health-s", type=float, default=60.0)
    p.add_argument("--jitter", type=float, default=0.2,
                   help="each period (health, events) varies by ± this fraction (an agent's"
                   " health timer is periodic: 0.02 for the real cadence)")
    p.add_argument("--down-at-s", type=float, default=30.0)
    p.add_argument("--down-s", type=float, default=0.0, help="relay outage (0: none)")
    p.add_argument("--kill", type=int, default=10, help="devices whose link drops silently")
    p.add_argument("--kill-at-s", type=float, default=20.0)
    p.add_argument("--keepalive", type=int, default=10)
    p.add_argument("--gap-wait-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=180.0)
    p.add_argument("--broker-extra", default=RECOMMENDED.replace("\n", ";"),
                   help="mosquitto config lines, ';'-separated (default: the recommended)")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--first", type=int, default=0, help=argparse_hidden())
    p.add_argument("--count", type=int, default=0, help=argparse_hidden())
    p.add_argument("--port", type=int, default=0, help=argparse_hidden())
    p.add_argument("--start-at", type=float, default=0.0, help=argparse_hidden())
    p.add_argument("--tail-s", type=float, default=0.0, help=argparse_hidden())
    p.add_argument("--report", default="", help=argparse_hidden())
    p.add_argument("--name", default="lg", help="device name prefix")
    p.add_argument("--silent", type=int, default=0,
                   help="devices that stop publishing (link kept): offline notice latency")
    p.add_argument("--silent-at-s", type=float, default=30.0)
    p.add_argument("--leaf-brokers", type=int, default=0,
                   help="devices on this many mosquittos bridged to the relay's (0: none)")
    p.add_argument("--quiet-broker", action="store_true", help="mosquitto logs no packets")
    p.add_argument("--relays", type=int, default=1,
                   help="relay processes sharing the subscriptions (one SQLite)")
    p.add_argument("--pause-at-s", type=float, default=120.0)
    p.add_argument("--pause-s", type=float, default=0.0,
                   help="relays frozen (SIGSTOP) this long: a relay that falls behind (0: none)")
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    return controller(args, p)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def controller(args, p) -> int:
    folder = workdir(args.workdir, "loadgen")
    extra = args.broker_extra.replace(";", "\n") + "\nsys_interval 1\n"
    kind = QuietBroker if args.quiet_broker or args.leaf_brokers else Broker
    broker = kind(folder / "broker", extra=extra).start()
    # devices on leaf brokers bridged to the core (one mosquitto holds at most its open
    # files: 20,000 on this machine), or on the core itself
    leaves = [QuietBroker(folder / f"leaf-{i}", extra=extra + leaf_bridge(i, broker.port))
              .start() for i in range(args.leaf_brokers)]
    ports = [b.port for b in leaves] or [broker.port]
    keys = Keys()
    starts = [relay_process(folder, broker.port, keys, args, i)[1] for i in range(args.relays)]
    db = folder / "relay.db"
    sysc = SysCounters(broker.port)
    leaf_sys = [SysCounters(b.port) for b in leaves]
    relays = [start() for start in starts]
    for log in relay_logs(folder):
        wait_until(lambda log=log: "relay connected" in log.read_text(), 20,
                   what="relay connected")
    start_at = time.time() + 3.0
    tail = args.settle_s
    workers, reports = [], []
    per = -(-args.devices // args.procs)
    for i in range(args.procs):
        first, count = i * per, min(per, args.devices - i * per)
        if count <= 0:
            break
        rep = folder / f"worker-{i}.json"
        reports.append(rep)
        workers.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--first", str(first), "--count", str(count),
             "--port", str(ports[i % len(ports)]), "--start-at", str(start_at), "--burst-s",
             str(args.burst_s), "--run-s", str(args.run_s), "--event-s", str(args.event_s),
             "--health-s", str(args.health_s), "--jitter", str(args.jitter),
             "--kill", str(args.kill // args.procs),
             "--kill-at-s", str(args.kill_at_s), "--keepalive", str(args.keepalive),
             "--tail-s", str(tail), "--report", str(rep), "--name", args.name,
             "--silent", str(args.silent // args.procs), "--silent-at-s", str(args.silent_at_s),
             "--workdir", str(folder)], cwd=ROOT))
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    samples = []
    down_at = t0 + args.down_at_s if args.down_s else None
    up_at = down_at + args.down_s if down_at else None
    pause_at = t0 + args.pause_at_s if args.pause_s else None
    outage = pause = None
    next_progress = t0
    while time.monotonic() < t0 + args.run_s:
        now = time.monotonic()
        if down_at and now >= down_at and outage is None:
            sysc.before_outage = sysc.get("publish/messages/dropped")
            for relay in relays:
                relay.send_signal(signal.SIGTERM)
            for relay in relays:
                relay.wait(30)
            outage = (now_ms(), None)
            print(f"relay stopped at {now - t0:.0f} s", flush=True)
        if up_at and now >= up_at and outage and outage[1] is None:
            relays = [start() for start in starts]
            outage = (outage[0], now_ms())
            print(f"relay started at {now - t0:.0f} s", flush=True)
        if pause_at and now >= pause_at and pause is None:
            for relay in relays:
                relay.send_signal(signal.SIGSTOP)
            pause = [now_ms(), None]
            print(f"relays frozen (SIGSTOP) at {now - t0:.0f} s", flush=True)
        if pause and pause[1] is None and now >= pause_at + args.pause_s:
            for relay in relays:
                relay.send_signal(signal.SIGCONT)
            pause[1] = now_ms()
            print(f"relays thawed (SIGCONT) at {now - t0:.0f} s", flush=True)
        n = (_q(db, "SELECT COUNT(*) FROM events") or [(0,)])[0][0]
        samples.append((now - t0, n))
        sysc.peak = max(sysc.peak, sysc.get("clients/connected"))
        for c in leaf_sys:
            c.peak = max(c.peak, c.get("clients/connected"))
        if now >= next_progress:
            next_progress = now + 30
            print(f"{now - t0:5.0f} s: {progress(reports, sysc, leaf_sys)}", flush=True)
        time.sleep(1.0)
    if pause and pause[1] is None:  # the run ended inside the pause
        for relay in relays:
            relay.send_signal(signal.SIGCONT)
        pause[1] = now_ms()
    print("traffic over; waiting for the relay to hold every seq", flush=True)
    settle_start = time.monotonic()
    missing = lost = None
    while time.monotonic() < settle_start + args.settle_s:
        time.sleep(2.0)
        if not all(r.exists() for r in reports):
            continue
        last = {}
        for rep in reports:
            last.update(json.loads(rep.read_text())["last_seq"])
        missing, lost = completeness(db, last)
        if missing == 0:
            break
    settled_s = time.monotonic() - settle_start
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
    last, killed, resends, silent = {}, {}, 0, {}
    for rep in reports:
        if rep.exists():
            r = json.loads(rep.read_text())
            last.update(r["last_seq"])
            killed.update(r["killed"])
            silent.update(r["silent"])
            resends += r["resends"]
    missing, lost = completeness(db, last)
    results = summarise(args, db, sysc, samples, last, killed, resends, missing, lost,
                        settled_s, outage, silent)
    results["pause"] = pause_figures(db, pause, killed, silent, args)
    results["generator"] = generator_figures(reports)
    results["keepalive_timeouts_at_brokers"] = sum(  # the devices' own, not a frozen relay's
        1 for b in [broker, *leaves] for line in b.log().splitlines()
        if f"Client {args.name}-" in line and "exceeded timeout" in line)
    print(json.dumps({k: results[k] for k in ("pause", "generator",
                                                "keepalive_timeouts_at_brokers")}, indent=1))
    results["leaf_brokers"] = [{**{k: c.get(k) for k in ("publish/messages/dropped",
                                                         "messages/received")},
                                "clients_connected_peak": c.peak} for c in leaf_sys]
    print(json.dumps({"leaf_brokers": results["leaf_brokers"]}))
    for c in leaf_sys:
        c.close()
    for b in leaves:
        b.stop()
    for relay in relays:
        relay.send_signal(signal.SIGTERM)
    for relay in relays:
        relay.wait(60)
    sysc.close()
    broker.stop()
    results["relay_log_tail"] = [line for log in relay_logs(folder)
                                 for line in log.read_text().splitlines()[-3:]]
    results["machine"] = machine()
    write_json(args.out, results)
    return 0 if missing == 0 else 1


def progress(reports: list[Path], sysc: SysCounters, leaf_sys: list[SysCounters]) -> str:
    up = lost = 0
    cpu = 0.0
    for rep in reports:
        try:
            r = json.loads(rep.read_text())
        except (OSError, ValueError):
            continue
        up += r["connected"]
        lost += r["counters"]["links_lost"]
        cpu += r.get("cpu_s", 0.0)
    dropped = sum(c.get("publish/messages/dropped") for c in [sysc, *leaf_sys])
    return (f"{up} devices connected, {lost} links lost, brokers dropped {dropped},"
            f" core received {sysc.get('messages/received')}, generator {cpu:.0f} CPU-s,"
            f" load {os.getloadavg()[0]:.1f}")


def generator_figures(reports: list[Path]) -> dict:
    """The workers' own counters at the end: did the simulated fleet stay alive?"""
    out = {"connected_at_end": 0, "in_flight_at_end": 0, "cpu_s": [], "rss_mb": []}
    for rep in reports:
        if not rep.exists():
            continue
        r = json.loads(rep.read_text())
        out["connected_at_end"] += r["connected"]
        out["in_flight_at_end"] += r["in_flight"]
        out["cpu_s"].append(r["cpu_s"])
        out["rss_mb"].append(r["rss_mb"])
        for k, v in r["counters"].items():
            out[k] = out.get(k, 0) + v
    return out


def pause_figures(db: Path, pause: list | None, killed: dict, silent: dict, args) -> dict | None:
    """Heartbeat offline notices around a relay freeze: for live devices (neither killed
    nor silent) they are false; silent devices must still be noticed."""
    if not pause:
        return None
    rows = _q(db, "SELECT device, MIN(received_ms) FROM notices WHERE kind='offline'"
                  " AND detail LIKE '%heartbeat%' GROUP BY device")
    false = {d: at for d, at in rows if d not in killed and d not in silent}
    quiet = {d: at for d, at in rows if d in silent}
    thawed = pause[1]
    return {"frozen_ms": pause, "frozen_s": round((pause[1] - pause[0]) / 1000, 1),
            "false_offline_devices": len(false),
            "false_offline_after_thaw_s": sorted(round((at - thawed) / 1000, 1)
                                                 for at in false.values())[:20],
            "silent": len(silent), "silent_noticed": len(quiet),
            "silent_noticed_after_last_message_s": sorted(
                round((at - silent[d]) / 1000, 1) for d, at in quiet.items()),
            "silent_noticed_after_thaw_s": sorted(round((at - thawed) / 1000, 1)
                                                  for at in quiet.values()),
            "target_s": 3 * args.health_s + 5}


def relay_logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("relay*.log"))


def summarise(args, db: Path, sysc: SysCounters, samples, last, killed, resends, missing, lost,
              settled_s, outage, silent) -> dict:
    lags = [r[0] for r in _q(db, "SELECT received_ms - ts FROM events WHERE historical=0"
                             " AND body NOT LIKE '%\"resent\":true%'")]
    resent = (_q(db, "SELECT COUNT(*) FROM events WHERE body LIKE '%\"resent\":true%'")
              or [(0,)])[0][0]
    rates = [(n2 - n1) / (t2 - t1) for (t1, n1), (t2, n2) in itertools.pairwise(samples)
             if t2 > t1]
    unknown = (_q(db, "SELECT COUNT(*) FROM devices WHERE online IS NULL") or [(0,)])[0][0]
    offline = dict(_q(db, "SELECT device, MIN(ts) FROM transitions WHERE online=0"
                          " AND reason='lost' GROUP BY device"))
    notice = [offline[d] - at for d, at in killed.items() if d in offline]
    asks = _q(db, "SELECT COUNT(*), COALESCE(SUM(attempts), 0) FROM seq_asks") or [(0, 0)]
    log = "".join(f.read_text(errors="replace") for f in relay_logs(db.parent))
    # a silent device (link kept, nothing published): its last message -> the relay's
    # offline notice (missed heartbeats); target 3 heartbeats + 5 s
    decided = dict(_q(db, "SELECT device, MIN(received_ms) FROM notices WHERE kind='offline'"
                          " GROUP BY device"))
    quiet = [decided[d] - at for d, at in silent.items() if d in decided]
    probes = sum(int(x.split(" tail probe")[0].rsplit(" ", 1)[-1])
                 for x in log.splitlines() if " tail probe" in x)
    gaps = (_q(db, "SELECT COUNT(*), COALESCE(SUM(last_seq - first_seq + 1), 0) FROM gaps")
            or [(0, 0)])[0]
    out = {
        "devices": args.devices, "procs": args.procs, "burst_s": args.burst_s,
        "run_s": args.run_s, "event_s": args.event_s, "health_s": args.health_s,
        "jitter": args.jitter, "keepalive_s": args.keepalive, "relay_down_s": args.down_s,
        "broker_extra": args.broker_extra,
        "events_sent": sum(last.values()), "events_stored": (_q(
            db, "SELECT COUNT(*) FROM events") or [(0,)])[0][0],
        "seqs_missing_after_settle": missing, "seqs_recorded_lost": lost,
        "settle_s": round(settled_s, 1),
        "ingest_events_per_s": {"p50": percentile(rates, 50), "max": max(rates, default=0)},
        "lag_ms": {"p50": percentile(lags, 50), "p99": percentile(lags, 99),
                   "max": max(lags, default=0)},
        "broker": {k: sysc.get(k) for k in (
            "publish/messages/dropped", "messages/received", "messages/sent",
            "store/messages/count")},
        "clients_connected_peak": sysc.peak,
        "broker_dropped_before_outage": sysc.before_outage,
        "gaps_noticed": {"ranges": gaps[0], "seqs": gaps[1]},
        "resend": {"commands_answered": resends, "events_resent_stored": resent,
                   "asks_open": asks[0][0], "tail_probes_logged_at_stop": probes},
        "devices_online_unknown": unknown,
        "offline_notice_ms": {"n": len(notice), "p50": percentile(notice, 50),
                              "max": max(notice, default=0)},
        "silent_offline_notice_ms": {"silent": len(silent), "noticed": len(quiet),
                                     "p50": percentile(quiet, 50), "max": max(quiet, default=0),
                                     "target": 3 * args.health_s * 1000 + 5000},
        "relays": args.relays,
        "outage": outage,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
