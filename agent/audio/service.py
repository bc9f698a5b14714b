"""Audio on air: the ``play``, ``live``, ``say``, ``stop``, ``volume`` and ``test`` commands.

:func:`install` wires the building blocks into the core: the output driver
(``drivers.resolve("audio", ...)``, whose listener only ``core.post``\\ s), the
:class:`~agent.audio.arbiter.Arbiter`, the :class:`~agent.audio.amplifier.Amplifier`, the
:class:`~agent.audio.media.MediaCache`, the TTS engine, the level meter and the live relays
(:mod:`agent.audio.live`). Everything here runs on the core thread except the preparation of an item
(cache look-up or download, TTS rendering, probes), which runs in this service's small pool and
posts its result back.

Flow of a command: validate (``bad_args`` for any unknown key or bad value) → ``received``
(core) → prepare in a worker (media by sha256 from the allowed hosts, or speech) → the arbiter
acks ``queued``, ``started``, ``preempted``, ``resumed``, ``stopped``, ``done``, ``failed``,
``expired``. A preparation failure is a ``failed`` ack with ``media_host``,
``media_checksum``, ``media_unavailable`` or ``tts_failed``; an output failure is
``audio_fault``. Each aired item gives one ``play`` event (its segments inside). See
docs/AUDIO.md.

API for the scheduler (core thread only)::

    svc = core.audio                       # set by install()
    svc.submit_scheduled(slot_id, kind, action, priority="normal", volume=None,
                         duration_s=None, repeat=1, exp_ms=None, on_result=None,
                         at_ms=None, extra=None)
        # kind/action as agent.schedule.model.ScheduleItem: "media" -> [{url, sha256, lang?}],
        # "live" -> {url, backups, fallback}, "say" -> {text, lang?}. Never raises; progress
        # is reported as on_result(slot_id, stage, reason) with the ack stages above (the
        # play record has origin "schedule"; no acks are sent for it). at_ms: start exactly
        # then (handed over ahead: media prepared, amplifier warmed, source pre-rolled).
        # extra: fields added to the item's play record (the scheduler's item, topic, slot,
        # due); they never replace the record's own fields.
    svc.prefetch(url, sha256, then=None)   # download in the cache's pool; then(sha, path|exc)
    svc.have(sha256) -> bool               # cached (cheap; airing re-verifies the hash)
    svc.set_pinned(shas)                   # media the schedule still needs: never evicted
    svc.cancel(slot_id) -> bool            # stop or drop a scheduled item
    svc.on_clock_jump()                    # the wall clock was stepped: re-arm at waits
"""

from __future__ import annotations

import logging
import math
import os
import re
import unicodedata
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.audio import boardtext, parts
from agent.audio.amplifier import Amplifier
from agent.audio.arbiter import RANK, Arbiter, Item, Variant, order_variants
from agent.audio.boardtext import Board, board_cut
from agent.audio.faults import Faults
from agent.audio.live import LiveOptions, LiveRelay, as_http, stream_url_problem
from agent.audio.liveout import LiveOutput
from agent.audio.media import MediaCache, MediaError
from agent.audio.records import PlayRecords
from agent.audio.tone import tone_variant
from agent.audio.tts import MAX_TEXT, TtsEngine, TtsError
from agent.audio.volume import SavedVolume
from agent.core.loop import Core, FuncHandler
from agent.protocol import Envelope
from drivers.audio.base import AudioOutput, wav_duration_ms
from drivers.gpio import open_gpio

log = logging.getLogger(__name__)

LIVE_PREFIX = "live:"
MAX_VARIANTS = 8
MAX_BACKUPS = 8
MAX_AT_AHEAD_MS = 7 * 86_400_000
MAX_DURATION_S = 86_400
CHECK_INTERVAL_S = 5.0  # output and amplifier health polling
LIVE_TICK_S = 1.0
SILENT_MIN_MS = 2000  # a segment shorter than this proves nothing about silence
PREROLL_S = 0.5
HOLD_S = 2.0  # a prepared item waits at most this long for earlier arrivals (FIFO)
FINAL = ("done", "stopped", "failed")
MAX_BOARD_TEXT = 500  # board_text of play/live/say
BOARD_TEXT_MAX_S = 86_400  # the board shows it until the audio ends (at most a day)
BOARD_LIMIT = 1000  # the board's own limit: an emergency say's text is cut to it
_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_LANG_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,2}$")
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

OnResult = Callable[[str, str, str | None], None]


# --- argument validation (SPEC §7) -------------------------------------------------------

