"""Assembly: start-up in one order, shutdown in reverse, signals.

The only place that knows every part. Parts get what they need through their constructors.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from agent import __version__, config
from agent.core.clock import ClockTrust, SystemClock
from agent.core.loop import Core
from agent.core.store import Store
from agent.pidfile import remove_pid, write_pid

log = logging.getLogger("ttcs-agent")


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line; elsewhere we add the time ourselves.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM") and not os.environ.get("INVOCATION_ID"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stdout, force=True)


def build(cfg: dict) -> Core:
    state_dir = cfg["paths"]["state_dir"]
    os.makedirs(state_dir, exist_ok=True)
    os.makedirs(cfg["paths"]["cache_dir"], exist_ok=True)
    store = Store(os.path.join(state_dir, "agent.db"), max_rows=cfg["outbox"]["max_rows"],
                  seen_max=cfg["security"]["replay_memory"])
    clock = SystemClock()
    core = Core(cfg, clock=clock, store=store, trust=ClockTrust(cfg["clock"]["trust"]))
    _install_components(core, cfg)
    return core


def _install_components(core: Core, cfg: dict) -> None:
    """Plug optional components into the core (audio, board, schedule, health)."""
    from agent import components

    components.install(core, cfg)


def run(config_path: str | None) -> int:
    cfg = config.load_or_report(config_path)
    if cfg is None:
        return 1
    setup_logging(cfg["log"]["level"])
    # Events cross threads (network → core → libvlc): hand the interpreter over sooner than
    # the default 5 ms, so a command is not kept waiting behind a busy thread.
    sys.setswitchinterval(0.001)
    log.info("ttcs-agent %s starting as %s (config %s)", __version__, cfg["device"]["id"],
             cfg["_path"])
    core = build(cfg)
    write_pid(cfg["paths"]["state_dir"])

    def on_term(signum, frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        core.request_stop()

    def on_hup(signum, frame) -> None:
        core.interrupt(_reload, core, cfg["_path"])

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        core.run()
    finally:
        remove_pid(cfg["paths"]["state_dir"])
    log.info("stopped")
    return 0


def _reload(core: Core, path: str) -> None:
    try:
        new = config.load(path)
    except config.ConfigError as e:
        core.reload_failed(e.problems)
        return
    core.reload(new)
