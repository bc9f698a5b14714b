"""``ttcs-ctl serve``: one process at the district — the relay (main thread: it owns the
signals), the console's web server (uvicorn, in a thread), the console's MQTT link and the
fleet watcher — over one store (``relay.db_path`` or ``relay.db_url``). Started in this order
and stopped in reverse, inside one ``try/finally``."""

from __future__ import annotations

import logging
import sys
import threading

from ctl.console import tables
from ctl.console.app import Console
from ctl.console.audit import Audit
from ctl.console.fleet import FleetWatcher
from ctl.console.link import Link
from ctl.console.live import Hub
from ctl.console.routes import make_app
from ctl.console.sessions import SessionStore
from ctl.console.users import LoginPolicy, UserStore
from ctl.keys import signing_key
from ctl.media import MediaStore
from ctl.session import EXIT_FAILED, EXIT_USAGE
from ctl.stopsignal import StopSignals
from ctl.store import open_store

log = logging.getLogger(__name__)


class NoKey(Exception):
    """``signing`` is not set up (``signing_key`` has said so): the console cannot sign."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError when it is not."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def build(cfg: dict, store) -> Console:
    """The console's parts over ``store`` (a :class:`ctl.store.RelayStore`)."""
    c = cfg["console"]
    tables.ensure(store)
    hub = Hub()
    audit = Audit(store)
    key = signing_key(cfg, " in ctl.yaml: the console signs every command it sends")
    if key is None:
        raise NoKey()
    kid = cfg["signing"]["kid"]
    fleet = FleetWatcher(store, cfg, float(c["live_interval_s"]),
                         on_change=lambda rows: [hub.publish("device", r.public())
                                                 for r in rows])
    return Console(
        cfg=cfg, db=store,
        users=UserStore(store, LoginPolicy(int(c["lockout_after"]), float(c["lockout_s"]),
                                           int(c["login_per_minute"]))),
        sessions=SessionStore(store, float(c["session_hours"]) * 3600), audit=audit,
        fleet=fleet, hub=hub, link=Link(cfg, audit, hub), media=MediaStore.from_config(cfg),
        signing=lambda: (key, kid), secure_cookies=bool(c["secure_cookies"]))


def _http(server) -> None:
    """uvicorn's loop; it ends with SystemExit when it cannot listen (it has logged why)."""
    try:
        server.run()
    except SystemExit:
        pass


def run(cfg: dict, listen: str | None = None, with_relay: bool = True) -> int:
    import uvicorn

    from ctl import relay as relay_mod

    try:
        host, port = parse_listen(listen or cfg["console"]["listen"])
    except ValueError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    stop = StopSignals().install()  # before anything answers: an early SIGTERM stops cleanly
    store = open_store(cfg["relay"])
    server = None
    console = None
    thread = None
    try:
        try:
            console = build(cfg, store)
        except NoKey:
            return EXIT_USAGE
        server = uvicorn.Server(uvicorn.Config(
            make_app(console), host=host, port=port, log_level="warning",
            timeout_graceful_shutdown=2, proxy_headers=True))
        console.fleet.start()
        console.link.start()
        thread = threading.Thread(target=_http, args=(server,), name="console-http",
                                  daemon=True)
        thread.start()
        while not server.started:  # listening, or it could not (uvicorn logs why)
            if not thread.is_alive():
                log.error("console: cannot listen on %s:%d; not started", host, port)
                return EXIT_FAILED
            thread.join(0.05)
        log.info("console: http://%s:%d/ (relay %s)", host, port,
                 "in this process" if with_relay else "not started: --no-relay")
        if with_relay:
            return relay_mod.run(cfg, stop=stop)
        stop.event.wait()
        return 0
    finally:
        if console is not None:
            console.hub.close()  # open pages' streams end, so the server can stop
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(10)
        if console is not None:
            console.link.stop()
            console.fleet.stop()
        store.close()
        log.info("console stopped")
