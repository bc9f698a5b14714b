"""Audio on air: the ``play``, ``live``, ``say``, ``stop``, ``volume`` and ``test`` commands.

:class:`AudioService` wires its parts (the modules of :mod:`agent.audio`) and registers with
the core (:func:`install`). Everything runs on the core thread except the preparation of an
item (cache look-up or download, TTS rendering) and live probes, which run in this service's
small pool and post their result back. The arbiter and the preparation report every change to
one follow-up (``on_change``), which re-arms the service's one timer.

Flow of a command: validate (``bad_args`` for any unknown key or bad value) → ``received``
(core) → prepare in a worker (media by sha256 from the allowed hosts, or speech) → the arbiter
acks ``queued``, ``started``, ``preempted``, ``resumed``, ``stopped``, ``done``, ``failed``,
``expired``. A preparation failure is a ``failed`` ack with ``media_host``,
``media_checksum``, ``media_unavailable`` or ``tts_failed``; an output failure is
``audio_fault``. Each aired item gives one ``play`` event (its segments inside). See
docs/AUDIO.md.

API for the scheduler (core thread only)::

    svc = audio                            # the service agent.app hands to the scheduler
    svc.submit_scheduled(slot_id, kind, action, priority="normal", volume=None,
                         duration_s=None, repeat=1, exp_ms=None, on_result=None,
                         at_ms=None, extra=None, board_text=None)
        # kind/action as agent.schedule.model.ScheduleItem: "media" -> [{url, sha256, lang?}],
        # "live" -> {url, backups, fallback}, "say" -> {text, lang?}. Never raises; progress
        # is reported as on_result(slot_id, stage, reason) with the ack stages above (the
        # play record has origin "schedule"; no acks are sent for it). at_ms: start exactly
        # then (handed over ahead: media prepared, amplifier warmed, source pre-rolled).
        # extra: fields added to the item's play record (the scheduler's item, topic, slot,
        # due); they never replace the record's own fields. board_text: shown on the board
        # while the slot airs, at its priority, as for a command's board_text.
    svc.prefetch(url, sha256, then=None)   # download in the cache's pool; then(sha, path|exc)
    svc.have(sha256) -> bool               # cached (cheap; airing re-verifies the hash)
    svc.set_pinned(shas)                   # media the schedule still needs: never evicted
    svc.cancel(slot_id) -> bool            # stop or drop a scheduled item
    svc.on_clock_jump()                    # the wall clock was stepped: re-arm at waits
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from agent.args import BOARD_MESSAGE
from agent.audio import boardtext, parts
from agent.audio.amplifier import Amplifier
from agent.audio.arbiter import Arbiter, Item, order_variants
from agent.audio.boardtext import Board, board_cut
from agent.audio.commands import (
    validate_live,
    validate_play,
    validate_say,
    validate_stop,
    validate_test,
    validate_volume,
)
from agent.audio.faults import Faults
from agent.audio.journal import AiringJournal
from agent.audio.lanes import Lanes
from agent.audio.live import LiveOptions
from agent.audio.liveout import LiveOutput
from agent.audio.media import MediaCache
from agent.audio.prepare import Meta, Preparation
from agent.audio.preroll import Preroll
from agent.audio.records import PlayRecords
from agent.audio.tone import tone_variant
from agent.audio.tts import TtsEngine
from agent.audio.volume import SavedVolume
from agent.core.inbound import FuncHandler
from agent.core.loop import Core
from agent.protocol import Envelope, Priority
from drivers.audio.base import AudioOutput
from drivers.gpio import open_gpio

log = logging.getLogger(__name__)

LIVE_PREFIX = "live:"
CHECK_INTERVAL_S = 5.0  # output and amplifier health polling
LIVE_TICK_S = 1.0
SILENT_MIN_MS = 2000  # a segment shorter than this proves nothing about silence
PREROLL_S = 0.5
HOLD_S = 2.0  # a prepared item waits at most this long for earlier arrivals (FIFO)
FINAL = ("done", "stopped", "failed")
BOARD_TEXT_MAX_S = 86_400  # the board shows it until the audio ends (at most a day)
BOARD_LIMIT = BOARD_MESSAGE.max_len  # the board's own limit: an emergency say's text is cut to it

OnResult = Callable[[str, str, str | None], None]


class AudioService:
    """The audio component. Its parts come through the constructor; those left out are made
    from ``cfg`` (:mod:`agent.audio.parts`): ``board`` (None: no board, board texts are not
    shown), ``gpio`` (the amplifier's relay and fault pin), ``output`` (an output passed in
    reports its events to whoever made it), ``meter``, ``tts``, ``cache``, ``live_options``;
    ``pool`` runs preparation and probes, ``submit(fn, *args, lane=priority)`` as
    :class:`~agent.audio.lanes.Lanes` (tests pass one they drive)."""

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
        self._own_gpio = gpio is None  # closed here only when opened here
        self.gpio = gpio if gpio is not None else open_gpio(cfg["gpio"]["backend"])
        self.amp = Amplifier.from_config(self.gpio, self.clock, cfg["amplifier"])
        self.cache = cache or parts.open_cache(cfg)
        self.tts, tts_error = (tts, None) if tts is not None else parts.open_tts(cfg)
        self._pool = pool or Lanes(workers, name="audio-prep")  # by priority (lanes.py)
        self.saved_volume = SavedVolume(cfg["paths"]["state_dir"])
        # what the arbiter plays through: live items fail over between their sources
        self.air = LiveOutput(self.output, self.live_options, meter=self.meter,
                              pool=self._pool, post=core.post, listener=self._on_air_event)
        self.arbiter = Arbiter(
            self.air, self.clock, on_ack=self._on_ack, on_play=self._on_play,
            on_change=self._follow_up, languages=cfg["device"]["languages"], amp=self.amp,
            meter=self.meter, volume=self.saved_volume.load(int(cfg["audio"]["volume"])),
            resume_rewind_ms=int(cfg["audio"]["resume_rewind_ms"]))
        self.prep = Preparation(
            core, self.cache, tts=self.tts, tts_error=tts_error, pool=self._pool,
            live_options=self.live_options, reserve_seq=self.arbiter.reserve_seq,
            hold_s=HOLD_S, live_prefix=LIVE_PREFIX, on_ready=self._submit,
            on_failed=self._not_aired, on_stopped=self._stopped_preparing,
            on_change=self._follow_up)
        self.records = PlayRecords(core, self.meter, silent_min_ms=SILENT_MIN_MS)
        self.preroll = Preroll(self.output, self.clock, lead_s=PREROLL_S)
        self.faults = Faults(core, self.output, self.amp)
        self.journal = AiringJournal(core.store, self.clock,
                                     languages=cfg["device"]["languages"],
                                     interval_s=float(cfg["audio"]["journal_interval_s"]))
        self._timer: Any = None
        self._following = False  # inside _follow_up
        self._closed = False

    def start(self) -> None:
        """Register with the core: commands, state, health, timers, stop hook. First, the
        items the last run was airing when it died get their play records (interrupted)."""
        core = self.core
        self.journal.recover(self.records.interrupted)
        handlers = {
            "play": (self._cmd_play, lambda a: validate_play(a, self.clock.now_ms())),
            "live": (self._cmd_live, validate_live),
            "say": (self._cmd_say, lambda a: validate_say(a, self.clock.now_ms())),
            "stop": (self._cmd_stop, validate_stop), "volume": (self._cmd_volume, validate_volume),
            "test": (self._cmd_test, validate_test),
        }
        for typ, (execute, validate) in handlers.items():
            core.register_command(typ, FuncHandler(execute, validate))  # the core guards it
        core.add_state("playing", lambda: self.arbiter.snapshot()["current"])
        core.add_state("queue", self._queue_state)
        core.add_state("volume", lambda: self.arbiter.volume)
        core.health_parts.append(self.health)
        core.call_every(CHECK_INTERVAL_S, lambda: self.faults.check(self.arbiter.busy),
                        first_s=0)
        core.call_every(LIVE_TICK_S, self.air.tick)
        core.call_every(self.journal.interval_s, self.journal.tick)
        core.stop_hooks.append(self.close)
        core.on_reload(("security.media_hosts",),
                       lambda new: self.cache.set_hosts(new["security"]["media_hosts"]))
        self._pool.submit(self.cache.verify_all)  # hash what is cached once, off the core

    # --- commands -----------------------------------------------------------------------

    def _cmd_play(self, env: Envelope) -> None:
        a = env.args
        media = a["media"] if isinstance(a["media"], list) else [a["media"]]
        item = Item(env.id, "file", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), repeat=a.get("repeat", 1), at_ms=a.get("at"),
                    exp_ms=env.exp)
        self.prep.start(item, media, self._command_meta(env, "file"))

    def _cmd_live(self, env: Envelope) -> None:
        a = env.args
        action = {"url": a["url"], "backups": a.get("backups", []),
                  "fallback": a.get("fallback")}
        item = Item(env.id, "stream", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), duration_s=a.get("duration_s"), exp_ms=env.exp)
        self.prep.start(item, action, self._command_meta(env, "stream"))

    def _cmd_say(self, env: Envelope) -> None:
        a = env.args
        item = Item(env.id, "tts", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), repeat=a.get("repeat", 1), at_ms=a.get("at"),
                    exp_ms=env.exp)
        meta = self._command_meta(env, "tts")
        if meta.board_text is None and meta.priority == Priority.EMERGENCY:
            meta.board_text = board_cut(a["text"], BOARD_LIMIT)  # it shows what it says
        self.prep.start(item, {"text": a["text"], "lang": a.get("lang", "vi")}, meta)

    def _command_meta(self, env: Envelope, kind: str) -> Meta:
        return Meta(env.id, "command", kind, priority=env.args.get("priority", "normal"),
                    board_text=_nfc(env.args.get("board_text")))

    def _cmd_stop(self, env: Envelope) -> None:
        board = self.board
        if env.args.get("all"):
            stopped = self.prep.cancel(None, env.id) + self.arbiter.stop_all(by=env.id)
            if board is not None:  # ad-hoc board messages too (standing content stays)
                stopped += [i for i in board.stop_all() if i not in stopped]
        elif "id" in env.args:
            target = env.args["id"]
            stopped = self.prep.cancel(target, env.id)
            if not stopped and self.arbiter.stop_id(target, by=env.id):
                stopped = [target]
            if not stopped and board is not None and board.stop_id(target):
                stopped = [target]  # a board command
        else:
            cur = self.arbiter.stop_current(by=env.id)
            stopped = [cur] if cur else []
        self.core.ack(env.id, "done", detail={"stopped": stopped})

    def _cmd_volume(self, env: Envelope) -> None:
        self.arbiter.set_volume(env.args["level"])
        self.saved_volume.save(self.arbiter.volume)
        self.core.ack(env.id, "done", detail={"volume": self.arbiter.volume})

    def _cmd_test(self, env: Envelope) -> None:
        a = env.args
        seconds = float(a.get("duration_s", 1.5))
        path = os.path.join(self.cfg["paths"]["cache_dir"], f"test-tone-1000hz-{seconds:g}s.wav")
        meta = Meta(env.id, "command", "file", test=True)
        item = Item(env.id, "file", [], priority=a.get("priority", "normal"),
                    volume=a.get("volume"), exp_ms=env.exp)
        self.prep.prepare(item, meta, lambda: [tone_variant(path, seconds)])

    # --- the scheduler's API ------------------------------------------------------------

    def submit_scheduled(self, slot_id: str, kind: str, action: Any, *, priority: str = "normal",
                         volume: int | None = None, duration_s: float | None = None,
                         repeat: int = 1, exp_ms: int | None = None,
                         on_result: OnResult | None = None, at_ms: int | None = None,
                         extra: dict | None = None, board_text: str | None = None) -> None:
        """Air a schedule slot (see the module docstring). Never raises."""
        try:
            akind = {"media": "file", "live": "stream", "say": "tts"}[kind]
            if extra is not None and not isinstance(extra, dict):
                log.warning("scheduled item %s: extra record fields ignored (not a dict)",
                            slot_id)
                extra = None
            meta = Meta(slot_id, "schedule", akind, on_result=on_result,
                        extra=dict(extra or {}), priority=priority,
                        board_text=_nfc(board_text))
            item = Item(slot_id, akind, [], priority=priority, volume=volume, repeat=repeat,
                        duration_s=duration_s, exp_ms=exp_ms, at_ms=at_ms,
                        origin="schedule")
            if kind != "media" and not isinstance(action, dict):  # a bare URL or text
                action = {"url": action} if kind == "live" else {"text": action}
            self.prep.start(item, action, meta)
        except Exception as e:
            log.exception("scheduled item %s refused", slot_id)
            if on_result is not None:
                on_result(slot_id, "failed", f"bad_item: {e}")

    def prefetch(self, url: str, sha256: str,
                 then: Callable[[str, Any], None] | None = None) -> Future | None:
        """Download into the cache ahead of time; ``then(sha, path_or_exception)`` on the core."""
        return self.prep.prefetch(url, sha256, then)

    def have(self, sha256: str) -> bool:
        return self.cache.has(sha256)

    def set_pinned(self, shas: Any) -> None:
        self.prep.set_pinned(shas)

    def most_urgent(self) -> Priority | None:
        """The most urgent priority airing or waiting to air, or None (an update waits for
        nothing above normal)."""
        return self.arbiter.most_urgent()

    def cancel(self, slot_id: str) -> bool:
        stopped = self.prep.cancel(slot_id, "schedule") or self.arbiter.stop_id(
            slot_id, by="schedule")
        return bool(stopped)

    def on_clock_jump(self) -> None:
        """The wall clock was stepped (the scheduler noticed): re-arm the ``at`` waits, the
        amplifier warm-ups and the pre-roll from the new wall clock, and start at once what
        the step made due. Never raises."""
        try:
            log.info("audio: wall clock stepped; re-arming at waits")
            self.preroll.again()  # pre-rolled for an instant that moved: do it again
            self.arbiter.on_clock_jump()
        except Exception:
            log.exception("audio: re-arming after a clock step failed")

    # --- from preparation to the arbiter ------------------------------------------------

    def _submit(self, meta: Meta) -> None:
        """A prepared item's turn (the preparation's ``on_ready``): to the arbiter."""
        item, meta.ready = meta.ready, None
        assert item is not None
        meta.volume = item.volume if item.volume is not None else self.arbiter.volume
        if meta.relay is not None:
            self.air.add(LIVE_PREFIX + item.id, meta.relay)
        elif item.at_ms is not None:
            first = order_variants(item.variants, self.arbiter.languages)[0]
            self.preroll.add(item.id, item.at_ms, first.source)
        meta.submitted = True
        self.journal.submitted(item)
        try:
            self.arbiter.submit(item)
        except ValueError as e:
            self._not_aired(meta, "bad_args", str(e))

    def _not_aired(self, meta: Meta, reason: str, message: str) -> None:
        log.warning("%s %s not aired: %s (%s)", meta.origin, meta.id, reason, message)
        if self.prep.items.get(meta.id) is meta:
            self._forget(meta.id)
        if meta.origin != "command":
            self.records.not_aired(meta, reason, message)
        self._report(meta.id, meta, "failed", reason, {"message": message})

    def _stopped_preparing(self, meta: Meta, by: str) -> None:
        self._report(meta.id, meta, "stopped", None, {"by": by})

    def _forget(self, item_id: str) -> None:
        self.journal.ended(item_id)
        self.prep.forget(item_id)
        self.air.discard(LIVE_PREFIX + item_id)
        self.preroll.discard(item_id)

    # --- arbiter and output callbacks ---------------------------------------------------

    def _on_ack(self, item_id: str, stage: str, reason: str | None = None,
                detail: dict | None = None) -> None:
        meta = self.prep.items.get(item_id)
        if stage == "started":
            self.faults.output_failed(None)
            self.preroll.started(item_id)
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
        if meta is not None:
            self.journal.follow(meta, stage)
        if meta is not None and final and meta.segments:
            self.records.aired(meta, stage if stage in FINAL else "preempted")
        self._report(item_id, meta, stage, reason, detail)
        if meta is not None and final:
            self._forget(item_id)
        self.core.mark_state_dirty()

    def _on_play(self, record: dict) -> None:
        """A segment closed (one play record per item, at its final stage)."""
        self.records.segment(self.prep.items.get(record["id"]), record)

    def _report(self, item_id: str, meta: Meta | None, stage: str, reason: str | None,
                detail: dict | None) -> None:
        """A stage of an item: its command's ack, or the scheduler's ``on_result``."""
        if meta is None or meta.origin == "command":
            self.core.ack(item_id, stage, reason, detail)
        elif meta.on_result is not None:
            try:
                meta.on_result(meta.id, stage, reason)
            except Exception:
                log.exception("on_result for %s failed", meta.id)

    def _on_air_event(self, kind: str, detail: dict) -> None:
        """An event of the output the arbiter drives (on the core thread)."""
        if kind == "switched":  # a live item changed source
            self.core.mark_state_dirty()
        elif kind != "started":
            self.arbiter.on_output_event(kind, detail)

    # --- after every change: the one timer ----------------------------------------------

    def _follow_up(self) -> None:
        """The arbiter's and the preparation's ``on_change`` (never called by hand): hand
        over what the hold lets go, pre-roll, re-arm the one timer, publish the state."""
        if self._following or self._closed:
            return  # a change this follow-up makes itself: the rest of it comes after
        self._following = True
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.prep.release()
            self.preroll.run(self.arbiter.busy)
            times = [t for t in (self.arbiter.next_deadline(),
                                 self.preroll.due(self.arbiter.busy),
                                 self.prep.hold_deadline()) if t is not None]
            if times:
                self._timer = self.core.call_later(min(times) - self.clock.monotonic(),
                                                   self._tick)
            self.core.mark_state_dirty()
        finally:
            self._following = False

    def _tick(self) -> None:
        self._timer = None
        self.arbiter.tick()

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
        preparing = [{"id": m.id, "preparing": True} for m in self.prep.preparing()]
        return snap["queue"] + [{"id": t["id"], "at": t["at"]} for t in snap["timed"]] + preparing

    def close(self) -> None:
        """Shutdown: stop what airs (recorded as stopped), then release in reverse order."""
        self._closed = True  # no more follow-ups: nothing held is handed over now
        try:
            self.arbiter.stop_all(by="shutdown")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            own_gpio = self.gpio if self._own_gpio else None
            for part in (self.output, self.meter, self.amp, self.cache, own_gpio):
                try:
                    if part is not None:
                        part.close()
                except Exception:
                    log.exception("closing %r failed", part)


def _nfc(text: str | None) -> str | None:
    """A board text as shown and recorded (Unicode NFC); None for none."""
    return unicodedata.normalize("NFC", text) if text else None


def install(core: Core, cfg: dict, *, board: Board | None = None,
            gpio: Any = None, cache: MediaCache | None = None) -> AudioService:
    """Make and start the audio service. ``board``: the board service, installed before this
    one (None: no board, item texts are not shown). ``gpio``: the agent's GPIO backend
    (None: opened from ``cfg`` and closed with the service). ``cache``: the agent's media
    cache, shared with the board's page images (None: opened from ``cfg``); the audio service
    closes it when it stops."""
    svc = AudioService(core, cfg, board=board, gpio=gpio, cache=cache)
    svc.start()
    return svc