def _int_in(args: dict, key: str, lo: int, hi: int, errors: list[str]) -> None:
    v = args.get(key)
    if key in args and not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        errors.append(f"args.{key}: must be an integer {lo}–{hi}")


def _num_in(args: dict, key: str, lo: float, hi: float, errors: list[str]) -> None:
    v = args.get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if key in args and not (ok and lo < v <= hi):
        errors.append(f"args.{key}: must be a number of seconds in ({lo}, {hi}]")


def _unknown(obj: dict, allowed: set[str], path: str, errors: list[str]) -> None:
    errors += [f"{path}.{k}: unknown argument" for k in obj if k not in allowed]


def _priority(args: dict, errors: list[str]) -> None:
    if "priority" in args and args["priority"] not in RANK:
        errors.append("args.priority: must be emergency, priority or normal")


def _board_text(args: dict, errors: list[str]) -> None:
    if "board_text" not in args:
        return
    text = args["board_text"]
    if not (isinstance(text, str) and text.strip()
            and len(unicodedata.normalize("NFC", text)) <= MAX_BOARD_TEXT):
        errors.append(f"args.board_text: must be a non-empty text of at most {MAX_BOARD_TEXT} "
                      "characters")


def _lang(obj: dict, path: str, errors: list[str]) -> None:
    if "lang" in obj and not (isinstance(obj["lang"], str) and _LANG_RE.match(obj["lang"])):
        errors.append(f"{path}.lang: must be a language tag such as 'vi'")


def _media_problems(media: Any, path: str) -> list[str]:
    items = media if isinstance(media, list) else [media]
    if isinstance(media, list) and not 1 <= len(media) <= MAX_VARIANTS:
        return [f"{path}: must be a list of 1–{MAX_VARIANTS} media objects"]
    errors: list[str] = []
    for i, m in enumerate(items):
        p = f"{path}[{i}]" if isinstance(media, list) else path
        if not isinstance(m, dict):
            errors.append(f"{p}: must be an object {{url, sha256, lang?}}")
            continue
        _unknown(m, {"url", "sha256", "lang"}, p, errors)
        url = m.get("url")
        if not (isinstance(url, str) and url.lower().startswith(("http://", "https://"))
                and len(url) <= 2048):
            errors.append(f"{p}.url: must be an http or https URL")
        if not (isinstance(m.get("sha256"), str) and _SHA_RE.match(m["sha256"])):
            errors.append(f"{p}.sha256: must be 64 hexadecimal digits")
        _lang(m, p, errors)
    return errors


def validate_play(args: dict, now_ms: int | None = None) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"media", "priority", "volume", "repeat", "at", "board_text"}, "args",
             errors)
    _board_text(args, errors)
    if "media" not in args:
        errors.append("args.media: required")
    else:
        errors += _media_problems(args["media"], "args.media")
    _priority(args, errors)
    _int_in(args, "volume", 0, 100, errors)
    _int_in(args, "repeat", 1, 10, errors)
    at = args.get("at")
    if "at" in args:
        limit = (now_ms + MAX_AT_AHEAD_MS) if now_ms is not None else 2**53
        if not (isinstance(at, int) and not isinstance(at, bool) and 0 <= at <= limit):
            errors.append("args.at: must be epoch milliseconds, at most 7 days ahead")
    return errors


def validate_live(args: dict) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"url", "backups", "fallback", "priority", "volume", "duration_s",
                    "board_text"}, "args", errors)
    _board_text(args, errors)
    problem = stream_url_problem(args.get("url"))
    if problem:
        errors.append(f"args.url: {problem}")
    backups = args.get("backups", [])
    if not (isinstance(backups, list) and len(backups) <= MAX_BACKUPS):
        errors.append(f"args.backups: must be a list of at most {MAX_BACKUPS} URLs")
    else:
        errors += [f"args.backups[{i}]: {p}" for i, u in enumerate(backups)
                   if (p := stream_url_problem(u))]
    if "fallback" in args:
        errors += _media_problems(args["fallback"], "args.fallback")
    _priority(args, errors)
    _int_in(args, "volume", 0, 100, errors)
    _num_in(args, "duration_s", 0, MAX_DURATION_S, errors)
    return errors


def validate_say(args: dict) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"text", "lang", "priority", "repeat", "volume", "board_text"}, "args",
             errors)
    _board_text(args, errors)
    text = args.get("text")
    if not (isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT):
        errors.append(f"args.text: must be a non-empty text of at most {MAX_TEXT} characters")
    _lang(args, "args", errors)
    _priority(args, errors)
    _int_in(args, "repeat", 1, 10, errors)
    _int_in(args, "volume", 0, 100, errors)
    return errors


