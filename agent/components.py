"""Optional components plugged into the core according to the config."""

from __future__ import annotations

import logging

from agent.core import Core

log = logging.getLogger(__name__)


def install(core: Core, cfg: dict) -> None:
    """Install what the config asks for. Each component registers its commands, documents,
    state parts and timers with the core."""
