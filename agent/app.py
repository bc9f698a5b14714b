"""Assembly: start-up in one order, shutdown in reverse, signals.

The only place that knows every part. Parts get what they need through their constructors.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

from agent import __version__, config
from agent.audio import service as audio_service
from agent.audio.parts import open_cache
from agent.board import service as board_service
from agent.core import sentlog
from agent.core.clock import ClockTrust, SystemClock
from agent.core.loop import Core
from agent.core.store import Store
from agent.health import service as health_service
from agent.pidfile import remove_pid, write_pid
from agent.schedule import service as schedule_service
from agent.update import service as update_service
from drivers.gpio import GPIOBackend, open_gpio

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
    install_services(core, cfg)
    return core


def install_services(core: Core, cfg: dict) -> Services:
    """The services, in their one start-up order; each gets its collaborators here.

    GPIO first (the amplifier relay and the cabinet inputs share it), the media cache (audio
    media and board images; audio closes it), then the board (the audio service shows an
    item's board text while it airs), audio, the scheduler (hands
    slots to audio) and health (the only sampler). The core runs stop hooks in reverse, so
    health stops first and GPIO is released last.
    """
    gpio = open_gpio(cfg["gpio"]["backend"])
    core.stop_hooks.append(gpio.close)
    cache = open_cache(cfg)  # one verified media cache: audio media and board page images
    board = board_service.install(core, cfg, cache=cache)
    audio = audio_service.install(core, cfg, board=board, gpio=gpio, cache=cache)
    schedule = schedule_service.install(core, cfg, audio=audio)
    health = health_service.install(core, cfg, gpio=gpio)
    update = update_service.install(core, cfg, audio=audio)  # after health: docs/UPDATE.md
    sentlog.install(core, cfg)  # resend of kept events (no collaborators)
    return Services(gpio=gpio, board=board, audio=audio, schedule=schedule, health=health,
                    update=update)


@dataclass
class Services:
    gpio: GPIOBackend
    board: board_service.BoardService
    audio: audio_service.AudioService
    schedule: schedule_service.ScheduleService
    health: health_service.HealthService
    update: update_service.UpdateService


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