def validate_stop(args: dict) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"id", "all"}, "args", errors)
    if "id" in args and not (isinstance(args["id"], str) and _ID_RE.match(args["id"])):
        errors.append("args.id: must be a command id")
    if "all" in args and args["all"] is not True:
        errors.append("args.all: must be true")
    if "id" in args and "all" in args:
        errors.append("args: give either id or all, not both")
    return errors


def validate_volume(args: dict) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"level"}, "args", errors)
    if "level" not in args:
        errors.append("args.level: required")
    _int_in(args, "level", 0, 100, errors)
    return errors


def validate_test(args: dict) -> list[str]:
    errors: list[str] = []
    _unknown(args, {"priority", "volume", "duration_s"}, "args", errors)
    _priority(args, errors)
    _int_in(args, "volume", 0, 100, errors)
    _num_in(args, "duration_s", 0, 10, errors)
    return errors


# --- helpers -----------------------------------------------------------------------------

@dataclass
class _Meta:
    """What the service knows about an item besides the arbiter."""

    id: str
    origin: str  # command | schedule
    kind: str  # file | stream | tts
    on_result: OnResult | None = None
    test: bool = False
    cancelled: bool = False  # stopped while preparing
    segments: list[dict] = field(default_factory=list)
    relay: LiveRelay | None = None
    shas: tuple[str, ...] = ()
    volume: int | None = None  # the item's own, else the device volume when it was queued
    arrival: int = 0
    since: float = 0.0  # monotonic: when preparation began
    rank: int = 0
    ready: Item | None = None  # prepared, waiting for earlier arrivals (FIFO)
    submitted: bool = False  # handed to the arbiter
    extra: dict = field(default_factory=dict)  # merged into the play record
    board_text: str | None = None  # shown on the board while the item airs (NFC)
    priority: str = "normal"
    on_board: bool = False


# --- the service -------------------------------------------------------------------------

