#!/usr/bin/env python3
"""Load generator: N simulated devices on one mosquitto with a real ``ttcs-ctl relay`` (issue #19).

Each simulated device is its own MQTT client (client id = device id, persistent session, will
``offline``/``lost``), run by a few worker processes that drive many paho clients each from one
selector loop. A device does what the protocol asks of an agent, no more: retained ``online``
status at connect, ``health`` every ``--health-s`` (built with
``agent.health.system.build_health``), play records and alerts as ``event`` with a per-device
``seq``, and the ``resend`` command (it keeps what it sent in memory; signatures are not
checked: the relay under test signs them). Scenario:

1. a burst: every device connects within ``--burst-s``;
2. traffic for ``--run-s``; ``--down-s`` after ``--down-at-s`` the relay is stopped (SIGTERM) for
   ``--down-s`` seconds and started again;
3. ``--kill`` devices drop their link without a word (the broker sends their will);
4. the generator stops producing and waits up to ``--settle-s`` until the relay's store holds
   every seq of every device (or has it recorded as lost).

It prints ingest rate, lag (relay receive time − event time), the broker's drop counters
(``$SYS/broker/...``), gaps asked for and filled, devices left with no known link state, and
the offline-notification latency. ``--broker-extra`` adds lines to mosquitto's config, e.g.
``'max_queued_messages 1000'`` (the setting that lost messages in the field) to compare with
the recommended ``config/mosquitto.conf.example`` settings (the default here).

    .venv/bin/python scripts/bench/loadgen.py --devices 2000 --procs 4 --down-s 60
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from common import ROOT, Broker, Keys, machine, parser, percentile, wait_until, workdir, write_json
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.core.clock import SystemClock
from agent.health.system import build_health, collect_system
from tests.conftest import MOSQUITTO

PREFIX = "ttcs"
PER_SOURCE = 20_000  # devices per source address (127.0.0.2, .3, ...)
# What config/mosquitto.conf.example recommends for the relay's session (docs/DEPLOY.md).
RECOMMENDED = ("max_queued_messages 200000\nmax_queued_bytes 268435456\n"
               "set_tcp_nodelay true\n")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _enc(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


# --- one simulated device -----------------------------------------------------------------------

class Device:
    def __init__(self, name: str, port: int, keepalive: int, fleet: Fleet) -> None:
        self.name, self.port, self.fleet = name, port, fleet
        self.index = int(name.rsplit("-", 1)[1])
        self.seq = 0
        self.sent: dict[int, bytes] = {}
        self.session = 1
        self.resends = 0
        self.connected = False
        self.silent = False  # says nothing more, link kept (heartbeats missed)
        self.last_ms = 0  # when it last published health or an event
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(20)
        c.will_set(self.topic("status"), _enc({"v": 1, "state": "offline", "ts": _now_ms(),
                                               "session": 1, "reason": "lost"}), 1, True)
        c.on_connect = self.on_connect
        c.on_disconnect = self.on_disconnect
        c.on_message = self.on_message
        self.client = c
        self.keepalive = keepalive

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/dev/{self.name}/{leaf}"

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 86400
        # paho binds its socket before connecting, so the ephemeral ports (28,232 here) are
        # shared by every connection from one source address: spread over 127.0.0.2...
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive,
                            clean_start=False, properties=props,
                            bind_address=f"127.0.0.{2 + self.index // PER_SOURCE}")
        self.fleet.watch(self)

    def on_connect(self, c, userdata, flags, rc, props) -> None:
        self.connected = True
        c.publish(self.topic("status"), _enc({"v": 1, "state": "online", "ts": _now_ms(),
                                             "session": self.session}), 1, retain=True)
        c.subscribe(self.topic("cmd"), 1)
        self.fleet.pending.add(self)
        self.last_ms = _now_ms()  # its birth is a sign of life to the relay

    def on_disconnect(self, *a) -> None:
        self.connected = False

    def event(self, body: dict) -> None:
        if self.silent:
            return
        self.seq += 1
        payload = _enc({"v": 1, "ts": _now_ms(), **body, "seq": self.seq})
        self.sent[self.seq] = payload
        self.client.publish(self.topic("event"), payload, 1)
        self.fleet.pending.add(self)
        self.last_ms = _now_ms()

    def health(self, system: dict, clock: SystemClock) -> None:
        if self.silent:
            return
        body = build_health(system, {"version": "loadgen", "clock_trusted": True,
                                     "clock_source": "config", "outbox_depth": 0}, clock)
        body["session"] = self.session
        self.client.publish(self.topic("health"), _enc(body), 1)
        self.fleet.pending.add(self)
        self.last_ms = _now_ms()

    def on_message(self, c, userdata, msg) -> None:
        try:
            env = json.loads(msg.payload)
            args = env["args"]
            lo, hi = int(args["from_seq"]), int(args["to_seq"])
        except (ValueError, KeyError, TypeError):
            return
        if env.get("type") != "resend":
            return
        ack = {"v": 1, "id": env.get("id"), "ts": _now_ms()}
        c.publish(self.topic("ack"), _enc({**ack, "stage": "received",
                                            "detail": {"type": "resend"}}), 1)
        sent, missing = 0, []
        for seq in range(lo, min(hi, self.seq) + 1):  # past its end: not made yet
            payload = self.sent.get(seq)
            if payload is None:
                if missing and missing[-1][1] == seq - 1:
                    missing[-1][1] = seq
                else:
                    missing.append([seq, seq])
                continue
            c.publish(self.topic("event"), _enc({**json.loads(payload), "resent": True}), 1)
            sent += 1
        self.resends += 1
        c.publish(self.topic("ack"), _enc({**ack, "stage": "done",
                                            "detail": {"sent": sent, "missing": missing,
                                                       "last_seq": self.seq}}), 1)


class Fleet:
    """Many paho clients driven from one selector loop, with a timer heap."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.devices: list[Device] = []
        self.timers: list[tuple[float, int, object]] = []
        self.n = 0
        self.pending: set[Device] = set()  # devices with something to write

    def watch(self, dev: Device) -> None:
        sock = dev.client.socket()
        if sock is not None:
            try:
                self.sel.register(sock, selectors.EVENT_READ, dev)
            except (KeyError, ValueError):
                pass

    def at(self, when: float, fn) -> None:
        self.n += 1
        heapq.heappush(self.timers, (when, self.n, fn))

    def stop(self) -> None:
        self.stopped = True

    def run(self, until: float) -> None:
        last_misc = 0.0
        self.misc_at = 0
        self.stopped = False
        while time.monotonic() < until and not self.stopped:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, fn = heapq.heappop(self.timers)
                fn()
            wait = 0.05 if not self.timers else max(0.0, min(0.05, self.timers[0][0] - now))
            for key, _ in self.sel.select(wait):
                dev = key.data
                if dev.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(key.fileobj)
                self.pending.add(dev)  # an answer (PUBACK, connect's publish) to write
            # only the devices that may have something to write: a loop over every client
            # each pass does not scale to tens of thousands
            pending, self.pending = self.pending, set()
            for dev in pending:
                if dev.client.want_write():
                    dev.client.loop_write()
                    if dev.client.want_write():
                        self.pending.add(dev)
            if now - last_misc >= 1.0:  # keepalive pings: a tenth of the clients a second
                last_misc = now
                part = self.devices[self.misc_at::10]
                self.misc_at = (self.misc_at + 1) % 10
                for dev in part:
                    dev.client.loop_misc()
                    self.pending.add(dev)

    def _drop(self, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass


PLAY_ITEMS = ("ban-tin-sang", "ban-tin-chieu", "thong-bao-xa", "nhac-chuong")
ALERTS = ("door_open", "mains_lost", "silent_output")


def worker(args) -> int:
    """Run ``args.count`` devices from ``args.first``; write their last seqs to ``args.report``."""
    random.seed(args.first)
    clock = SystemClock()
    system = collect_system({"state": "/tmp"})
    fleet = Fleet()
    names = [f"{args.name}-{i:05d}" for i in range(args.first, args.first + args.count)]
    start = time.monotonic() + max(0.0, args.start_at - time.time())
    devs = [Device(n, args.port, args.keepalive, fleet) for n in names]
    fleet.devices = list(devs)

    def every(dev: Device, period: float, fn, first: float) -> None:
        def tick() -> None:
            fn()
            fleet.at(time.monotonic() + period * random.uniform(0.8, 1.2), tick)
        fleet.at(first, tick)

    def play(dev: Device) -> None:
        started = _now_ms() - 180_000
        dev.event({"type": "play", "id": f"s-{dev.seq}", "item": random.choice(PLAY_ITEMS),
                   "priority": "normal", "started": started, "ended": started + 175_000,
                   "result": "done", "played_ms": 175_000, "requested_ms": 175_000,
                   "media": {"url": "https://media.example.vn/a.mp3", "sha256": "0" * 64}})

    def alert(dev: Device) -> None:
        dev.event({"type": "alert", "code": random.choice(ALERTS),
                   "state": random.choice(("raised", "cleared"))})

    end_events = start + args.run_s
    for dev in devs:
        t0 = start + random.uniform(0, args.burst_s)
        fleet.at(t0, dev.connect)
        every(dev, args.health_s, lambda d=dev: d.health(system, clock) if d.connected and
              time.monotonic() < end_events else None, t0 + random.uniform(1, args.health_s))
        every(dev, args.event_s, lambda d=dev: (alert(d) if random.random() < 0.1 else play(d))
              if time.monotonic() < end_events else None, t0 + random.uniform(1, args.event_s))
    killed = set(random.sample(range(len(devs)), min(args.kill, len(devs))))
    kills: dict[str, int] = {}

    def kill(dev: Device) -> None:  # the link drops without DISCONNECT: the will goes out
        kills[dev.name] = _now_ms()
        sock = dev.client.socket()
        fleet._drop(sock)
        fleet.devices.remove(dev)
        if sock is not None:
            sock.close()

    def revive(dev: Device) -> None:  # as an agent does: reconnect, send what waited
        try:
            dev.client.reconnect()
        except OSError:
            fleet.at(time.monotonic() + 5, lambda: revive(dev))
            return
        fleet.devices.append(dev)
        fleet.watch(dev)

    for i in killed:
        fleet.at(start + args.kill_at_s, lambda d=devs[i]: kill(d))
        fleet.at(start + args.kill_at_s + 3 * args.keepalive, lambda d=devs[i]: revive(d))
    quiet = [d for i, d in enumerate(devs) if i not in killed][:args.silent]

    def silence(dev: Device) -> None:  # link kept (pings go on), nothing published
        dev.silent = True

    for dev in quiet:
        fleet.at(start + args.silent_at_s, lambda d=dev: silence(d))

    def write_report() -> None:
        report = {"last_seq": {d.name: d.seq for d in devs},
                  "resends": sum(d.resends for d in devs), "killed": kills,
                  "silent": {d.name: d.last_ms for d in quiet if d.silent}}
        tmp = Path(args.report + ".tmp")
        tmp.write_text(json.dumps(report))
        tmp.rename(args.report)
        fleet.at(time.monotonic() + 2.0, write_report)

    fleet.at(end_events + 1.0, write_report)  # then every 2 s (resends are counted)
    signal.signal(signal.SIGTERM, lambda *a: fleet.stop())
    fleet.run(end_events + args.tail_s)
    for d in fleet.devices:
        d.client.disconnect()
        d.client.loop_write()
    return 0


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
    args = p.parse_args()
    if args.worker:
        return worker(args)
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
             "--health-s", str(args.health_s), "--kill", str(args.kill // args.procs),
             "--kill-at-s", str(args.kill_at_s), "--keepalive", str(args.keepalive),
             "--tail-s", str(tail), "--report", str(rep), "--name", args.name,
             "--silent", str(args.silent // args.procs), "--silent-at-s", str(args.silent_at_s),
             "--workdir", str(folder)], cwd=ROOT))
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    samples = []
    down_at = t0 + args.down_at_s if args.down_s else None
    up_at = down_at + args.down_s if down_at else None
    outage = None
    while time.monotonic() < t0 + args.run_s:
        now = time.monotonic()
        if down_at and now >= down_at and outage is None:
            sysc.before_outage = sysc.get("publish/messages/dropped")
            for relay in relays:
                relay.send_signal(signal.SIGTERM)
            for relay in relays:
                relay.wait(30)
            outage = (_now_ms(), None)
            print(f"relay stopped at {now - t0:.0f} s", flush=True)
        if up_at and now >= up_at and outage and outage[1] is None:
            relays = [start() for start in starts]
            outage = (outage[0], _now_ms())
            print(f"relay started at {now - t0:.0f} s", flush=True)
        n = (_q(db, "SELECT COUNT(*) FROM events") or [(0,)])[0][0]
        samples.append((now - t0, n))
        sysc.peak = max(sysc.peak, sysc.get("clients/connected"))
        time.sleep(1.0)
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
    results["leaf_brokers"] = [{k: c.get(k) for k in ("publish/messages/dropped",
                                                      "clients/connected",
                                                      "messages/received")} for c in leaf_sys]
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
        "run_s": args.run_s, "event_s": args.event_s, "relay_down_s": args.down_s,
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
