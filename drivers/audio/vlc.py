"""Audio output through libvlc (python-vlc): files, http/https/rtsp streams, any codec VLC has.

One libvlc instance and one media player are kept and reused; they are recreated after a
failure (a sound card that was unplugged and came back).

Threads: the core calls ``play``/``stop``/... from its own thread; ``_lock`` serialises those
calls. libvlc reports events from its own threads; the callbacks here never call libvlc and
never take ``_lock`` (``stop()`` holds it while libvlc joins the thread that may be inside a
callback), they only read plain attributes and call the listener, which just enqueues.

libvlc reports end-of-media when the input has been decoded, up to a second or more before the
output device has played the last of it. Switching to the next source at once would cut the
last words, so ``ended`` is reported after the rest has had time to play (a short helper
thread waits; it is cancelled by the next play/stop).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from drivers import DriverError, DriverUnavailable
from drivers.audio.base import AudioOutput, Listener

log = logging.getLogger(__name__)

BASE_ARGS = ["--no-video", "--quiet", "--no-stats"]
MAX_DRAIN_S = 5.0


def _import_vlc() -> Any:
    try:
        import vlc  # imported lazily: libvlc is only needed when this backend is chosen
    except (ImportError, OSError) as e:
        raise DriverUnavailable(f"python-vlc/libvlc unavailable: {e}") from e
    return vlc


def alsa_card_present(device: str, proc: str = "/proc/asound") -> bool:
    """Whether the ALSA card named in ``device`` (``hw:1,0``, ``plughw:CARD=Device,DEV=0``,
    ``hw:Device``) exists. Other names (``default``, plugins) are assumed present."""
    m = re.match(r"^(?:plug)?hw:(?:CARD=)?([^,]+)", device)
    if not m:
        return True
    card = m.group(1)
    name = f"card{card}" if card.isdigit() else card
    return os.path.exists(os.path.join(proc, name))


class VlcAudio(AudioOutput):
    """Options (the ``audio:`` config section): ``vlc_args`` (list of extra libvlc args, after
    ours so they win), ``device`` (ALSA device, e.g. ``plughw:CARD=Device,DEV=0``; unset: the
    system default), ``network_caching_ms`` (streams, default 3000)."""

    name = "vlc"

    def __init__(self, options: dict | None = None, listener: Listener | None = None) -> None:
        super().__init__(options, listener)
        self._vlc = _import_vlc()
        # nothing open, nothing to stop (stop() costs a round of libvlc locking)
        self._idle_states = (self._vlc.State.NothingSpecial, self._vlc.State.Stopped)
        self._lock = threading.Lock()
        self._instance: Any = None
        self._player: Any = None
        # read by libvlc callbacks without a lock: replaced whole, never mutated
        self._current: tuple[int, str] | None = None  # (generation, source)
        self._gen = 0
        self._saw_es = False
        self._reset_needed: str | None = None  # recreate the player at the next play()
        self._healthy = True
        self._start_ms = 0
        self._t_play = 0.0
        self._volume = 100
        self._prerolled: tuple[str, int] | None = None
        self.last_error = None
        try:
            self._open()
        except DriverError as e:
            self._fault(str(e))

    # --- AudioOutput ----------------------------------------------------------------------

    def play(self, source: str, *, start_ms: int = 0, volume: int = 100) -> None:
        with self._lock:
            if self._resume_preroll(source, start_ms, volume):
                return
            self._stop_locked()
            self._ensure_ready()
            media = self._media(source, start_ms)
            self._gen += 1
            self._saw_es = False
            self._start_ms, self._t_play = start_ms, time.monotonic()
            self._current = (self._gen, source)
            self._player.set_media(media)
            media.release()
            self._player.audio_set_volume(int(volume))
            self._volume = int(volume)
            if self._player.play() != 0:
                self._current = None
                self._fault(f"libvlc refused to play {source}")
                raise DriverError(f"libvlc refused to play {source}")
            self._healthy = True

    def preroll(self, source: str, start_ms: int = 0) -> bool:
        """Open ``source`` paused (decoder and output ready), so that a following
        ``play(source)`` only unpauses: a synchronised ``at`` start within milliseconds."""
        with self._lock:
            self._stop_locked()
            self._ensure_ready()
            media = self._media(source, start_ms)
            media.add_option(":start-paused")
            self._gen += 1
            self._saw_es = False
            self._player.set_media(media)
            media.release()
            if self._player.play() != 0:
                raise DriverError(f"libvlc refused to pre-roll {source}")
            self._prerolled = (source, start_ms)
            return True

    def _resume_preroll(self, source: str, start_ms: int, volume: int) -> bool:
        """Caller holds _lock. Unpause a matching pre-rolled source; False if there is none."""
        prerolled, self._prerolled = self._prerolled, None
        if prerolled != (source, start_ms) or self._player is None:
            return False
        if self._player.get_state() != self._vlc.State.Paused:
            return False
        self._gen += 1
        self._start_ms, self._t_play = start_ms, time.monotonic()
        self._current = (self._gen, source)
        self._player.audio_set_volume(int(volume))
        self._volume = int(volume)
        self._player.set_pause(0)
        return True

    def stop(self) -> int:
        with self._lock:
            return self._stop_locked()

    def position_ms(self) -> int:
        with self._lock:
            return self._position_locked()

    def set_volume(self, level: int) -> None:
        with self._lock:
            self._volume = int(level)
            if self._player is not None:
                self._player.audio_set_volume(self._volume)

    def is_playing(self) -> bool:
        return self._current is not None

    def ok(self) -> bool:
        """Device present and libvlc usable; after a fault, tries to recreate the player."""
        if not self._device_present():
            return False
        if self._healthy:
            return True
        with self._lock:
            try:
                self._ensure_ready()
            except DriverError:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            self._stop_locked()
            self._release()

    # --- internals (caller holds _lock) ---------------------------------------------------

    def _args(self) -> list[str]:
        args = list(BASE_ARGS)
        device = self.options.get("device")
        if device:
            args += ["--aout=alsa", f"--alsa-audio-device={device}"]
        return args + [str(a) for a in self.options.get("vlc_args") or []]

    def _open(self) -> None:
        instance = self._vlc.Instance(self._args())
        if instance is None:
            raise DriverError(f"libvlc failed to start with args {self._args()}")
        player = instance.media_player_new()
        if player is None:
            instance.release()
            raise DriverError("libvlc could not create a media player")
        events = player.event_manager()
        ev = self._vlc.EventType
        events.event_attach(ev.MediaPlayerPlaying, self._on_playing)
        events.event_attach(ev.MediaPlayerESAdded, self._on_es_added)
        events.event_attach(ev.MediaPlayerEndReached, self._on_end)
        events.event_attach(ev.MediaPlayerEncounteredError, self._on_error)
        self._instance, self._player = instance, player
        self._reset_needed = None
        self._healthy = True

    def _release(self) -> None:
        if self._player is not None:
            self._player.release()
        if self._instance is not None:
            self._instance.release()
        self._player = self._instance = None

    def _ensure_ready(self) -> None:
        """Raise DriverError when the device is missing; recreate libvlc after a failure."""
        if not self._device_present():
            self._fault(f"output device {self.options.get('device')} missing")
            raise DriverError(f"output device {self.options.get('device')} missing")
        if self._player is None or self._reset_needed:
            log.info("recreating libvlc player (%s)", self._reset_needed or "not open")
            self._release()
            self._open()

    def _device_present(self) -> bool:
        device = self.options.get("device")
        return not device or alsa_card_present(str(device))

    def _media(self, source: str, start_ms: int) -> Any:
        media = self._instance.media_new(source)
        if media is None:
            raise DriverError(f"libvlc cannot open {source!r}")
        if start_ms > 0:
            media.add_option(f":start-time={start_ms / 1000:.3f}")
        if "://" in source and not source.startswith("file://"):
            caching = int(self.options.get("network_caching_ms", 3000))
            media.add_option(f":network-caching={caching}")
        return media

    def _stop_locked(self) -> int:
        pos = self._position_locked()
        self._current = None  # before stop(): events of the old media are now stale
        self._prerolled = None
        if self._player is not None and self._player.get_state() not in self._idle_states:
            self._player.stop()  # also after the end: closes the output (afile writes its header)
        return pos

    def _position_locked(self) -> int:
        if self._current is None or self._player is None:
            return 0
        t = self._player.get_time()
        return max(self._start_ms, t) if t is not None and t >= 0 else self._start_ms

    def _fault(self, message: str) -> None:
        self.last_error = message
        self._reset_needed = message
        self._healthy = False
        log.error("audio output: %s", message)

    # --- libvlc callbacks: libvlc's thread; no libvlc calls, no _lock ----------------------

    def _on_playing(self, _event: Any) -> None:
        cur = self._current
        if cur is not None:
            self._emit("started", source=cur[1])

    def _on_es_added(self, _event: Any) -> None:
        self._saw_es = True

    def _on_error(self, _event: Any) -> None:
        cur = self._current
        if cur is None:
            return
        self._current = None
        self.last_error = f"libvlc error playing {cur[1]}"
        self._reset_needed = self.last_error  # a fresh player next time, in case it is stuck
        self._emit("error", source=cur[1], error="libvlc could not play the source")

    def _on_end(self, _event: Any) -> None:
        cur = self._current
        if cur is None:
            return
        if not self._saw_es:  # nothing decodable in it: a corrupt or non-media file
            self._current = None
            self._emit("error", source=cur[1], error="no playable audio in the source")
            return
        threading.Thread(target=self._drain, args=(cur,), name="vlc-drain", daemon=True).start()

    def _drain(self, cur: tuple[int, str]) -> None:
        """Report ``ended`` once the output has had time to play what libvlc buffered."""
        with self._lock:  # not a libvlc thread: taking the lock cannot deadlock here
            live = self._current == cur and self._player is not None
            length = self._player.get_length() if live else -1
        if length and length > 0:
            played = (time.monotonic() - self._t_play) * 1000
            wait = (length - self._start_ms - played) / 1000
            deadline = time.monotonic() + min(max(0.0, wait), MAX_DRAIN_S)
            while time.monotonic() < deadline and self._current == cur:
                time.sleep(0.02)
        if self._current != cur:
            return  # stopped or replaced meanwhile
        self._current = None
        self._emit("ended", source=cur[1])
