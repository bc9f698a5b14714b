"""The audio service's parts made from the config, for those not handed to it: the output
backend, the level meter, the media cache, the TTS engine and the live relay's options.
A backend that cannot start is logged and stood in for; it never stops the agent."""

from __future__ import annotations

import logging
from typing import Any

from agent.audio.live import LiveOptions
from agent.audio.media import MediaCache
from agent.audio.tts import TtsEngine, TtsError, make_engine
from drivers import DriverError, resolve
from drivers.audio.base import AudioOutput, Listener, UnavailableOutput

log = logging.getLogger(__name__)


def open_output(audio_cfg: dict, listener: Listener) -> AudioOutput:
    """The ``audio.backend`` output; an :class:`UnavailableOutput` when it cannot start."""
    try:
        return resolve("audio", audio_cfg["backend"])(dict(audio_cfg), listener)
    except DriverError as e:
        log.error("audio backend %r unavailable: %s", audio_cfg["backend"], e)
        return UnavailableOutput(f"audio backend {audio_cfg['backend']} unavailable: {e}")


def open_meter(ver_cfg: dict) -> Any:
    """The ``verification.backend`` level meter, or None (none configured, or unavailable)."""
    if ver_cfg["backend"] == "none":
        return None
    try:
        return resolve("level", ver_cfg["backend"])(dict(ver_cfg))
    except DriverError as e:
        log.error("output verification unavailable: %s", e)
        return None


def open_cache(cfg: dict) -> MediaCache:
    m = cfg["media"]
    return MediaCache(m["dir"], allowed_hosts=cfg["security"]["media_hosts"],
                      quota_mb=m["quota_mb"], workers=int(m["workers"]),
                      max_bytes=int(m["max_bytes"]), timeout_s=m["timeout_s"],
                      read_timeout_s=m["read_timeout_s"], min_bytes_per_s=m["min_bytes_per_s"],
                      slow_grace_s=m["slow_grace_s"], retries=int(m["retries"]),
                      backoff_s=m["backoff_s"])


def open_tts(cfg: dict) -> tuple[TtsEngine | None, str | None]:
    """The TTS engine, or None and why (``say`` then fails with ``tts_failed``)."""
    try:
        return make_engine(cfg["tts"], cfg["tts"]["dir"]), None
    except (TtsError, OSError) as e:
        log.error("text-to-speech unavailable: %s", e)
        return None, str(e)


def live_options(cfg: dict) -> LiveOptions:
    return LiveOptions(silence_dbfs=float(cfg["verification"]["silence_dbfs"]),
                       **{k: float(v) for k, v in cfg["audio"]["live"].items()})
