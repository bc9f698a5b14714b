"""The device volume kept across restarts (``state_dir/audio.json``, docs/AUDIO.md)."""

from __future__ import annotations

import json
import logging
import os

from drivers.fsutil import atomic_write

log = logging.getLogger(__name__)


class SavedVolume:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "audio.json")

    def load(self, default: int) -> int:
        """The saved level, or ``default`` when there is none (or it is unreadable)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                level = json.load(f).get("volume")
            return level if isinstance(level, int) and 0 <= level <= 100 else default
        except (OSError, ValueError, AttributeError):
            return default

    def save(self, level: int) -> None:
        try:
            atomic_write(self.path, json.dumps({"volume": level}).encode())
        except OSError as e:
            log.warning("cannot save the volume: %s", e)
