"""Audio output backends: the interface the core's arbiter drives, and a sim that records.

A backend plays one source at a time (a local file path or a stream URL). It reports what
happens asynchronously through ``listener(kind, detail)`` from its own thread; the core wraps
the listener so the call only enqueues an event. Kinds: ``"started"``, ``"ended"`` (the
source finished by itself) and ``"error"`` (``detail["error"]`` says why).
"""

from __future__ import annotations

import threading
import time
import wave
from abc import ABC, abstractmethod
from collections.abc import Callable

from drivers import DriverError

Listener = Callable[[str, dict], None]


class AudioOutput(ABC):
    """What every backend must provide (the abstract methods) and may provide (the rest,
    with defaults that fit a backend without the feature)."""

    name = "abstract"
    last_error: str | None = None  # the last device or libvlc failure, for the audio_fault alert

    def __init__(self, options: dict | None = None, listener: Listener | None = None) -> None:
        self.options = options or {}
        self.listener: Listener = listener or (lambda kind, detail: None)

    @abstractmethod
    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        """Start ``source`` (path or URL) from ``start_ms``; replaces whatever was playing."""

    @abstractmethod
    def stop(self) -> int:
        """Stop at once; return the position reached in ms (for resuming a file later)."""

    @abstractmethod
    def position_ms(self) -> int: ...

    @abstractmethod
    def set_volume(self, level: int) -> None:
        """0–100."""

    @abstractmethod
    def is_playing(self) -> bool: ...

    def ok(self) -> bool:
        """Whether the output device is usable (for health and ``audio_fault``)."""
        return True

    def preroll(self, source: str, start_ms: int = 0) -> bool:
        """Open ``source`` paused, so that a following ``play(source)`` starts it within
        milliseconds (an ``at`` start). False when this backend cannot: nothing was opened."""
        return False

    def close(self) -> None:  # noqa: B027 - optional for backends holding nothing
        """Release the device. Idempotent."""

    def _emit(self, kind: str, **detail) -> None:
        self.listener(kind, detail)


class UnavailableOutput(AudioOutput):
    """Stands in when the configured backend cannot start: every play is an output error."""

    name = "unavailable"

    def __init__(self, error: str) -> None:
        super().__init__({})
        self.error = error

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        raise DriverError(self.error)

    def stop(self) -> int:
        return 0

    def position_ms(self) -> int:
        return 0

    def set_volume(self, level: int) -> None:
        pass

    def is_playing(self) -> bool:
        return False

    def ok(self) -> bool:
        return False


def wav_duration_ms(path: str) -> int | None:
    try:
        with wave.open(path, "rb") as w:
            return int(w.getnframes() * 1000 / w.getframerate())
    except (OSError, wave.Error, EOFError, ZeroDivisionError):
        return None


class SimAudio(AudioOutput):
    """Airs nothing; records what it would air. A source ends after its WAV length (or
    ``options["sim_duration_s"]``, default 2 s; streams run until stopped).

    Test helpers: ``aired`` (list of dicts), :meth:`finish` to end the current source now,
    :meth:`fail` to make the next ``play`` raise an output error.
    """

    name = "sim"

    def __init__(self, options: dict | None = None, listener: Listener | None = None) -> None:
        super().__init__(options, listener)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._current: dict | None = None
        self._started_at = 0.0
        self._start_ms = 0
        self.volume = 100
        self.aired: list[dict] = []
        self._fail_next: str | None = None
        self.healthy = True

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        with self._lock:
            self._cancel_timer()
            if self._fail_next or not self.healthy:
                reason, self._fail_next = self._fail_next or "output device missing", None
                raise DriverError(reason)
            self.volume = volume
            self._current = {"source": source, "start_ms": start_ms, "volume": volume,
                             "t": time.monotonic()}
            self.aired.append(self._current)
            self._started_at = time.monotonic()
            self._start_ms = start_ms
            is_stream = "://" in source and not source.startswith("file://")
            default_ms = int(float(self.options.get("sim_duration_s", 2)) * 1000)
            length = None if is_stream else (wav_duration_ms(source) or default_ms)
            if length is not None:
                remaining = max(0, length - start_ms) / 1000
                self._timer = threading.Timer(remaining, self._ended, args=(self._current,))
                self._timer.daemon = True
                self._timer.start()
        self._emit("started", source=source)

    def _ended(self, item: dict) -> None:
        with self._lock:
            if self._current is not item:
                return
            self._current = None
        self._emit("ended", source=item["source"])

    def _cancel_timer(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None

    def stop(self) -> int:
        with self._lock:
            self._cancel_timer()
            pos = self._position_locked()
            self._current = None
            return pos

    def _position_locked(self) -> int:
        if not self._current:
            return 0
        return self._start_ms + int((time.monotonic() - self._started_at) * 1000)

    def position_ms(self) -> int:
        with self._lock:
            return self._position_locked()

    def set_volume(self, level: int) -> None:
        self.volume = level

    def is_playing(self) -> bool:
        return self._current is not None

    def ok(self) -> bool:
        return self.healthy

    def close(self) -> None:
        self.stop()

    # test helpers
    def finish(self) -> None:
        with self._lock:
            item, self._current = self._current, None
            self._cancel_timer()
        if item:
            self._emit("ended", source=item["source"])

    def fail(self, reason: str = "simulated output error") -> None:
        self._fail_next = reason
