"""The LED board or screen as a service of the core: content, output, supervision, proof.

Wires the building blocks together (SPEC §9, docs/BOARD.md):

- :class:`agent.board.content.BoardContent` decides what shows: ``desired/board`` documents
  (persisted per topic, :mod:`agent.board.docstore`, restored at boot before any broker is
  reachable) and ad-hoc ``board`` commands. Its stages become acks, its records events.
- :class:`agent.board.render.TextRender` draws pixel boards; frames are pushed when the scroll
  moves (from the core's clock, at most ``FPS`` a second, fewer for the ``image`` driver, and
  only when the frame changed). Text boards (the serial sign) get ``show_text`` once per
  message; page boards (HDMI screens, :mod:`agent.board.screen`) a page per showing, with
  its images (:mod:`agent.board.images`) and the proof read back from the screen.
- The driver runs on a thread of its own (:class:`DriverThread`): a serial write may block for
  seconds and must not stall the core. At most one driver call is in flight; newer output
  replaces output not yet sent. A failure raises the ``board_link`` alert and retries every
  ``board.reconnect_interval_s`` (at least 1 s) until the board answers, which clears it.

The service is installed even with ``board.driver: none``: commands and documents are then
accepted, tracked and recorded (events carry ``"driver": "none"``), so a group-wide board
message or document does not make every speaker-only cabinet reject it at each reconnect.

Other services are handed it (``agent.app.install_services``) and call :meth:`~BoardService.
stop_id`, :meth:`~BoardService.stop_all` and :meth:`~BoardService.show_audio_text` (core thread).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from PIL import Image

from agent import protocol
from agent.audio.hosts import MediaError
from agent.audio.media import MediaCache
from agent.board.content import (
    DEFAULT_DURATION_S,
    BoardContent,
    CommandStage,
    Shown,
    ShowRecord,
    validate_command_args,
    validate_document_args,
)
from agent.board.docstore import BoardDocStore
from agent.board.driverthread import DriverThread
from agent.board.images import BoardImages
from agent.board.render import (
    RenderConfig,
    TextRender,
    brightness_at,
    parse_brightness_schedule,
    render_or_fallback,
)
from agent.board.screen import PageScreen, open_screen
from agent.core.inbound import FuncHandler
from agent.core.loop import Core
from agent.protocol import Envelope, Rejected
from drivers.board.base import BoardDriver

log = logging.getLogger(__name__)

FPS = 20.0  # frame-rate cap for LED matrices
IMAGE_FPS = 4.0  # the image driver writes a PNG (fsync) per frame: spare the SD card
MINUTE_S = 60.0
MIN_RETRY_S = 1.0
ALERT = "board_link"

def install(core: Core, cfg: dict, *, cache: MediaCache | None = None) -> BoardService:
    """Open the configured board, restore the stored documents and register everything.
    ``cache``: the agent's media cache, shared with audio (page images come through it)."""
    service = BoardService(core, cfg, cache=cache)
    service.start()
    return service


class _DocHandler:
    def __init__(self, service: BoardService) -> None:
        self._service = service

    def apply(self, target: str, env: Envelope, raw: bytes) -> tuple[str, str | None]:
        return self._service.apply_document(target, env, raw)


