"""Output verification: the level measured on a monitoring input while an item airs.

A cabinet may loop the amplifier output (through a divider) or a microphone into a USB sound
card input; measuring it proves the item was really audible (``silent_output`` otherwise).

The arbiter calls :meth:`LevelMeter.begin` when audio starts and :meth:`LevelMeter.end` when the
segment ends; ``end`` returns a summary that goes into the play record's ``verification``.
Neither raises: a broken input gives ``{"error": ...}``.
"""

from __future__ import annotations

import array
import logging
import math
import threading
from abc import ABC, abstractmethod
from typing import Any

log = logging.getLogger(__name__)

FULL_SCALE = 32768.0
FLOOR_DBFS = -120.0


def to_dbfs(rms: float) -> float:
    return FLOOR_DBFS if rms <= 0 else max(FLOOR_DBFS, 20 * math.log10(rms / FULL_SCALE))


class _Accumulator:
    """Running RMS and peak of int16 samples; thread-safe (fed from the audio thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.sum_sq, self.count, self.peak, self.last_rms = 0.0, 0, 0, 0.0

    def feed(self, samples: array.array | list[int]) -> None:
        if not samples:
            return
        sq = sum(s * s for s in samples)
        with self._lock:
            self.sum_sq += sq
            self.count += len(samples)
            self.peak = max(self.peak, max(abs(s) for s in samples))
            self.last_rms = math.sqrt(sq / len(samples))

    def summary(self, silence_dbfs: float, samplerate: int) -> dict[str, Any]:
        with self._lock:
            rms = math.sqrt(self.sum_sq / self.count) if self.count else 0.0
            level = to_dbfs(rms)
            return {"rms_dbfs": round(level, 1), "peak_dbfs": round(to_dbfs(self.peak), 1),
                    "seconds": round(self.count / samplerate, 1) if samplerate else None,
                    "silent": level < silence_dbfs}


class LevelMeter(ABC):
    """Options: ``silence_dbfs`` (default -50: below this on average the output is silent)."""

    name = "abstract"

    def __init__(self, options: dict | None = None) -> None:
        self.options = options or {}
        self.silence_dbfs = float(self.options.get("silence_dbfs", -50))
        self.samplerate = int(self.options.get("samplerate", 16000))
        self._acc = _Accumulator()
        self.last: dict | None = None  # the last summary, for health
        self.error: str | None = None

    def begin(self) -> None:
        """Start measuring (resets the running figures)."""
        self._acc.reset()
        self.error = None
        self._start()

    def end(self) -> dict[str, Any]:
        """Stop measuring; return ``rms_dbfs``, ``peak_dbfs``, ``seconds``, ``silent``."""
        self._stop()
        if self.error:
            self.last = {"error": self.error}
        else:
            self.last = self._acc.summary(self.silence_dbfs, self.samplerate)
        return self.last

    def level_dbfs(self) -> float | None:
        """The level of the latest block (live), or None before any."""
        return to_dbfs(self._acc.last_rms) if self._acc.count else None

    def ok(self) -> bool:
        return self.error is None

    def close(self) -> None:
        """Release the input. Idempotent."""
        self._stop()

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _stop(self) -> None: ...


class SimMeter(LevelMeter):
    """No input. Test helpers: :meth:`feed` pushes int16 samples as the input would;
    ``tone_dbfs`` (option or attribute) makes each ``begin`` pre-load one second of a sine at
    that level, None for silence."""

    name = "sim"

    def __init__(self, options: dict | None = None) -> None:
        super().__init__(options)
        self.tone_dbfs: float | None = self.options.get("tone_dbfs", -20.0)

    def _start(self) -> None:
        if self.tone_dbfs is not None:
            amp = FULL_SCALE * 10 ** (self.tone_dbfs / 20) * math.sqrt(2)
            rate = self.samplerate
            self.feed([int(amp * math.sin(2 * math.pi * 1000 * i / rate)) for i in range(rate)])
        else:
            self.feed([0] * self.samplerate)

    def _stop(self) -> None:
        pass

    def feed(self, samples: list[int]) -> None:
        self._acc.feed(array.array("h", samples))


class SoundDeviceMeter(LevelMeter):
    """A PortAudio input via sounddevice (imported only here, only when chosen).

    Options: ``device`` (name or index; unset: the default input), ``samplerate`` (16000),
    ``channels`` (1), ``block_ms`` (100), ``silence_dbfs`` (-50).
    """

    name = "sounddevice"

    def __init__(self, options: dict | None = None) -> None:
        super().__init__(options)
        self._stream: Any = None

    def _start(self) -> None:
        self._stop()
        try:
            import sounddevice as sd  # lazily: needs libportaudio2
        except (ImportError, OSError) as e:
            self._fail(f"sounddevice unavailable: {e}")
            return
        channels = int(self.options.get("channels", 1))
        block = int(self.samplerate * int(self.options.get("block_ms", 100)) / 1000)
        try:
            self._stream = sd.RawInputStream(
                device=self.options.get("device"), samplerate=self.samplerate,
                channels=channels, dtype="int16", blocksize=block, callback=self._on_block)
            self._stream.start()
        except Exception as e:  # noqa: BLE001 - PortAudioError, ValueError (no such device)
            self._stream = None
            self._fail(f"monitoring input unavailable: {e}")

    def _on_block(self, data: Any, frames: int, _time: Any, status: Any) -> None:
        """PortAudio's thread: accumulate only."""
        samples = array.array("h")
        samples.frombytes(bytes(data))
        self._acc.feed(samples)

    def _stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.stop()
            stream.close()
        except Exception as e:  # noqa: BLE001
            log.warning("closing the monitoring input failed: %s", e)

    def _fail(self, message: str) -> None:
        self.error = message
        log.warning(message)
