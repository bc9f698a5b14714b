"""The load generator's simulated devices: one worker process runs thousands in one asyncio loop.

A device does what the protocol asks of an agent, no more (docs/PROTOCOL.md): retained
``online`` status at connect and a retained ``offline``/``lost`` will, ``health`` every
``--health-s`` (built with ``agent.health.system.build_health``), play records and alerts as
``event`` with a per-device ``seq``, and the ``resend`` command (it keeps what it sent in
memory; signatures are not checked: the relay under test signs them). Each device is its own
MQTT connection (:class:`loadgen_mqtt.Client`, client id = device id, persistent session).

Timers: health and events are ``loop.call_at`` handles (one pending per device and kind);
keepalive pings come from one timer for the whole process, which looks at a slice of the
devices each second and pings those idle for half the keepalive. A link that drops without
being asked to (the broker cut it, a refused connection) is counted and reconnected after a
few seconds, as an agent does; the events made meanwhile wait in the session.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import signal
import time
from pathlib import Path

from loadgen_mqtt import Client

from agent.core.clock import SystemClock
from agent.health.system import build_health, collect_system

PREFIX = "ttcs"
PER_SOURCE = 20_000  # devices per source address (127.0.0.2, .3, ...): 28,232 ephemeral ports
# per source and destination (sockets bind with IP_BIND_ADDRESS_NO_PORT, loadgen_mqtt.py)
PLAY_ITEMS = ("ban-tin-sang", "ban-tin-chieu", "thong-bao-xa", "nhac-chuong")
ALERTS = ("door_open", "mains_lost", "silent_output")


def now_ms() -> int:
    return int(time.time() * 1000)


def enc(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class Counters:
    """What the worker's devices went through (written to its report)."""

    def __init__(self) -> None:
        self.connects = 0  # CONNACKs
        self.links_lost = 0  # drops nobody asked for (a keepalive timeout at the broker...)
        self.connect_errors = 0  # refused, or the TCP connect failed
        self.pings = 0
        self.published = 0