class BoardService:
    """See the module docstring. Every method runs on the core thread."""

    def __init__(self, core: Core, cfg: dict, driver: BoardDriver | None = None, *,
                 cache: MediaCache | None = None) -> None:
        self.core = core
        self.clock = core.clock
        self.options: dict = cfg["board"]
        self.driver_name: str = self.options["driver"]
        self.render_cfg = RenderConfig.from_options(self.options)
        self._tz = ZoneInfo(cfg["device"]["timezone"])
        self.content = BoardContent(core.clock, cfg["device"]["timezone"], core.trust.trusted,
                                    has_image=self._image_ready)
        self._cache = cache
        self.images: BoardImages | None = None  # a page board's images (when it opens)
        self._awaiting: set[str] = set()  # commands whose image is being fetched
        self.screen: PageScreen | None = None
        self.store = BoardDocStore(cfg["paths"]["state_dir"])
        groups = set(cfg["device"]["groups"]) | {"all"}
        self._topics = {f"dev/{core.device}"} | {f"grp/{g}" for g in groups}
        self._points, problems = parse_brightness_schedule(self.options["brightness_schedule"])
        for problem in problems:
            log.warning("board.brightness_schedule.%s", problem)
        self.brightness: int | None = None
        self.io = DriverThread(core.post)
        self.driver: BoardDriver | None = driver
        self.link: bool | None = None  # None: no board fitted (driver none)
        self._busy = False
        self._pending: dict[str, tuple] = {}
        self._render: TextRender | None = None
        self._shown_mono = 0.0
        self._last_frame: bytes | None = None
        self._timers: dict[str, Any] = {}
        self._silent: OrderedDict[str, None] = OrderedDict()  # audio emergencies: no acks
        self._show_extra: dict[str, Any] = {}
        self._error: str | None = None
        self._stopped = False
        self._kept: tuple | None = None  # what the kept ad-hoc messages were last saved as
        fps = IMAGE_FPS if self.driver_name == "image" else FPS
        self._min_frame_s = 1.0 / fps
        self._retry_s = max(MIN_RETRY_S, float(self.options["reconnect_interval_s"]))

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        core = self.core
        if self.driver is None:
            self._open_driver()
        core.register_command("board", FuncHandler(self._execute, validate_command_args))
        core.register_document("board", _DocHandler(self))
        core.add_state("board", self.state)
        core.health_parts.append(lambda: {"board_link": self.link})
        core.stop_hooks.append(self.stop)
        self.restore()
        self._take_back()
        self._minute()
        wall_s = self.clock.now_ms() / 1000.0
        core.call_every(MINUTE_S, self._minute, first_s=MINUTE_S - wall_s % MINUTE_S + 0.05)
        self.update()
        if self.content.current() is None:
            self._show(None)  # blank what the board kept from before (a stale emergency)

    def _open_driver(self) -> None:
        from drivers import resolve

        try:
            self.driver = resolve("board", self.driver_name)(self.options)
        except Exception as exc:  # noqa: BLE001 - a bad board must not stop the agent
            log.error("board driver %s cannot start: %s", self.driver_name, exc)
            self.driver_name = f"{self.driver_name} (unavailable)"
            self._link_failed(f"cannot open the driver: {exc}", retry=False)
            return
        if self.driver_name != "none":
            self.link = True
            if self.driver.kind == "page":  # pages with images from the media cache
                self.screen, self.images = open_screen(self.core, self.driver, self._cache)
            if not self.driver.ok():
                self._link_failed(self.driver.last_error or "not connected")

    def stop(self) -> None:
        """Shutdown: record what was on show; keep the ad-hoc messages for the restart (no
        final ack: they show on after it, until their end)."""
        if self._stopped:
            return
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        now = self.clock.now_ms()
        shown = self.content.current()
        if shown is not None:
            self._emit(ShowRecord(shown.message_id, shown.text, shown.source, shown.priority,
                                  shown.since_ms, now, "shutdown", shown.topic))
        self._keep(force=True)  # the ad-hoc messages show on after the restart
        driver = self.driver
        if driver is not None:
            self.io.submit(driver.close, lambda result: None)
        self.io.stop()
        if self.images is not None:
            self.images.close()

    # --- public API for other services -------------------------------------------------

    def stop_id(self, cmd_id: str) -> bool:
        """Withdraw an ad-hoc message (shown or queued). True when it was there; its sender
        gets the ``stopped`` ack (unless it came from :meth:`show_audio_text`)."""
        if self._stopped:
            return False
        if cmd_id in self._awaiting:  # its image not ready yet: never queued
            self._awaiting.discard(cmd_id)
            self.core.ack(cmd_id, "stopped")
            return True
        removed = self.content.remove(cmd_id)
        if removed:
            self.update()
        return removed

    def stop_all(self) -> list[str]:
        """Withdraw every ad-hoc message; returns their ids. Standing content stays."""
        if self._stopped:
            return []
        ids = sorted(self._awaiting)  # waiting for their images: never queued
        self._awaiting.clear()
        for cmd_id in ids:
            self.core.ack(cmd_id, "stopped")
        ids += self.content.clear_commands()
        if ids:
            self.update()
        return ids

    def show_audio_text(self, cmd_id: str, text: str, priority: str = "emergency",
                        duration_s: float = DEFAULT_DURATION_S) -> bool:
        """Show ``text`` (scrolling) at ``priority`` for ``duration_s`` of display time: the
        board text of an audio item. No acks are sent for ``cmd_id`` (the audio service acks
        its command); ``board`` events carry ``"origin": "audio"``. Call :meth:`stop_id`
        when the audio ends. False (logged) when the text, priority or duration is bad or the
        service has stopped; True when it shows or was already queued."""
        if self._stopped:
            return False
        args = {"text": text, "priority": priority, "duration_s": duration_s,
                "effect": "scroll"}
        errors = validate_command_args(args)
        if errors:
            log.warning("board text for %s refused: %s", cmd_id, "; ".join(errors))
            return False
        if any(item["id"] == cmd_id for item in self.content.snapshot()["queue"]):
            return True
        self._silent[cmd_id] = None
        while len(self._silent) > 256:
            self._silent.popitem(last=False)
        self.content.add_message(cmd_id, args, front=True)  # it belongs to what is on air
        self.update()
        return True

    def state(self) -> dict:
        snap = self.content.snapshot()
        snap.update(driver=self.driver_name, link=self.link, brightness=self.brightness)
        if self._error and self.link is False:
            snap["error"] = self._error
        return snap

    # --- commands and documents --------------------------------------------------------

    def _execute(self, env: Envelope) -> None:
        args = dict(env.args)
        if env.exp is not None and "duration_s" not in args \
                and args.get("priority") == "emergency":  # an emergency stays until its exp
            left = math.ceil((env.exp - self.clock.now_ms()) / 1000)
            args["duration_s"] = min(max(1, left), 86_400)
        if "image" not in args or self.images is None:
            self.content.add_message(env.id, args)
            self.update()
            return
        self._awaiting.add(env.id)
        self.images.prepare(args["image"], lambda sha, error: self._command_image(
            env.id, args, error), lane=env.priority)

    def _command_image(self, cmd_id: str, args: dict, error: MediaError | None) -> None:
        """A command's image is ready, or refused: then the command fails with the reason and
        what was on screen stays. Nothing when it was stopped meanwhile."""
        if self._stopped or cmd_id not in self._awaiting:
            return
        self._awaiting.discard(cmd_id)
        if error is not None:
            self.core.ack(cmd_id, "failed", error.reason, {"error": error.message})
            return
        self.content.add_message(cmd_id, args)
        self.update()

    def _prepare_images(self, topic: str, rev: int, args: dict) -> None:
        """Fetch a document's page images; a page waits for its image, and one refused is
        recorded (``image_refused``) and never shown."""
        if self.images is None:
            return
        for msg in args.get("messages", []):
            if "image" in msg:
                self.images.prepare(msg["image"], lambda sha, error, mid=msg["id"]:
                                    self._document_image(topic, rev, mid, error))

    def _document_image(self, topic: str, rev: int, msg_id: str,
                        error: MediaError | None) -> None:
        if self._stopped:
            return
        if error is not None:
            self.core.emit_event({"type": "board", "topic": topic, "rev": rev, "id": msg_id,
                                  "result": "image_refused", "reason": error.reason,
                                  "detail": error.message})
        self.update()

    def _image_back(self, sha: str, error: MediaError | None) -> None:
        shown = self.content.current()
        if not self._stopped and shown and shown.image and shown.image["sha256"] == sha:
            self._want_page(shown)

    def _image_ready(self, sha: str) -> bool:
        return self.images is None or self.images.ready(sha)

    def apply_document(self, target: str, env: Envelope, raw: bytes) -> tuple[str, str | None]:
        errors = validate_document_args(env.args)
        if errors:
            log.warning("board document on %s refused: %s", target, "; ".join(errors[:5]))
            return "rejected", protocol.BAD_ARGS
        held = self.content.documents().get(target)
        if held is not None and env.rev == held["rev"]:
            return "unchanged", None
        if held is not None and env.rev < held["rev"]:
            return "refused", protocol.STALE_REV
        applied, reason = self.content.apply_document(target, env.rev, env.args)
        if not applied:
            return "refused", reason
        try:
            self.store.save(target, env.rev, raw)
        except OSError as exc:
            log.error("board document %s rev %s applied but not stored: %s", target, env.rev, exc)
        self._prepare_images(target, env.rev, env.args)
        self.update()
        return "applied", None

    def restore(self) -> None:
        """Apply the stored documents, each re-verified, so standing content shows at boot."""
        keys = protocol.load_public_keys(self.core.cfg["security"]["trusted_keys"])
        for topic, (rev, raw) in self.store.load_all().items():
            if topic not in self._topics:
                log.info("board document of %s dropped: not a topic of this device", topic)
                self.store.delete(topic)
                continue
            try:
                env = protocol.parse_envelope(protocol.decode(raw), "board")
                if env.target != topic or env.rev != rev:
                    raise Rejected(protocol.WRONG_TARGET, "stored topic or rev differs")
                protocol.verify(env, keys, self.core.cfg["security"]["require_signed"])
            except Rejected as r:
                log.warning("stored board document %s ignored: %s (%s)", topic, r.reason,
                            r.message)
                continue
            _, reason = self.content.apply_document(topic, env.rev, env.args)
            self._prepare_images(topic, env.rev, env.args)
            log.info("board document %s rev %s restored: %s", topic, rev, reason)

    def _take_back(self) -> None:
        """Ad-hoc messages kept before a restart (a power cut, a crash, a stop) show on until
        their end: the board carries their commands on (their open rows are closed here, so
        the core does not answer them ``interrupted``; they get ``resumed`` or ``started``,
        then ``done``). Those whose end passed meanwhile are dropped: the core answers them
        ``failed``/``interrupted``."""
        try:
            kept = self.core.store.board_messages()
            back = self.content.restore(kept)
            for cmd_id in back:
                self.core.not_interrupted(cmd_id)
            for msg in kept:  # their images, decoded again (drawn again once ready)
                if msg.get("image") and self.images is not None and msg["id"] in back:
                    self.images.prepare(msg["image"], self._image_back)
        except Exception:  # a damaged row must not keep the board from starting
            log.exception("board: ad-hoc messages kept before the restart not restored")
            return
        if kept:
            log.info("board: %d ad-hoc message(s) back after the restart, %d ended meanwhile",
                     len(back), len(kept) - len(back))
        self._keep(force=True)

    def _keep(self, force: bool = False) -> None:
        """Save the ad-hoc messages (agent.db) when one came, went, started, was covered or
        shown again: what a restart takes back (:meth:`_take_back`)."""
        kept = self.content.kept()
        shown = self.content.current()
        mark = (tuple((m["id"], m["started"]) for m in kept), shown.key if shown else None)
        if mark == self._kept and not force:
            return  # a standing rotation, or nothing: no write
        self._kept = mark
        try:
            self.core.store.board_messages_save(kept)
        except Exception:
            log.exception("board: ad-hoc messages not saved (they end at a restart)")

    # --- content -------------------------------------------------------------------------

    def update(self) -> None:
        """Let the content advance; publish its stages and records; show what changed."""
        changes = self.content.update()
        for record in changes.records:
            self._emit(record)
        for stage in changes.stages:
            self._ack(stage)
        if changes.changed:
            self._show(changes.shown)
        if changes.changed or changes.stages:
            self.core.mark_state_dirty()
            self._keep()
        self._set_timer("content", max(0.01, self.content.next_deadline_s()), self.update)

    def _ack(self, stage: CommandStage) -> None:
        if stage.cmd_id not in self._silent:
            self.core.ack(stage.cmd_id, stage.stage)

    def _emit(self, record: ShowRecord) -> None:
        event = record.to_event()
        event["driver"] = self.driver_name
        if record.message_id in self._silent and record.source == "command":
            event["origin"] = "audio"
        event.update(self._show_extra)
        self.core.emit_event(event)

    def _show(self, shown: Shown | None) -> None:
        self._show_extra = {"link_lost": True} if self.link is False else {}
        self._cancel("frame")
        if self.driver is None or self.driver_name == "none":
            return
        if self.driver.kind == "text":
            self._want_text(shown)
            return
        if self.driver.kind == "page":
            self._want_page(shown)
            return
        self._render = render_or_fallback(shown.text, self.render_cfg, shown.effect) \
            if shown is not None else None
        self._shown_mono = self.clock.monotonic()
        self._frame_tick()

    # --- output --------------------------------------------------------------------------

    def _frame_tick(self, force: bool = False) -> None:
        self._timers.pop("frame", None)
        if self.driver.kind == "page":  # a page stands: drawn again only when asked
            self._want_page(self.content.current())
            return
        render = self._render
        elapsed = self.clock.monotonic() - self._shown_mono
        if render is None:
            frame = Image.new("1", (self.render_cfg.width, self.render_cfg.height), 0)
        else:
            frame = render.frame_at(elapsed)
        self._want_frame(frame, force)
        if render is not None and render.scrolling and self.link is not False:
            step = (render.next_change_s(elapsed) or elapsed) - elapsed
            self._set_timer("frame", max(step, self._min_frame_s), self._frame_tick)

    def _want_frame(self, frame: Image.Image, force: bool) -> None:
        data = frame.tobytes()
        if data == self._last_frame and not force:
            return
        self._last_frame = data
        self._pending["output"] = ("frame", frame, self._current_key())
        self._kick()

    def _want_page(self, shown: Shown | None) -> None:
        if self.screen is not None:
            self._pending["output"] = ("page", self.screen.job(shown), self._current_key())
            self._kick()

    def _want_text(self, shown: Shown | None) -> None:
        text = shown.text if shown is not None else ""
        self._pending["output"] = ("text", text, self._text_effect(shown), self._current_key())
        self._kick()

    def _text_effect(self, shown: Shown | None) -> str:
        if shown is None or shown.effect == "static":
            return "static"
        if shown.effect == "scroll":
            return "scroll"
        columns = int(self.options.get("sign_columns") or 0)
        return "static" if columns and len(shown.text) <= columns else "scroll"

    def _current_key(self) -> tuple | None:
        shown = self.content.current()
        return shown.key if shown is not None else None

    def _kick(self) -> None:
        """Send the next pending call to the driver thread unless one is in flight."""
        if self._busy or not self._pending or self.driver is None:
            return
        name = "brightness" if "brightness" in self._pending else "output"
        op = self._pending.pop(name)
        self._busy = True
        self.io.submit(self._driver_call(op), lambda result: self._done(op, result))

    def _driver_call(self, op: tuple) -> Callable[[], bool]:
        driver = self.driver

        def call() -> bool:
            if op[0] == "brightness":
                driver.set_brightness(op[1])
            elif op[0] == "frame":
                driver.show(op[1])
            elif op[0] == "page":
                proof = op[1]()
                return proof if driver.ok() else False
            else:
                driver.show_text(op[1], op[2])
            return driver.ok()

        return call

    def _done(self, op: tuple, result: Any) -> None:
        self._busy = False
        if isinstance(result, BaseException) or result is False:
            error = str(result) if isinstance(result, BaseException) else "driver reports no link"
            self._link_failed(error or type(result).__name__)
        else:
            if op[0] == "text" and op[-1] == self._current_key():
                self._note_sign_text()
            if op[0] == "page" and op[-1] == self._current_key():  # proof: the first drawing
                proof = self._show_extra.setdefault("screen", result.to_dict())
                proof["matches"] = proof["matches"] and result.matches  # and every one since
            self._link_restored()
        self._kick()

    def _note_sign_text(self) -> None:
        if self.driver.transliterated:
            self._show_extra["sign_text"] = self.driver.last_sent
        else:
            self._show_extra.pop("sign_text", None)

    # --- link supervision ----------------------------------------------------------------

    def _link_failed(self, error: str, retry: bool = True) -> None:
        self._last_frame = None
        self._error = error
        self._show_extra["link_lost"] = True
        self._pending.pop("output", None)
        self._cancel("frame")
        if self.link is not False:
            log.warning("board link lost (%s): %s", self.driver_name, error)
            self.link = False
            self.core.set_alert(ALERT, True, {"driver": self.driver_name, "error": error})
            self.core.mark_state_dirty()
        if retry and "retry" not in self._timers:
            self._set_timer("retry", self._retry_s, self._retry)

    def _link_restored(self) -> None:
        if self.link is not False:
            return
        log.info("board link back (%s)", self.driver_name)
        self.link = True
        self._error = None
        self.core.set_alert(ALERT, False)
        self.core.mark_state_dirty()
        self._cancel("retry")
        if self.driver.kind == "pixel":
            self._frame_tick()

    def _retry(self) -> None:
        """Show the current content again: the driver reconnects on the way."""
        self._timers.pop("retry", None)
        if self.driver.kind == "text":
            self._want_text(self.content.current())
        else:
            self._frame_tick(force=True)
        if self.brightness is not None:
            self._pending["brightness"] = ("brightness", self.brightness)
            self._kick()

    # --- every minute ------------------------------------------------------------------------

    def _minute(self) -> None:
        """Brightness by time of day; a pixel board gets its frame again (a glitched module
        recovers, a dead link is noticed even while a static message stands)."""
        local = datetime.fromtimestamp(self.clock.now_ms() / 1000.0, self._tz).time()
        level = brightness_at(self._points, local, int(self.options["brightness"]))
        if level != self.brightness:
            self.brightness = level
            self._pending["brightness"] = ("brightness", level)
            self._kick()
            self.core.mark_state_dirty()
        live = self.driver is not None and self.driver_name != "none" and self.link
        if live and self.driver.kind != "text" and "frame" not in self._timers:
            self._frame_tick(force=True)

    # --- timers --------------------------------------------------------------------------

    def _set_timer(self, name: str, delay_s: float, fn: Callable[[], None]) -> None:
        self._cancel(name)
        self._timers[name] = self.core.call_later(delay_s, fn)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
