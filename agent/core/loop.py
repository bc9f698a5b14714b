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
from typing import Any

from agent import __version__, protocol
from agent.core import sdnotify
from agent.core.alerts import AlertConfig, AlertManager
from agent.core.clock import Clock, ClockTrust
from agent.core.inbound import CommandHandler, DocumentHandler, FuncHandler, Inbound, no_args
from agent.core.mqtt import LinkHandlers, MqttLink
from agent.core.outbox import Outbox
from agent.core.reload import Reloader
from agent.core.store import Store, encode
from agent.protocol import Envelope, Topics
from drivers.fsutil import write_json_volatile

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    fn: Callable = None  # type: ignore[assignment]
    args: tuple = ()
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


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
        self._state_due: _Timer | None = None
        self._state_last = -1e9
        self.last_state: dict | None = None
        self._status_link: dict | None = None  # the link as status.json last said it
        self.inbound = Inbound(cfg, clock=clock, store=store, trust=trust, topics=self.topics,
                               ack=self.ack, emit_event=self.emit_event,
                               state_changed=self.mark_state_dirty)
        inbound = self.topics.inbound(cfg["device"]["groups"])
        self.link = link_factory(
            {**cfg["mqtt"], "inflight": cfg["outbox"]["inflight"]}, self.device,
            LinkHandlers(on_connect=lambda sp: self.post(self._on_connect, sp),
                         on_disconnect=lambda reason: self.post(self._on_disconnect, reason),
                         on_message=lambda *msg: self.post(self.on_message, *msg),
                         on_publish=lambda mid: self.post(self._on_publish, mid),
                         on_trouble=lambda: self.post(self._link_changed)),
            will=self._will,
            cmd_topics=[t for t, k in inbound if k == "cmd"],
            doc_topics=[t for t, k in inbound if k != "cmd"],
        )
        self.outbox = Outbox(store, self.link, clock, cfg["outbox"]["inflight"])
        self.reloader = Reloader()
        self._reload_hooks()
        self.register_command("ping", FuncHandler(lambda env: self.ack(env.id, "done"), no_args))
        self.register_command("state", FuncHandler(self._cmd_state, no_args))
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
        self.inbound.register_command(typ, handler)

    def register_document(self, kind: str, handler: DocumentHandler) -> None:
        self.inbound.register_document(kind, handler)

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
            self.inbound.message(topic, payload, retain)
        finally:
            if mid is not None and qos > 0:
                self._inbound_acks.append((mid, qos, generation))

    def handle_command(self, target: str, payload: bytes, retain: bool) -> None:
        self.inbound.command(target, payload, retain)

    def handle_document(self, kind: str, target: str, payload: bytes) -> None:
        self.inbound.document(kind, target, payload)

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

    def not_interrupted(self, cmd_id: str) -> None:
        """``cmd_id`` is no longer open without its final ack being sent here: after a restart
        it is not answered ``failed``/``interrupted`` (an update that switched version, which
        the new version answers; a board message restored from the store)."""
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

    def publish_health(self, body: dict) -> dict:
        """Send a ``health`` sample (built by the health service, the only sampler): straight
        out while connected, stored while offline."""
        body["agent_uptime_s"] = int(self.clock.monotonic() - self.started_mono)
        body["session"] = self.session
        return self.outbox.send_or_store(self.topics.dev("health"), body, kind="health")

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

    def _link_view(self) -> dict:
        return {"host": self.cfg["mqtt"]["host"], "port": self.cfg["mqtt"]["port"],
                "connected": self.link.connected, "last_error": self.link.last_error,
                "protocol": self.link.protocol, "fallback": self.link.fallback}

    def _link_changed(self) -> None:
        """An attempt to connect failed (or the link changed otherwise): rewrite status.json
        when what it says of the link is no longer true, so that ``status`` and ``doctor``
        show why the agent is not connected (not on every attempt: the card)."""
        if self._link_view() != self._status_link:
            self.write_status_file()

    def write_status_file(self) -> None:
        """What ``ttcs-agent status`` shows: the last snapshot plus the link, not fsynced
        (it is rewritten often and worthless after a power cut)."""
        path = os.path.join(self.cfg["paths"]["state_dir"], "status.json")
        self._status_link = self._link_view()
        body = {
            "pid": os.getpid(), "written": self.clock.now_ms(),
            "running": self._running and not self._stopping,
            "config": self.cfg.get("_path"),
            "mqtt": {**self._status_link, "outbox": self.outbox.depth},
            "state": self.last_state,
        }
        try:
            write_json_volatile(path, body)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)

    # --- config reload -----------------------------------------------------------------

    def on_reload(self, keys: tuple[str, ...] | list[str], fn: Callable[[dict], None]) -> None:
        """Have ``fn(new_cfg)`` apply ``keys`` (dotted paths or whole sections) when a reload
        changes them; changed keys nobody applies are reported as needing a restart."""
        self.reloader.on_reload(keys, fn)

    def _reload_hooks(self) -> None:
        """The core's own keys. Those read from ``self.cfg`` at each use only need declaring:
        the reloader copies what was applied into ``self.cfg``, in place."""
        self.on_reload(("security.require_signed", "security.max_skew_s",
                        "state.min_interval_s"), lambda new: None)
        self.on_reload(("security.trusted_keys",), self.inbound.reload)
        self.on_reload(("security.replay_memory",),
                       lambda new: setattr(self.store, "seen_max",
                                           new["security"]["replay_memory"]))
        self.on_reload(("outbox.max_rows",),
                       lambda new: setattr(self.store, "max_rows", new["outbox"]["max_rows"]))
        self.on_reload(("log.level",),
                       lambda new: logging.getLogger().setLevel(new["log"]["level"].upper()))
        self.on_reload(("alerts", "health.disk_min_free_mb"), self._reload_alerts)

    def _reload_alerts(self, new: dict) -> None:
        self.alerts.reconfigure(AlertConfig.from_config(new))
        self._alerts_tick()

    def reload(self, new_cfg: dict) -> None:
        """Apply a validated config (SIGHUP): each changed key applies at once through its
        hook or is reported, by its full path, as needing a restart."""
        applied, restart = self.reloader.apply(self.cfg, new_cfg)
        body: dict[str, Any] = {"type": "config", "result": "applied"}
        if applied:
            body["applied"] = applied
        if restart:
            body["restart_needed"] = restart
            log.warning("config reloaded%s; restart needed for: %s",
                        f" (applied {', '.join(applied)})" if applied else "", ", ".join(restart))
        else:
            log.info("config reloaded%s", f": applied {', '.join(applied)}" if applied else "")
        self.emit_event(body)

    def reload_failed(self, problems: list[str]) -> None:
        for p in problems:
            log.error("config reload refused: %s", p)
        self.emit_event({"type": "config", "result": "rejected", "problems": problems[:20]})