class Device:
    def __init__(self, name: str, host: str, port: int, keepalive: int, counters: Counters,
                 clock: SystemClock, system: dict) -> None:
        self.name, self.host, self.port = name, host, port
        self.index = int(name.rsplit("-", 1)[1])
        self.counters, self.clock, self.system = counters, clock, system
        self.seq = 0
        self.sent: dict[int, bytes] = {}
        self.session = 1
        self.resends = 0
        self.silent = False  # says nothing more, link kept (heartbeats missed)
        self.killed = False  # link dropped on purpose, not reconnecting until revived
        self.last_ms = 0  # when it last published health or an event (or was born)
        self.client = Client(
            name, keepalive, will_topic=self.topic("status"),
            will_payload=enc({"v": 1, "state": "offline", "ts": now_ms(), "session": 1,
                              "reason": "lost"}),
            on_connect=self.on_connect, on_message=self.on_message, on_lost=self.on_lost)

    def topic(self, leaf: str) -> str:
        return f"{PREFIX}/dev/{self.name}/{leaf}"

    @property
    def connected(self) -> bool:
        return self.client.connected

    def connect(self) -> None:
        if self.killed:  # killed before its first connection: it waits to be revived
            return
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.client.connect(self.host, self.port,
                                      f"127.0.0.{2 + self.index // PER_SOURCE}")
        except OSError:
            self.counters.connect_errors += 1
            self._retry()

    def _retry(self) -> None:
        if not self.killed:
            asyncio.get_running_loop().call_later(random.uniform(2, 8), self.connect)

    def on_connect(self, session_present: bool) -> None:
        self.counters.connects += 1
        self.publish("status", enc({"v": 1, "state": "online", "ts": now_ms(),
                                    "session": self.session}), retain=True)
        self.client.subscribe(self.topic("cmd"), 1)
        self.last_ms = now_ms()  # its birth is a sign of life to the relay

    def on_lost(self, error: Exception | None) -> None:
        if self.killed:
            return
        self.counters.links_lost += 1
        self._retry()

    def publish(self, leaf: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(self.topic(leaf), payload, 1, retain)
        self.counters.published += 1

    def event(self, body: dict) -> None:
        if self.silent:
            return
        self.seq += 1
        payload = enc({"v": 1, "ts": now_ms(), **body, "seq": self.seq})
        self.sent[self.seq] = payload
        self.publish("event", payload)  # waits in the session while the link is down
        self.last_ms = now_ms()

    def health(self) -> None:
        if self.silent or not self.connected:
            return
        body = build_health(self.system, {"version": "loadgen", "clock_trusted": True,
                                          "clock_source": "config", "outbox_depth": 0},
                            self.clock)
        body["session"] = self.session
        self.publish("health", enc(body))
        self.last_ms = now_ms()

    def play(self) -> None:
        started = now_ms() - 180_000
        self.event({"type": "play", "id": f"s-{self.seq}", "item": random.choice(PLAY_ITEMS),
                    "priority": "normal", "started": started, "ended": started + 175_000,
                    "result": "done", "played_ms": 175_000, "requested_ms": 175_000,
                    "media": {"url": "https://media.example.vn/a.mp3", "sha256": "0" * 64}})

    def alert(self) -> None:
        self.event({"type": "alert", "code": random.choice(ALERTS),
                    "state": random.choice(("raised", "cleared"))})

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            env = json.loads(payload)
            args = env["args"]
            lo, hi = int(args["from_seq"]), int(args["to_seq"])
        except (ValueError, KeyError, TypeError):
            return
        if env.get("type") != "resend":
            return
        ack = {"v": 1, "id": env.get("id"), "ts": now_ms()}
        self.publish("ack", enc({**ack, "stage": "received", "detail": {"type": "resend"}}))
        sent, missing = 0, []
        for seq in range(max(1, lo), min(hi, self.seq) + 1):  # past its end: not made yet
            kept = self.sent.get(seq)
            if kept is None:
                if missing and missing[-1][1] == seq - 1:
                    missing[-1][1] = seq
                else:
                    missing.append([seq, seq])
                continue
            self.publish("event", enc({**json.loads(kept), "resent": True}))
            sent += 1
        self.resends += 1
        self.publish("ack", enc({**ack, "stage": "done",
                                 "detail": {"sent": sent, "missing": missing,
                                            "last_seq": self.seq}}))

    def kill(self) -> None:
        """The link drops without DISCONNECT: the broker sends the will."""
        self.killed = True
        self.client.abort()

    def revive(self) -> None:
        """As an agent does: reconnect, send what waited."""
        self.killed = False
        self.connect()


def run_worker(args) -> int:
    """Run ``args.count`` devices from ``args.first``; write their last seqs to ``args.report``."""
    return asyncio.run(_worker(args))


async def _worker(args) -> int:
    random.seed(args.first)
    loop = asyncio.get_running_loop()
    clock, system, counters = SystemClock(), collect_system({"state": "/tmp"}), Counters()
    names = [f"{args.name}-{i:05d}" for i in range(args.first, args.first + args.count)]
    devs = [Device(n, "127.0.0.1", args.port, args.keepalive, counters, clock, system)
            for n in names]
    # the loop's clock is time.monotonic(): the scenario's times are offsets from start
    start = loop.time() + max(0.0, args.start_at - time.time())
    end_events = start + args.run_s
    jitter = args.jitter

    def every(period: float, fn, first: float) -> None:
        def tick() -> None:
            if loop.time() >= end_events:
                return
            fn()
            loop.call_at(loop.time() + period * random.uniform(1 - jitter, 1 + jitter), tick)
        loop.call_at(first, tick)

    for dev in devs:
        t0 = start + random.uniform(0, args.burst_s)
        loop.call_at(t0, dev.connect)
        every(args.health_s, dev.health, t0 + random.uniform(1, args.health_s))
        every(args.event_s, lambda d=dev: d.alert() if random.random() < 0.1 else d.play(),
              t0 + random.uniform(1, args.event_s))
    killed = set(random.sample(range(len(devs)), min(args.kill, len(devs))))
    kills: dict[str, int] = {}

    def kill(dev: Device) -> None:
        kills[dev.name] = now_ms()
        dev.kill()

    for i in killed:
        loop.call_at(start + args.kill_at_s, kill, devs[i])
        loop.call_at(start + args.kill_at_s + 3 * args.keepalive, devs[i].revive)
    quiet = [d for i, d in enumerate(devs) if i not in killed][:args.silent]
    for dev in quiet:
        loop.call_at(start + args.silent_at_s, setattr, dev, "silent", True)

    # each device is looked at every `slots` seconds and pinged after a keepalive without a
    # packet out, as paho does: the longest silence is a keepalive + `slots` (< 1.5 keepalives)
    slots = max(1, min(5, args.keepalive // 4))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    k, next_report = 0, loop.time() + 5.0
    while not stop.is_set() and loop.time() < end_events + args.tail_s:
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
        now = time.monotonic()
        for dev in devs[k % slots::slots]:
            if dev.client.ping_if_idle(now, args.keepalive):
                counters.pings += 1
        k += 1
        if loop.time() >= next_report:  # every 10 s while producing, every 2 s after
            _report(args.report, devs, kills, quiet, counters)
            next_report = loop.time() + (10.0 if loop.time() < end_events else 2.0)
    _report(args.report, devs, kills, quiet, counters)
    for dev in devs:
        dev.client.disconnect()
    await asyncio.sleep(0.5)  # the DISCONNECTs leave
    return 0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 2)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _report(path: str, devs: list[Device], kills: dict, quiet: list[Device],
            counters: Counters) -> None:
    report = {"last_seq": {d.name: d.seq for d in devs},
              "resends": sum(d.resends for d in devs), "killed": kills,
              "silent": {d.name: d.last_ms for d in quiet if d.silent},
              "connected": sum(d.connected for d in devs),
              "in_flight": sum(len(d.client.inflight) for d in devs),
              "counters": vars(counters), "cpu_s": _cpu_s(), "rss_mb": _rss_mb()}
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(report))
    tmp.rename(path)