class AudioService:
    """The audio component. Its parts come through the constructor; those left out are made
    from ``cfg`` (:mod:`agent.audio.parts`): ``board`` (None: no board, board texts are not
    shown), ``gpio`` (the amplifier's relay and fault pin), ``output`` (an output passed in
    reports its events to whoever made it), ``meter``, ``tts``, ``cache``, ``live_options``;
    ``pool`` runs preparation and probes (tests pass one they drive)."""

    def __init__(self, core: Core, cfg: dict, *, board: Board | None = None, gpio: Any = None,
                 output: AudioOutput | None = None, meter: Any = None,
                 tts: TtsEngine | None = None, cache: MediaCache | None = None,
                 live_options: LiveOptions | None = None, workers: int = 4,
                 pool: Any = None) -> None:
        self.core = core
        self.cfg = cfg
        self.clock = core.clock
        self.board = board
        self.live_options = live_options or parts.live_options(cfg)
        self.output = output or parts.open_output(cfg["audio"], lambda kind, detail: core.post(
            self.air.on_output_event, kind, detail))  # from the backend's thread
        self.meter = meter if meter is not None else parts.open_meter(cfg["verification"])
        self.gpio = gpio if gpio is not None else open_gpio(cfg["gpio"]["backend"])
        self.amp = Amplifier.from_config(self.gpio, self.clock, cfg["amplifier"])
        self.cache = cache or parts.open_cache(cfg)
        self.tts, self.tts_error = (tts, None) if tts is not None else parts.open_tts(cfg)
        # preparation and probes (tests pass an executor they drive themselves)
        self._pool = pool or ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="audio-prep")
        self.saved_volume = SavedVolume(cfg["paths"]["state_dir"])
        # what the arbiter plays through: live items fail over between their sources
        self.air = LiveOutput(self.output, self.live_options, meter=self.meter,
                              pool=self._pool, post=core.post, listener=self._on_air_event)
        self.arbiter = Arbiter(
            self.air, self.clock, on_ack=self._on_ack, on_play=self._on_play,
            languages=cfg["device"]["languages"], amp=self.amp, meter=self.meter,
            volume=self.saved_volume.load(int(cfg["audio"]["volume"])),
            resume_rewind_ms=int(cfg["audio"]["resume_rewind_ms"]))
        self.records = PlayRecords(core, self.meter, silent_min_ms=SILENT_MIN_MS)
        self.faults = Faults(core, self.output, self.amp)
        self.items: dict[str, _Meta] = {}
        self._durations: dict[str, int | None] = {}  # sha256 -> WAV length (see _duration)
        self._pinned_sched: set[str] = set()
        self._timer: Any = None
        self._prerolled: str | None = None
        self.timed_sources: dict[str, tuple[int, str]] = {}  # at items: id -> (at, source)

    def start(self) -> None:
        """Register with the core: commands, state, health, timers, stop hook."""
        core = self.core
        handlers = {
            "play": (self._cmd_play, lambda a: validate_play(a, self.clock.now_ms())),
            "live": (self._cmd_live, validate_live), "say": (self._cmd_say, validate_say),
            "stop": (self._cmd_stop, validate_stop), "volume": (self._cmd_volume, validate_volume),
            "test": (self._cmd_test, validate_test),
        }
        for typ, (execute, validate) in handlers.items():
            core.register_command(typ, FuncHandler(self._guard(execute), validate))
        core.add_state("playing", lambda: self.arbiter.snapshot()["current"])
        core.add_state("queue", self._queue_state)
        core.add_state("volume", lambda: self.arbiter.volume)
        core.health_parts.append(self.health)
        core.call_every(CHECK_INTERVAL_S, lambda: self.faults.check(self.arbiter.busy),
                        first_s=0)
        core.call_every(LIVE_TICK_S, self.air.tick)
        core.stop_hooks.append(self.close)
        self._pool.submit(self.cache.verify_all)  # hash what is cached once, off the core

    def _guard(self, fn: Callable[[Envelope], None]) -> Callable[[Envelope], None]:
        """A bug in one command fails that command, never the agent or what airs."""
        def run(env: Envelope) -> None:
            try:
                fn(env)
            except Exception as e:
                log.exception("%s %s failed", env.type, env.id)
                self.core.ack(env.id, "failed", "internal_error", {"message": str(e)[:300]})
        return run

    # --- commands -----------------------------------------------------------------------

    def _cmd_play(self, env: Envelope) -> None:
        a = env.args
        media = a["media"] if isinstance(a["media"], list) else [a["media"]]
        item = Item(env.id, "file", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), repeat=a.get("repeat", 1), at_ms=a.get("at"),
                    exp_ms=env.exp)
        self._prepare_media(item, media, self._command_meta(env, "file"))

    def _cmd_live(self, env: Envelope) -> None:
        a = env.args
        action = {"url": a["url"], "backups": a.get("backups", []),
                  "fallback": a.get("fallback")}
        item = Item(env.id, "stream", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), duration_s=a.get("duration_s"), exp_ms=env.exp)
        self._prepare_live(item, action, self._command_meta(env, "stream"))

    def _cmd_say(self, env: Envelope) -> None:
        a = env.args
        item = Item(env.id, "tts", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), repeat=a.get("repeat", 1), exp_ms=env.exp)
        meta = self._command_meta(env, "tts")
        if meta.board_text is None and meta.priority == "emergency":
            meta.board_text = board_cut(a["text"], BOARD_LIMIT)  # it shows what it says
        self._prepare_say(item, a["text"], a.get("lang", "vi"), meta)

    def _command_meta(self, env: Envelope, kind: str) -> _Meta:
        text = env.args.get("board_text")
        return _Meta(env.id, "command", kind, priority=env.args.get("priority", "normal"),
                     board_text=unicodedata.normalize("NFC", text) if text else None)

    def _cmd_stop(self, env: Envelope) -> None:
        board = self.board
        if env.args.get("all"):
            stopped = self._cancel_preparing(None, env.id) + self.arbiter.stop_all(by=env.id)
            if board is not None:  # ad-hoc board messages too (standing content stays)
                stopped += [i for i in board.stop_all() if i not in stopped]
        elif "id" in env.args:
            target = env.args["id"]
            stopped = self._cancel_preparing(target, env.id)
            if not stopped and self.arbiter.stop_id(target, by=env.id):
                stopped = [target]
            if not stopped and board is not None and board.stop_id(target):
                stopped = [target]  # a board command
        else:
            cur = self.arbiter.stop_current(by=env.id)
            stopped = [cur] if cur else []
        self._after()
        self.core.ack(env.id, "done", detail={"stopped": stopped})

    def _cmd_volume(self, env: Envelope) -> None:
        self.arbiter.set_volume(env.args["level"])
        self.saved_volume.save(self.arbiter.volume)
        self._after()
        self.core.ack(env.id, "done", detail={"volume": self.arbiter.volume})

    def _cmd_test(self, env: Envelope) -> None:
        a = env.args
        seconds = float(a.get("duration_s", 1.5))
        path = os.path.join(self.cfg["paths"]["cache_dir"], f"test-tone-1000hz-{seconds:g}s.wav")
        meta = _Meta(env.id, "command", "file", test=True)
        item = Item(env.id, "file", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), exp_ms=env.exp)

        self._prepare(item, meta, lambda: [tone_variant(path, seconds)])

    # --- the scheduler's API ------------------------------------------------------------

    def submit_scheduled(self, slot_id: str, kind: str, action: Any, *, priority: str = "normal",
                         volume: int | None = None, duration_s: float | None = None,
                         repeat: int = 1, exp_ms: int | None = None,
                         on_result: OnResult | None = None, at_ms: int | None = None,
                         extra: dict | None = None) -> None:
        """Air a schedule slot (see the module docstring). Never raises."""
        try:
            akind = {"media": "file", "live": "stream", "say": "tts"}[kind]
            if extra is not None and not isinstance(extra, dict):
                log.warning("scheduled item %s: extra record fields ignored (not a dict)",
                            slot_id)
                extra = None
            meta = _Meta(slot_id, "schedule", akind, on_result=on_result,
                         extra=dict(extra or {}))
            item = Item(slot_id, akind, [], priority=priority, volume=volume, repeat=repeat,
                        duration_s=duration_s, exp_ms=exp_ms, at_ms=at_ms,
                        origin="schedule")
            if kind == "media":
                self._prepare_media(item, list(action), meta)
            elif kind == "live":
                live = action if isinstance(action, dict) else {"url": action}
                self._prepare_live(item, live, meta)
            else:
                say = action if isinstance(action, dict) else {"text": action}
                self._prepare_say(item, say["text"], say.get("lang", "vi"), meta)
        except Exception as e:
            log.exception("scheduled item %s refused", slot_id)
            if on_result is not None:
                on_result(slot_id, "failed", f"bad_item: {e}")

    def prefetch(self, url: str, sha256: str,
                 then: Callable[[str, Any], None] | None = None) -> Future | None:
        """Download into the cache ahead of time; ``then(sha, path_or_exception)`` on the core."""
        try:
            self.cache.check_url(url)
        except MediaError as e:
            if then is not None:
                then(sha256.lower(), e)
            return None
        fut = self.cache.submit(url, sha256)
        if then is not None:
            fut.add_done_callback(lambda f: self.core.post(
                then, sha256.lower(), f.exception() or f.result()))
        return fut

    def have(self, sha256: str) -> bool:
        return self.cache.has(sha256)

    def set_pinned(self, shas: Any) -> None:
        self._pinned_sched = {s.lower() for s in shas}
        self._update_pins()

    def cancel(self, slot_id: str) -> bool:
        stopped = self._cancel_preparing(slot_id, "schedule") or self.arbiter.stop_id(
            slot_id, by="schedule")
        self._after()
        return bool(stopped)

    def on_clock_jump(self) -> None:
        """The wall clock was stepped (the scheduler noticed): re-arm the ``at`` waits, the
        amplifier warm-ups and the pre-roll from the new wall clock, and start at once what
        the step made due. Never raises."""
        try:
            log.info("audio: wall clock stepped; re-arming at waits")
            self._prerolled = None  # pre-rolled for an instant that moved: do it again
            self.arbiter.on_clock_jump()
        except Exception:
            log.exception("audio: re-arming after a clock step failed")
        finally:
            self._after()

    # --- preparation (workers) ----------------------------------------------------------

    def _prepare_media(self, item: Item, media: list[dict], meta: _Meta) -> None:
        try:
            for m in media:
                self.cache.check_url(m["url"])
        except MediaError as e:
            self._prep_failed(meta, e.reason, e.message)
            return
        meta.shas = tuple(m["sha256"].lower() for m in media)
        self._prepare(item, meta, lambda: [self._fetch_variant(m) for m in media],
                      ready=self._cached_variants(media))

    def _cached_variants(self, media: list[dict]) -> list[Variant] | None:
        """Variants at once when every file is cached and verified (no worker hop)."""
        out = []
        for m in media:
            path = self.cache.ready_path(m["sha256"])
            if path is None:
                return None
            out.append(Variant(path, m.get("lang"), dict(m), self._duration(m["sha256"], path)))
        return out

    def _duration(self, sha: str, path: str) -> int | None:
        """A cached file's length, read once: the file is named by its checksum, so the same
        sha256 always has the same length."""
        sha = sha.lower()
        if sha not in self._durations:
            if len(self._durations) >= 1000:
                self._durations.clear()
            self._durations[sha] = wav_duration_ms(path)
        return self._durations[sha]

    def _fetch_variant(self, m: dict) -> Variant:
        """Worker thread: a verified local copy (never a file that failed its checksum)."""
        sha = m["sha256"].lower()
        path = self.cache.path_for(sha) or self.cache.submit(m["url"], sha).result()
        return Variant(path, m.get("lang"), dict(m), wav_duration_ms(path))

    def _prepare_say(self, item: Item, text: str, lang: str, meta: _Meta) -> None:
        if self.tts is None:
            self._prep_failed(meta, "tts_failed", self.tts_error or "no tts engine")
            return

        def render() -> list[Variant]:
            path = self.tts.render(text, lang)
            return [Variant(path, lang, {"text": text, "lang": lang}, wav_duration_ms(path))]
        self._prepare(item, meta, render)

    def _prepare_live(self, item: Item, action: dict, meta: _Meta) -> None:
        urls = [action["url"], *(action.get("backups") or [])]
        try:
            for url in urls:
                self.cache.check_url(as_http(url))
            fallback = action.get("fallback")
            if fallback is not None:
                fallback = fallback[0] if isinstance(fallback, list) else fallback
                self.cache.check_url(fallback["url"])
        except MediaError as e:
            self._prep_failed(meta, e.reason, e.message)
            return
        key = LIVE_PREFIX + item.id
        media = {"url": urls[0], "backups": urls[1:]}
        if fallback is not None:
            media["fallback"] = fallback
            meta.shas = (fallback["sha256"].lower(),)

        def make() -> list[Variant]:
            path = self._fetch_variant(fallback).source if fallback is not None else None
            meta.relay = LiveRelay(urls[0], urls[1:], path, self.clock, self.live_options)
            return [Variant(key, None, media)]
        self._prepare(item, meta, make)

    def _prepare(self, item: Item, meta: _Meta, make: Callable[[], list[Variant]],
                 ready: list[Variant] | None = None) -> None:
        """Run ``make`` in a worker (or take ``ready`` variants as they are); hand the item to
        the arbiter on the core thread."""
        old = self.items.get(item.id)
        if old is not None and not old.cancelled:
            self._prep_failed(meta, "duplicate_id", f"{item.id} is already queued or airing")
            return
        # the arrival number is the arbiter's queue order: taken now, not when the
        # preparation finishes, so items submitted together air in submission order
        meta.arrival, meta.since = self.arbiter.reserve_seq(), self.clock.monotonic()
        item.seq = meta.arrival
        meta.rank = RANK.get(item.priority, 0)
        self.items[item.id] = meta
        self._update_pins()
        if ready is not None:
            self._prepared(item, meta, ready)
            return
        fut = self._pool.submit(make)
        fut.add_done_callback(lambda f: self.core.post(self._prepared, item, meta, _outcome(f)))
        self._after()

    def _prepared(self, item: Item, meta: _Meta, result: list[Variant] | BaseException) -> None:
        if meta.cancelled or self.items.get(item.id) is not meta:
            return
        if isinstance(result, BaseException):
            reason, message = _reason_for(result)
            self._prep_failed(meta, reason, message)
            return
        item.variants = result
        meta.ready = item
        self._after()

    def _held(self, meta: _Meta) -> bool:
        """Whether an earlier arrival of the same or a higher priority is still being
        prepared (for at most HOLD_S): then ``meta`` waits, so that commands sent together
        air in the order they were sent, whatever order their look-ups finish in."""
        now = self.clock.monotonic()
        return any(o.arrival < meta.arrival and o.ready is None and not o.cancelled
                   and o.rank >= meta.rank and now - o.since < HOLD_S
                   for o in self.items.values())

    def _hold_deadline(self) -> float | None:
        waiting = [m for m in self.items.values() if m.ready is not None]
        if not waiting:
            return None
        pending = [o.since + HOLD_S for o in self.items.values()
                   if o.ready is None and not o.cancelled]
        return min(pending) if pending else self.clock.monotonic()

    def _release(self) -> None:
        """Hand prepared items to the arbiter in arrival order."""
        for meta in sorted(self.items.values(), key=lambda m: m.arrival):
            if meta.ready is not None and not self._held(meta):
                self._submit(meta)

    def _submit(self, meta: _Meta) -> None:
        item, meta.ready = meta.ready, None
        assert item is not None
        meta.volume = item.volume if item.volume is not None else self.arbiter.volume
        if meta.relay is not None:
            self.air.add(LIVE_PREFIX + item.id, meta.relay)
        elif item.at_ms is not None:
            first = order_variants(item.variants, self.arbiter.languages)[0]
            self.timed_sources[item.id] = (item.at_ms, first.source)
        meta.submitted = True
        try:
            self.arbiter.submit(item)
        except ValueError as e:
            self._prep_failed(meta, "bad_args", str(e))

    def _prep_failed(self, meta: _Meta, reason: str, message: str) -> None:
        log.warning("%s %s not aired: %s (%s)", meta.origin, meta.id, reason, message)
        if self.items.get(meta.id) is meta:
            self._forget(meta.id)
        if meta.origin == "command":
            self.core.ack(meta.id, "failed", reason, {"message": message})
        else:
            self.records.not_aired(meta, reason, message)
            self._notify(meta, "failed", reason)
        self._after()

    def _cancel_preparing(self, item_id: str | None, by: str) -> list[str]:
        """Stop items still downloading or rendering (not yet in the arbiter)."""
        hits = [m for m in self.items.values() if not m.cancelled and not m.submitted
                and (item_id is None or m.id == item_id)]
        for meta in hits:
            meta.cancelled = True
            self._forget(meta.id)
            if meta.origin == "command":
                self.core.ack(meta.id, "stopped", detail={"by": by})
            self._notify(meta, "stopped", None)
        return [m.id for m in hits]

    # --- arbiter callbacks --------------------------------------------------------------

    def _on_ack(self, item_id: str, stage: str, reason: str | None = None,
                detail: dict | None = None) -> None:
        meta = self.items.get(item_id)
        if stage == "started":
            self.faults.output_failed(None)
            self.timed_sources.pop(item_id, None)
            self._prerolled = None
        if reason == "audio_fault":
            self.faults.output_failed((detail or {}).get("error", "output error"))
        if meta is not None and meta.test and stage in FINAL:
            detail = {**(detail or {}), **self.records.test_report(
                meta, output=self.output.name, audio_ok=self.faults.audio_ok,
                amplifier=self.amp.status())}
        final = stage in FINAL or stage == "expired"
        if meta is not None and meta.board_text is not None:
            shown = boardtext.follow(self.board, meta, stage, final, BOARD_TEXT_MAX_S)
            if stage == "started":
                detail = {**(detail or {}), "board": shown}
        if meta is not None and final and meta.segments:
            self.records.aired(meta, stage if stage in FINAL else "preempted")
        if meta is None or meta.origin == "command":
            self.core.ack(item_id, stage, reason, detail)
        if meta is not None:
            self._notify(meta, stage, reason)
            if final:
                self._forget(item_id)
        self.core.mark_state_dirty()

    def _on_play(self, record: dict) -> None:
        """A segment closed (one play record per item, at its final stage)."""
        self.records.segment(self.items.get(record["id"]), record)

    def _notify(self, meta: _Meta, stage: str, reason: str | None) -> None:
        if meta.on_result is not None:
            try:
                meta.on_result(meta.id, stage, reason)
            except Exception:
                log.exception("on_result for %s failed", meta.id)

    def _forget(self, item_id: str) -> None:
        self.items.pop(item_id, None)
        self.air.discard(LIVE_PREFIX + item_id)
        self.timed_sources.pop(item_id, None)
        self._update_pins()

    def _update_pins(self) -> None:
        busy = {s for m in self.items.values() for s in m.shas}
        self.cache.set_pinned(self._pinned_sched | busy)

    # --- output events, timers ----------------------------------------------------------

    def _on_air_event(self, kind: str, detail: dict) -> None:
        """An event of the output the arbiter drives (on the core thread)."""
        if kind == "switched":  # a live item changed source
            self.core.mark_state_dirty()
        elif kind != "started":
            self.arbiter.on_output_event(kind, detail)
            self._after()

    def _after(self) -> None:
        """After anything that touched the arbiter: re-arm the one timer, publish state."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()
        self._preroll()
        times = [t for t in (self.arbiter.next_deadline(), self._preroll_due(),
                             self._hold_deadline()) if t is not None]
        if times:
            self._timer = self.core.call_later(min(times) - self.clock.monotonic(), self._tick)
        self.core.mark_state_dirty()

    def _tick(self) -> None:
        self._timer = None
        self.arbiter.tick()
        self._after()

    # --- pre-roll for ``at`` -----------------------------------------------------------

    def _next_timed(self) -> tuple[int, str] | None:
        """The next ``at`` item's instant and first source."""
        if not self.timed_sources:
            return None
        return min(self.timed_sources.values())

    def _preroll_due(self) -> float | None:
        """None while something airs: the change that ends it is followed by _preroll."""
        nxt = self._next_timed()
        if (nxt is None or self._prerolled == nxt[1] or self.arbiter.busy
                or self.output.is_playing()):
            return None
        at_mono = self.clock.monotonic() + (nxt[0] - self.clock.now_ms()) / 1000
        return max(self.clock.monotonic(), at_mono - PREROLL_S)

    def _preroll(self) -> None:
        """Shortly before an ``at`` item, open its source paused so that it starts on time.

        Only when nothing airs: one player, and what airs must not be cut for a pre-roll."""
        nxt = self._next_timed()
        if nxt is None or self.arbiter.busy or self.output.is_playing():
            return
        at_ms, source = nxt
        wait_ms = at_ms - self.clock.now_ms()
        if 0 < wait_ms <= PREROLL_S * 1000 + 5 and self._prerolled != source:
            self._prerolled = source  # once: an output that cannot, or failed, starts at `at`
            try:
                self.output.preroll(source)
            except Exception as e:  # noqa: BLE001 - a failed pre-roll just means no pre-roll
                log.info("pre-roll of %s failed: %s", source, e)

    # --- health, state ------------------------------------------------------------------

    def health(self) -> dict:
        cur = self.arbiter.snapshot()["current"]
        out = {"audio_ok": self.faults.audio_ok, "playing": cur["id"] if cur else None,
               "volume": self.arbiter.volume, "last_level_dbfs": self.records.last_level,
               "amplifier_on": self.amp.state != "off"}
        if self.amp.fault_pin is not None:  # otherwise the cabinet component reports it
            out["amplifier_fault"] = bool(self.amp.fault())
        return out

    def _queue_state(self) -> list[dict]:
        snap = self.arbiter.snapshot()
        preparing = [{"id": m.id, "preparing": True} for m in self.items.values()
                     if not m.submitted and not m.cancelled]
        return snap["queue"] + [{"id": t["id"], "at": t["at"]} for t in snap["timed"]] + preparing

    def close(self) -> None:
        """Shutdown: stop what airs (recorded as stopped), then release in reverse order."""
        try:
            self.arbiter.stop_all(by="shutdown")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            for part in (self.output, self.meter, self.amp, self.cache, self.gpio):
                try:
                    if part is not None:
                        part.close()
                except Exception:
                    log.exception("closing %r failed", part)


