"""The core: one thread that owns the agent's state.

MQTT messages, broker acknowledgements, driver events and timers all become callables on one
queue, run in order by :meth:`Core.run`. Nothing else touches the state, so the domain code
needs no locks. Components (audio, board, schedule, health) plug in through
:meth:`Core.register_command`, :meth:`Core.register_document`, :meth:`Core.add_state` and the
timer functions; they report through :meth:`Core.ack` and :meth:`Core.emit_event`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from agent import __version__, protocol
from agent.args import Obj, problems
from agent.core import sdnotify
from agent.core.alerts import AlertManager
from agent.core.clock import Clock, ClockTrust
from agent.core.mqtt import LinkHandlers, MqttLink
from agent.core.outbox import Outbox
from agent.core.store import Store, encode
from agent.health import system as health
from agent.protocol import Envelope, Rejected, Topics
from drivers.fsutil import write_json_volatile

log = logging.getLogger(__name__)


class CommandHandler(Protocol):
    def validate(self, args: dict) -> list[str]:
        """Problems with ``args`` (each naming the key), empty when they are good."""

    def execute(self, env: Envelope) -> None:
        """Carry the command out; report its stages through ``core.ack``."""


class DocumentHandler(Protocol):
    def apply(self, target: str, env: Envelope, raw: bytes) -> tuple:
        """Apply a verified document; return (result, reason) or (result, reason, detail).
        Result ``unchanged`` is not recorded as an event (the broker re-delivers retained
        documents at every connect)."""


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    fn: Callable = None  # type: ignore[assignment]
    args: tuple = ()
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FuncHandler:
    """A command handler from two functions."""

    def __init__(self, execute: Callable[[Envelope], None],
                 validate: Callable[[dict], list[str]] = lambda args: []) -> None:
        self._execute = execute
        self._validate = validate

    def validate(self, args: dict) -> list[str]:
        return self._validate(args)

    def execute(self, env: Envelope) -> None:
        self._execute(env)


class Core:
    def __init__(self, cfg: dict, *, clock: Clock, store: Store, trust: ClockTrust,
                 link_factory: Callable[..., MqttLink] = MqttLink) -> None:
        self.cfg = cfg
        self.clock = clock
        self.store = store
        self.trust = trust
        self.device = cfg["device"]["id"]
        self.topics = Topics(cfg["mqtt"]["topic_prefix"], self.device)
        self._ack_topic = self.topics.dev("ack")
        self.session = store.next_session()
        self.started_mono = clock.monotonic()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Other threads wake the core's poll through this pipe; only while it sleeps there.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sleeping = False
        self._owner = threading.get_ident()
        self._timers: list[_Timer] = []
        self._timer_seq = itertools.count()
        self._running = False
        self._stopping = False
        self.commands: dict[str, CommandHandler] = {}
        self.documents: dict[str, DocumentHandler] = {}
        self.state_parts: dict[str, Callable[[], Any]] = {}
        self.health_parts: list[Callable[[], dict]] = []
        self.stop_hooks: list[Callable[[], None]] = []
        self.alerts = AlertManager(clock, cfg)
        self._alert_timer: _Timer | None = None
        self._alert_due: float | None = None
        self._inbound_acks: list[tuple[int, int, int]] = []
        self._workers = ThreadPoolExecutor(max_workers=3, thread_name_prefix="worker")
        self._watchdog_s = sdnotify.watchdog_interval_s()
        self._watchdog_last = -1e9
        self._keys = protocol.load_public_keys(cfg["security"]["trusted_keys"])
        self._state_due: _Timer | None = None
        self._state_last = -1e9
        self.last_state: dict | None = None
        self.last_health: dict | None = None
        inbound = self.topics.inbound(cfg["device"]["groups"])
        self.link = link_factory(
            {**cfg["mqtt"], "inflight": cfg["outbox"]["inflight"]}, self.device,
            LinkHandlers(on_connect=lambda sp: self.post(self._on_connect, sp),
                         on_disconnect=lambda reason: self.post(self._on_disconnect, reason),
                         on_message=lambda *msg: self.post(self.on_message, *msg),
                         on_publish=lambda mid: self.post(self._on_publish, mid)),
            will=self._will,
            cmd_topics=[t for t, k in inbound if k == "cmd"],
            doc_topics=[t for t, k in inbound if k != "cmd"],
        )
        self.outbox = Outbox(store, self.link, clock, cfg["outbox"]["inflight"])
        self.register_command("ping", FuncHandler(lambda env: self.ack(env.id, "done"), _no_args))
        self.register_command("state", FuncHandler(self._cmd_state, _no_args))
        self.add_state("alerts", self.alerts.active)

    # --- plumbing ----------------------------------------------------------------------

    def post(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the core thread. Safe from any thread; never blocks."""
        self._queue.put((fn, args))
        # The core raises _sleeping before its last look at the queue, so either it sees
        # this item or we see the flag.
        if self._sleeping and threading.get_ident() != self._owner:
            self._wakeup()

    def interrupt(self, fn: Callable, *args: Any) -> None:
        """:meth:`post` that also wakes the core when called on its own thread while it
        sleeps in :meth:`_poll` (a signal handler)."""
        self._queue.put((fn, args))
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake_w < 0:
            return  # shut down
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def call_later(self, delay_s: float, fn: Callable, *args: Any) -> _Timer:
        """Run ``fn`` on the core thread after ``delay_s`` (monotonic). Core thread only."""
        t = _Timer(self.clock.monotonic() + max(0.0, delay_s), next(self._timer_seq), fn, args)
        heapq.heappush(self._timers, t)
        return t

    def call_every(self, interval_s: float, fn: Callable, first_s: float | None = None) -> None:
        def tick() -> None:
            self.call_later(interval_s, tick)
            fn()

        self.call_later(interval_s if first_s is None else first_s, tick)

    def register_command(self, typ: str, handler: CommandHandler) -> None:
        self.commands[typ] = handler

    def register_document(self, kind: str, handler: DocumentHandler) -> None:
        self.documents[kind] = handler

    def add_state(self, name: str, fn: Callable[[], Any]) -> None:
        """Add a part to the ``state`` snapshot."""
        self.state_parts[name] = fn

    def in_worker(self, fn: Callable, *args: Any, then: Callable | None = None) -> None:
        """Run blocking ``fn(*args)`` (a download, a modem query) on a worker thread; its
        result, or the exception it raised, is handed to ``then`` on the core thread."""

        def done(future) -> None:
            if then is not None:
                exc = future.exception()
                self.post(then, exc if exc is not None else future.result())

        if self._stopping:
            return
        self._workers.submit(fn, *args).add_done_callback(done)

    # --- alerts --------------------------------------------------------------------------

    def set_alert(self, code: str, active: bool, detail: dict | None = None,
                  key: str | None = None) -> None:
        """Report a condition; the alert manager debounces it into raised/cleared events."""
        self.alerts.set(code, active, detail, key)
        self._alerts_tick()

    def observe(self, metric: str, value: float | None, key: str | None = None) -> None:
        self.alerts.observe(metric, value, key)
        self._alerts_tick()

    def _alerts_tick(self) -> None:
        for event in self.alerts.tick():
            self.emit_event(event.payload())
            self.mark_state_dirty()
        due = self.alerts.next_deadline()
        if self._alert_timer is not None:
            if due == self._alert_due:
                return  # already armed for that instant (inputs are polled 5 times a second)
            self._alert_timer.cancel()
            self._alert_timer = None
        self._alert_due = due
        if due is not None:
            self._alert_timer = self.call_later(due - self.clock.monotonic() + 0.001,
                                                self._alert_timer_fired)

    def _alert_timer_fired(self) -> None:
        self._alert_timer = None
        self._alerts_tick()

    def _check_clock(self) -> None:
        trusted = self.trust.trusted()
        self.set_alert("clock_untrusted", not trusted,
                       None if trusted else {"source": self.trust.source})
        if trusted != (self.last_state or {}).get("clock", {}).get("trusted"):
            self.mark_state_dirty()

    def run(self) -> None:
        """Start the link and run events until :meth:`request_stop`; then shut down."""
        self._running = True
        self._owner = threading.get_ident()
        self.link.waker = self._wakeup
        self.link.start()
        sdnotify.ready()  # config read, components and MQTT set up; the broker may be away
        self.call_every(self.cfg["health"]["interval_s"], self.send_health, first_s=5)
        self.call_every(10, self._check_clock, first_s=0)
        self.mark_state_dirty()
        self._fail_interrupted()
        try:
            while self._running:
                self._watchdog_tick()
                self._poll()
                self._run_batch(None)
        finally:
            self._shutdown()

    def _poll(self) -> None:
        """Serve the MQTT connection; sleep there until the broker, a timer or another
        thread's :meth:`post` needs the core. The link's callbacks post on this thread."""
        self._sleeping = True
        try:
            idle = self._queue.empty()
            woken = self.link.poll(self._wait_time() if idle else 0.0,
                                   self._wake_r if idle else None)
        finally:
            self._sleeping = False
        if woken:
            try:
                os.read(self._wake_r, 4096)
            except (BlockingIOError, OSError):
                pass

    def _run_batch(self, first: tuple | None, limit: int = 100) -> None:
        """Run due timers, ``first`` and whatever else is queued (up to ``limit``) in one
        store transaction: one fsync for the lot. Then send what they produced and confirm
        the inbound messages to the broker, only now that their effects are on disk."""
        with self.store.transaction():
            self._run_due_timers()
            if first is not None:
                self._call(*first)
            for _ in range(limit):
                try:
                    fn, args = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._call(fn, args)
        self.outbox.pump()
        self._confirm_inbound()

    def _confirm_inbound(self) -> None:
        acks, self._inbound_acks = self._inbound_acks, []
        for mid, qos, generation in acks:
            self.link.ack(mid, qos, generation)

    def _watchdog_tick(self) -> None:
        """Tell systemd we are alive, every half WatchdogSec, only while the loop is healthy:
        it got here (so it is not stuck in a handler) and its queue is not piling up."""
        if not self._watchdog_s:
            return
        now = self.clock.monotonic()
        if now - self._watchdog_last >= self._watchdog_s / 2 and self._queue.qsize() < 10_000:
            sdnotify.watchdog()
            self._watchdog_last = now

    def run_pending(self) -> None:
        """Run queued events and due timers without blocking (for tests)."""
        while True:
            self._run_batch(None)
            if self._queue.empty():
                return

    def _wait_time(self) -> float:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        now = self.clock.monotonic()
        wait = 1.0
        if self._timers:
            wait = min(wait, self._timers[0].when - now)
        if self._watchdog_s:
            wait = min(wait, self._watchdog_last + self._watchdog_s / 2 - now)
        return max(0.0, wait)

    def _run_due_timers(self) -> None:
        now = self.clock.monotonic()
        while self._timers and self._timers[0].when <= now:
            t = heapq.heappop(self._timers)
            if not t.cancelled:
                self._call(t.fn, t.args)

    def _call(self, fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("error in core event %s", getattr(fn, "__qualname__", fn))

    def request_stop(self) -> None:
        """Ask the loop to stop (any thread, e.g. a signal handler)."""
        self.interrupt(self._stop)

    def _stop(self) -> None:
        self._running = False

    def _shutdown(self) -> None:
        self._stopping = True
        sdnotify.stopping()
        for hook in reversed(self.stop_hooks):
            try:
                hook()
            except Exception:
                log.exception("error while stopping")
        status = self._status_payload("offline", reason="shutdown")
        if not self.link.publish_wait(self.topics.dev("status"), status):
            log.info("offline/shutdown not delivered (broker unreachable); the will stands")
        self.link.stop()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.write_status_file()
        self.store.close()
        wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        for fd in (wake_r, wake_w):  # a late post must not write into a reused descriptor
            os.close(fd)

    # --- link events -------------------------------------------------------------------

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        body: dict[str, Any] = {"v": 1, "state": state, "ts": self.clock.now_ms(),
                                "session": self.session}
        if reason:
            body["reason"] = reason
        return encode(body)

    def _will(self) -> tuple[str, bytes]:
        return self.topics.dev("status"), self._status_payload("offline", reason="lost")

    def _on_connect(self, session_present: bool) -> None:
        log.info("mqtt: connected to %s:%s (session present: %s)", self.cfg["mqtt"]["host"],
                 self.cfg["mqtt"]["port"], session_present)
        self.link.publish(self.topics.dev("status"), self._status_payload("online"), qos=1,
                          retain=True)
        self.publish_state(force=True)
        self.outbox.on_connected()

    def _on_disconnect(self, reason: str) -> None:
        log.warning("mqtt: link lost (%s); carrying on offline", reason)
        self.outbox.on_disconnected()
        self.mark_state_dirty()

    def _on_publish(self, mid: int) -> None:
        self.outbox.on_published(mid)

    # --- inbound -----------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retain: bool,
                   mid: int | None = None, qos: int = 0, generation: int = 0) -> None:
        """An inbound message. Its broker acknowledgement (``mid``) is sent only after what
        it caused is committed, so a crash before that makes the broker deliver it again."""
        try:
            where = self.topics.classify(topic)
            if where is None:
                log.warning("message on unexpected topic %s ignored", topic)
                return
            target, kind = where
            if kind == "cmd":
                self.handle_command(target, payload, retain)
            else:
                self.handle_document(kind, target, payload)
        finally:
            if mid is not None and qos > 0:
                self._inbound_acks.append((mid, qos, generation))

    def _check(self, obj: dict, kind: str, target: str) -> Envelope:
        env = protocol.parse_envelope(obj, kind)
        if env.target != target:
            raise Rejected(protocol.WRONG_TARGET,
                           f"target {env.target!r} does not match the topic's {target!r}", env.id)
        protocol.verify(env, self._keys, self.cfg["security"]["require_signed"])
        return env

    def handle_command(self, target: str, payload: bytes, retain: bool) -> None:
        try:
            obj = protocol.decode(payload)
            if retain:
                raise Rejected(protocol.RETAINED_COMMAND,
                               "retained commands are never executed", protocol.peek_id(obj))
            env = self._check(obj, "cmd", target)
            first = self.store.seen_get(env.id)
            if first is not None:
                raise Rejected(protocol.REPLAYED, "this command id was already accepted",
                               env.id, first_seen=first)
            protocol.check_time(env, self.clock.now_ms(), self.trust.trusted(),
                                self.cfg["security"]["max_skew_s"])
            handler = self._handler_for(env)
            errors = handler.validate(env.args)
            if errors:
                raise Rejected(protocol.BAD_ARGS, "; ".join(errors), env.id, errors=errors)
        except Rejected as r:
            log.info("command %s rejected: %s (%s)", r.cmd_id, r.reason, r.message)
            self.ack(r.cmd_id, "rejected", r.reason, {"message": r.message, **r.detail})
            return
        self.store.seen_add(env.id, env.kid, env.ts, self.clock.now_ms())
        self.store.open_add(env.id, env.type, self.clock.now_ms())
        # Written before anything airs or is acked (a crashed agent remembers it); flushed to
        # the card at the end of this batch, before the broker hears it was delivered.
        self.store.commit()
        self.ack(env.id, "received", detail={"type": env.type})
        handler.execute(env)

    def _handler_for(self, env: Envelope) -> CommandHandler:
        handler = self.commands.get(env.type)
        if handler is not None:
            return handler
        if env.type in protocol.COMMAND_TYPES:
            msg = f"{env.type!r} is not available on this device (no such hardware configured)"
        else:
            msg = f"unknown command type {env.type!r}"
        raise Rejected(protocol.UNSUPPORTED_TYPE, msg, env.id)

    def handle_document(self, kind: str, target: str, payload: bytes) -> None:
        topic = f"{target}/desired/{kind}"
        rev = None
        try:
            obj = protocol.decode(payload)
            rev = obj.get("rev") if isinstance(obj.get("rev"), int) else None
            env = self._check(obj, kind, target)
            handler = self.documents.get(kind)
            if handler is None:
                raise Rejected(protocol.UNSUPPORTED_TYPE, f"no {kind} support on this device")
            result, reason, *extra = handler.apply(target, env, payload)
            detail = extra[0] if extra else None
        except Rejected as r:
            result, reason, detail = "rejected", r.reason, {"message": r.message}
            log.info("%s document on %s rejected: %s (%s)", kind, topic, r.reason, r.message)
        if result == "unchanged":
            return
        body: dict[str, Any] = {"type": kind, "topic": topic, "rev": rev, "result": result}
        if reason:
            body["reason"] = reason
        if detail:
            body["detail"] = detail
        self.emit_event(body)
        self.mark_state_dirty()

    # --- outbound ----------------------------------------------------------------------

    def ack(self, cmd_id: str | None, stage: str, reason: str | None = None,
            detail: dict | None = None) -> None:
        body = protocol.ack(cmd_id, stage, self.clock.now_ms(), reason, detail)
        if stage in protocol.FINAL_STAGES:
            self.outbox.add(self._ack_topic, body, kind="ack")
        else:
            # A step on the way (received, queued, started, ...) goes straight out while
            # connected; if a crash loses it, the command is still open and its final ack
            # (failed/interrupted at the next start) is stored like every final ack.
            self.outbox.send_or_store(self._ack_topic, body, kind="ack")
        if cmd_id is not None and stage in protocol.FINAL_STAGES:
            self.store.open_done(cmd_id)

    def _fail_interrupted(self) -> None:
        """Commands received before a crash or stop that never reached a final stage: say so
        (they are not re-run: what they were doing is gone, and their moment has passed)."""
        with self.store.transaction():
            for cmd_id, typ, since in self.store.open_list():
                log.warning("command %s (%s) was interrupted by a restart", cmd_id, typ)
                self.ack(cmd_id, "failed", "interrupted",
                         {"type": typ, "received": since, "session": self.session - 1})
        self.outbox.pump()

    def emit_event(self, body: dict) -> dict:
        """Store and send an event; it gets ``v``, ``ts`` and the next ``seq``."""
        full = {"v": 1, "ts": self.clock.now_ms(), **body}
        return self.outbox.add(self.topics.dev("event"), full, kind=str(body.get("type", "event")),
                               event=True)

    def send_health(self) -> None:
        """Sample the system on a worker (vcgencmd may be slow), then publish ``health``."""
        paths = {"state": self.cfg["paths"]["state_dir"], "cache": self.cfg["paths"]["cache_dir"]}
        self.in_worker(health.collect_system, paths, then=self._publish_health)

    def _publish_health(self, system: dict | BaseException) -> None:
        if isinstance(system, BaseException):
            log.warning("system sample failed: %s", system)
            system = {}
        self.alerts.observe_system(system)
        self._alerts_tick()
        body = health.build_health(system, self.health_extra(), self.clock)
        body["agent_uptime_s"] = int(self.clock.monotonic() - self.started_mono)
        body["session"] = self.session
        self.last_health = self.outbox.send_or_store(self.topics.dev("health"), body,
                                                     kind="health")

    def health_extra(self) -> dict:
        extra = {"version": __version__, "clock_trusted": self.trust.trusted(),
                 "clock_source": self.trust.source,
                 "mqtt_reconnects": max(0, self.link.reconnects - 1),
                 "outbox_depth": self.outbox.depth}
        for part in self.health_parts:
            try:
                extra.update(part())
            except Exception:
                log.exception("health part failed")
        return extra

    def _cmd_state(self, env: Envelope) -> None:
        self.link.publish(self.topics.dev("status"), self._status_payload("online"), qos=1,
                          retain=True)
        self.publish_state(force=True)
        self.ack(env.id, "done")

    def snapshot(self) -> dict:
        snap: dict[str, Any] = {
            "v": 1, "ts": self.clock.now_ms(), "device": self.device, "version": __version__,
            "session": self.session,
            "clock": {"trusted": self.trust.trusted(), "source": self.trust.source},
        }
        for name, fn in self.state_parts.items():
            try:
                snap[name] = fn()
            except Exception:
                log.exception("state part %s failed", name)
        return snap

    def mark_state_dirty(self) -> None:
        """Something in the snapshot changed: publish it, at most once per min_interval_s."""
        if self._state_due is not None:
            return
        wait = self._state_last + self.cfg["state"]["min_interval_s"] - self.clock.monotonic()
        self._state_due = self.call_later(max(0.0, wait), self._state_timer)

    def _state_timer(self) -> None:
        self._state_due = None
        self.publish_state()

    def publish_state(self, force: bool = False) -> None:
        snap = self.snapshot()
        comparable = {k: v for k, v in snap.items() if k != "ts"}
        last = {k: v for k, v in (self.last_state or {}).items() if k != "ts"}
        if comparable == last and not force:
            return
        # Not connected: the snapshot is published again at the next connect.
        self.link.publish(self.topics.dev("state"), encode(snap), qos=1, retain=True)
        self.last_state = snap
        self._state_last = self.clock.monotonic()
        self.write_status_file()

    def write_status_file(self) -> None:
        """What ``ttcs-agent status`` shows: the last snapshot plus the link, not fsynced
        (it is rewritten often and worthless after a power cut)."""
        path = os.path.join(self.cfg["paths"]["state_dir"], "status.json")
        body = {
            "pid": os.getpid(), "written": self.clock.now_ms(),
            "running": self._running and not self._stopping,
            "config": self.cfg.get("_path"),
            "mqtt": {"host": self.cfg["mqtt"]["host"], "port": self.cfg["mqtt"]["port"],
                     "connected": self.link.connected, "last_error": self.link.last_error,
                     "outbox": self.outbox.depth},
            "state": self.last_state,
        }
        try:
            write_json_volatile(path, body)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)

    # --- config reload -----------------------------------------------------------------

    def reload(self, new_cfg: dict) -> None:
        """Apply a validated config (SIGHUP). Keys that need a restart are reported."""
        live = ("security", "health", "state", "log")
        restart = sorted(k for k in new_cfg if not k.startswith("_") and k not in live
                         and new_cfg[k] != self.cfg.get(k))
        self._keys = protocol.load_public_keys(new_cfg["security"]["trusted_keys"])
        for k in live:
            self.cfg[k] = new_cfg[k]
        logging.getLogger().setLevel(new_cfg["log"]["level"].upper())
        body: dict[str, Any] = {"type": "config", "result": "applied"}
        if restart:
            body["restart_needed"] = restart
            log.warning("config reloaded; changes to %s take effect at the next restart",
                        ", ".join(restart))
        else:
            log.info("config reloaded")
        self.emit_event(body)

    def reload_failed(self, problems: list[str]) -> None:
        for p in problems:
            log.error("config reload refused: %s", p)
        self.emit_event({"type": "config", "result": "rejected", "problems": problems[:20]})


_NO_ARGS = Obj()  # ping and state take no arguments


def _no_args(args: dict) -> list[str]:
    return problems(_NO_ARGS, args)
