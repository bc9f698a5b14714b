"""Optional components plugged into the core according to the config.

Each component module has ``install(core, cfg)``, which registers its commands, documents,
state and health parts, timers and stop hooks. Start-up order is the order below; the core
runs stop hooks in reverse.
"""

from __future__ import annotations

import importlib
import logging

from agent.core.loop import Core

log = logging.getLogger(__name__)

COMPONENTS = ("audio.service", "board.service", "schedule.service", "health.service")


def install(core: Core, cfg: dict) -> None:
    for name in COMPONENTS:
        try:
            module = importlib.import_module(f"agent.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"agent.{name}":
                raise
            continue
        module.install(core, cfg)