def _outcome(fut: Future) -> Any:
    """A finished future's result, or the exception it ended with (cancelled included)."""
    try:
        return fut.exception() or fut.result()
    except CancelledError as e:
        return e


def _reason_for(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, MediaError):
        return exc.reason, exc.message
    if isinstance(exc, TtsError):
        return "tts_failed", str(exc)
    return "media_unavailable", f"{type(exc).__name__}: {exc}"


class _LaterBoard:
    """TRANSITIONAL, until the assembly hands the board service to :func:`install`:
    agent/components.py installs audio before board and passes none, so this stands in for
    the board service installed on the core later, looked up at each call (no board service:
    texts are not shown, nothing to stop). Remove it with the ``core.audio`` line below."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def _board(self) -> Board | None:
        from agent.board import service as board_service

        return board_service.get(self._core)

    def show_audio_text(self, cmd_id: str, text: str, priority: str,
                        duration_s: float) -> bool:
        board = self._board()
        return board is not None and board.show_audio_text(cmd_id, text, priority, duration_s)

    def stop_id(self, cmd_id: str) -> bool:
        board = self._board()
        return board is not None and board.stop_id(cmd_id)

    def stop_all(self) -> list[str]:
        board = self._board()
        return board.stop_all() if board is not None else []


def install(core: Core, cfg: dict, *, board: Board | None = None,
            gpio: Any = None) -> AudioService:
    """Make and start the audio service. ``board``: the board service, installed before this
    one (None, for now: the one installed on the core later, see :class:`_LaterBoard`).
    ``gpio``: the agent's GPIO backend (None: opened from ``cfg``)."""
    svc = AudioService(core, cfg, board=board if board is not None else _LaterBoard(core),
                       gpio=gpio)
    svc.start()
    core.audio = svc  # type: ignore[attr-defined] - the scheduler finds the service here
    return svc
