"""The test tone: what the ``test`` command airs (docs/AUDIO.md, "``test``"), also used by
tests and benchmarks as known media."""

from __future__ import annotations

import math
import os
import struct
import wave

from agent.audio.arbiter import Variant
from drivers.audio.base import wav_duration_ms


def write_tone(path: str, hz: float = 1000.0, seconds: float = 1.5, dbfs: float = -12.0,
               rate: int = 22050) -> str:
    """A sine test tone as a 16-bit mono WAV, with 20 ms fades (no clicks)."""
    if os.path.exists(path):
        return path
    n, fade = int(rate * seconds), int(rate * 0.02)
    amp = 32767 * 10 ** (dbfs / 20)
    frames = bytearray()
    for i in range(n):
        env = min(1.0, i / fade, (n - 1 - i) / fade)
        frames += struct.pack("<h", int(amp * env * math.sin(2 * math.pi * hz * i / rate)))
    tmp = f"{path}.{os.getpid()}.tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    os.replace(tmp, path)
    return path


def tone_variant(path: str, seconds: float) -> Variant:
    """The ``test`` command's 1 kHz tone of ``seconds``, written to ``path`` once."""
    write_tone(path, seconds=seconds)
    return Variant(path, None, {"tone_hz": 1000, "seconds": seconds}, wav_duration_ms(path))
