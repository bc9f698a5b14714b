"""The offline scheduler in the running agent (SPEC §8, docs/SCHEDULE.md).

Wires the thread-free model (:mod:`agent.schedule.model`, :mod:`agent.schedule.store`) into the
core: ``desired/schedule`` documents per topic, their persistence and re-verification at boot,
one timer computed from the monotonic clock for the next slot, clock-jump detection, the
audio service for airing and prefetch, alerts (``media_unavailable``) and the ``schedule``
part of ``state``. Everything runs on the core thread.

Timing. One core timer is armed for the earliest of: the next slot (``due``), the moment to
hand the next slot to the audio service ahead of time (``due - lead``, when the audio service
takes ``at_ms``: the arbiter then warms the amplifier and starts the item exactly at its time)
and a watch tick every :data:`WATCH_S` seconds. Every firing compares how far the wall clock
moved with how far the monotonic clock moved: a difference above :data:`JUMP_MS` is a clock
step, handed to :meth:`SchedulePlanner.on_clock_jump` before the slots are re-planned; then
(slots the step made too late withdrawn) the audio service's ``on_clock_jump`` re-arms the
``at`` waits of the slots handed over ahead from the new wall clock.

Accounting. A slot is decided once (the slot log, saved before it airs): aired, or skipped
when missed beyond its catch-up. A skipped slot gives a ``play`` event with
``result: "skipped"``; an aired one gives the audio service's ``play`` record, whose ``id`` is
the slot id (:func:`slot_id`: topic, item id, local date and time). Both kinds carry
:func:`slot_fields` (``item``, ``topic``, ``slot``, ``due``), passed to the audio service as
``submit_scheduled(..., extra=...)``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from agent import protocol
from agent.core.loop import Core
from agent.protocol import Envelope, Rejected
from agent.schedule.model import ScheduleBook, SchedulePlanner, Slot, validate_schedule_args
from agent.schedule.store import AIRED, ScheduleStore, SlotLog

log = logging.getLogger(__name__)

JUMP_MS = 2000  # wall minus monotonic change above this on one tick: the clock was stepped
WATCH_S = 5.0  # longest sleep: clock jumps and a newly trusted clock are seen within this
PREFETCH_EVERY_S = 600.0  # prefetch pass and media check, besides each document arrival
PREP_LEAD_S = 10.0  # hand a slot to the audio service this long (+ amp warm-up) before it
MAX_SKIP_EVENTS = 100  # per decision; beyond, one summary event
FINAL_STAGES = ("done", "stopped", "failed", "expired")
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def slot_id(slot: Slot) -> str:
    """The id a slot airs under (play records, ``state.queue``, ``stop {"id"}``).

    ``grp/krongpa:news@2026-11-26T05:00`` becomes ``grp.krongpa:news:2026-11-26T05:00``, which
    is a valid command id (1–64 of ``[A-Za-z0-9._:-]``); a longer one keeps its local date and
    time after a hash of the key: ``s.<20 hex>:2026-11-26T05:00``.
    """
    sid = slot.key.replace("/", ".", 1).replace("@", ":")
    if len(sid) <= 64 and set(sid) <= _ID_CHARS:
        return sid
    when = slot.key.rsplit("@", 1)[-1]
    return f"s.{hashlib.sha256(slot.key.encode()).hexdigest()[:20]}:{when}"


def slot_fields(slot: Slot) -> dict[str, Any]:
    """What every play record of a slot carries besides its id: the schedule ``item`` id,
    its document's ``topic`` (``grp/krongpa``), the local ``slot`` time
    (``YYYY-MM-DDTHH:MM``, ``device.timezone`` or the item's) and ``due`` (epoch ms)."""
    return {"item": slot.item_id, "topic": slot.topic, "slot": slot.key.rsplit("@", 1)[-1],
            "due": slot.due_ms}


@dataclass
class _Submitted:
    slot: Slot
    ahead: bool  # handed over before its time with at_ms; the slot log is not marked yet
    started: bool = False


class ScheduleService:
    """Documents in, slots out. Construct, then :meth:`start` (``install`` does both)."""

    def __init__(self, core: Core, cfg: dict, *, audio: Any) -> None:
        sc = cfg["schedule"]
        self.core = core
        self.clock = core.clock
        self.audio = audio  # the audio service: submit_scheduled, prefetch, have, cancel...
        self.prefetch_days = int(sc["prefetch_days"])
        self.alert_lead_s = int(sc["media_alert_lead_s"])
        state_dir = cfg["paths"]["state_dir"]
        self.book = ScheduleBook(cfg["device"]["timezone"])
        self.store = ScheduleStore(state_dir)
        self.planner = SchedulePlanner(
            self.book, self.clock, catch_up_default=int(sc["catch_up_default_s"]),
            log=SlotLog.in_state_dir(state_dir, keep_days=int(sc["slot_log_keep_days"])),
            grace_s=int(sc["grace_s"]))
        self.keys = protocol.load_public_keys(cfg["security"]["trusted_keys"])
        self.require_signed = bool(cfg["security"]["require_signed"])
        groups = dict.fromkeys([*cfg["device"]["groups"], "all"])
        self.targets = {f"dev/{cfg['device']['id']}"} | {f"grp/{g}" for g in groups}
        self.lead_ms = int((float(cfg["amplifier"]["warm_up_s"]) + PREP_LEAD_S) * 1000)
        self.canonical: dict[str, bytes] = {}  # topic -> canonical applied envelope
        self.submitted: dict[str, _Submitted] = {}  # slot id -> handed to the audio service
        self.held = True
        self.jumps = 0
        self._timer: Any = None
        self._ref: tuple[int, float] | None = None  # (wall ms, monotonic s) at the last tick
        self._media_alerts: set[str] = set()
        self._prefetching: set[str] = set()

    # --- start-up ---------------------------------------------------------------------

    def start(self) -> None:
        self.restore()
        self.core.register_document("schedule", self)
        self.core.add_state("schedule", self.state)
        self.core.stop_hooks.append(self.stop)
        self.core.call_every(PREFETCH_EVERY_S, self.prefetch, first_s=1.0)
        self._arm(0.0)

    def restore(self) -> None:
        """Apply the persisted documents, each re-verified like a message from the broker."""
        for topic, (rev, envelope) in self.store.load_all().items():
            try:
                env = self._verify_stored(topic, envelope)
            except Rejected as r:
                log.warning("schedule: stored document of %s (rev %s) not used: %s (%s)",
                            topic, rev, r.reason, r.message)
                self.core.emit_event({"type": "schedule", "topic": _doc_topic(topic),
                                      "rev": rev, "result": "rejected", "reason": r.reason,
                                      "stored": True})
                continue
            applied, reason = self.book.apply(topic, env.rev, env.args, kid=env.kid)
            if applied:
                self.canonical[topic] = protocol.canonical(env.raw)
                log.info("schedule: restored %s rev %s (%d items)", topic, env.rev,
                         len(self.book.document(topic).items))
            else:
                log.warning("schedule: stored document of %s not used: %s", topic, reason)

    def _verify_stored(self, topic: str, envelope: bytes) -> Envelope:
        if topic not in self.targets:
            raise Rejected(protocol.WRONG_TARGET, "not a topic this device listens to (groups "
                           "changed?)")
        env = protocol.parse_envelope(protocol.decode(envelope), "schedule")
        if env.target != topic:
            raise Rejected(protocol.WRONG_TARGET, f"target {env.target!r} in {topic!r}")
        protocol.verify(env, self.keys, self.require_signed)
        return env

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.planner.log.save()

    # --- documents (DocumentHandler) --------------------------------------------------

    def apply(self, target: str, env: Envelope, raw: bytes) -> tuple[str, str | None]:
        """A verified ``desired/schedule`` document for ``target`` (``dev/ID``, ``grp/G``)."""
        canonical = protocol.canonical(env.raw)
        current = self.book.document(target)
        if current is not None and env.rev <= current.rev:
            if env.rev == current.rev and canonical == self.canonical.get(target):
                return "unchanged", None  # the broker's retained copy at a reconnect
            log.info("schedule: %s rev %s refused (have rev %s)", target, env.rev, current.rev)
            return "refused", protocol.STALE_REV
        errors = validate_schedule_args(env.args)
        if errors:
            log.warning("schedule: %s rev %s rejected: %s", target, env.rev, "; ".join(errors))
            return "rejected", protocol.BAD_ARGS
        applied, reason = self.book.apply(target, env.rev, env.args,
                                          received_ms=self.clock.now_ms(), kid=env.kid)
        if not applied:
            return "rejected", reason.split(":")[0]
        self.canonical[target] = canonical
        persisted = self._persist(target, env.rev, raw)
        log.info("schedule: %s rev %s %s", target, env.rev, reason)
        self._changed(target)
        if not persisted:
            return "applied", "not_persisted"
        return "applied", "cleared" if reason == "cleared" else None

    def _persist(self, topic: str, rev: int, raw: bytes) -> bool:
        try:
            self.store.save(topic, rev, raw)
            return True
        except OSError as e:
            log.error("schedule: cannot store %s rev %s (airs until restart): %s", topic, rev, e)
            return False

    def _changed(self, topic: str) -> None:
        """A topic's document was replaced: withdraw what was handed over ahead for it (the
        next tick hands over again what is still scheduled), then re-plan and prefetch."""
        for sid, sub in list(self.submitted.items()):
            if sub.ahead and not sub.started and sub.slot.topic == topic:
                del self.submitted[sid]
                self.audio.cancel(sid)
        self._tick()
        self.prefetch()

    # --- the timer ----------------------------------------------------------------------

    def _arm(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.core.call_later(max(0.0, delay_s), self._tick)

    def _tick(self) -> None:
        """Decide what is due, hand it to the audio service, re-arm. Never raises."""
        self._timer = None
        try:
            now = self.clock.now_ms()
            jumped = self._detect_jump(now, self.clock.monotonic())
            self._decide(now)  # first: slots the step made too late are withdrawn
            if not self.held:
                self._hand_over_ahead(now)
            if jumped:
                self._audio_clock_jump()
        finally:
            self._arm(self._next_delay_s(self.clock.now_ms()))

    def _detect_jump(self, now: int, mono: float) -> bool:
        ref, self._ref = self._ref, (now, mono)
        if ref is None:
            return False
        expected = ref[0] + round((mono - ref[1]) * 1000)
        if abs(now - expected) <= JUMP_MS:
            return False
        log.warning("schedule: wall clock stepped by %+d ms; re-planning", now - expected)
        self.jumps += 1
        self.planner.on_clock_jump(expected, now)
        self.core.mark_state_dirty()
        return True

    def _audio_clock_jump(self) -> None:
        """Slots handed over ahead wait in the audio service for a wall-clock instant: have
        it re-arm them from the stepped clock."""
        try:
            self.audio.on_clock_jump()
        except Exception:
            log.exception("schedule: the audio service failed to follow the clock step")

    def _decide(self, now: int) -> None:
        result = self.planner.due(now, trusted=self.core.trust.trusted())
        if result.held != self.held:
            log.info("schedule: %s", "held (clock not trusted)" if result.held else "running")
            self.held = result.held
            self.core.mark_state_dirty()
        self._report_skipped(result.skipped)
        for slot in result.due:
            self._air(slot)
        if result.due or result.skipped:
            self.core.mark_state_dirty()
            self.check_media()

    def _next_delay_s(self, now: int) -> float:
        """Until the next slot, the next hand-over ahead, or the watch tick."""
        wake = now + WATCH_S * 1000
        lead = self.lead_ms
        if not self.held:
            for slot in itertools.islice(self.planner.upcoming(now), 50):
                if slot.due_ms - lead >= wake:
                    break
                wake = min(wake, slot.due_ms)
                if lead and slot_id(slot) not in self.submitted:
                    wake = min(wake, max(now, slot.due_ms - lead))
        return (wake - now) / 1000 + 0.001  # a hair late: due() must see the slot as due

    # --- airing -------------------------------------------------------------------------

    def _air(self, slot: Slot) -> None:
        sid = slot_id(slot)
        sub = self.submitted.get(sid)
        if sub is not None:
            sub.ahead = False  # the planner has now logged it; the arbiter starts it at due
            return
        self._submit(slot, sid, at_ms=None)

    def _hand_over_ahead(self, now: int) -> None:
        """Slots due within the lead go to the audio service now, to start at their time."""
        for slot in self.planner.upcoming(now):
            if slot.due_ms > now + self.lead_ms:
                break
            sid = slot_id(slot)
            if sid not in self.submitted:
                self._submit(slot, sid, at_ms=slot.due_ms)

    def _submit(self, slot: Slot, sid: str, at_ms: int | None) -> None:
        item = slot.item
        self.submitted[sid] = _Submitted(slot, ahead=at_ms is not None)
        log.info("schedule: %s %s", "handing over" if at_ms else "airing", sid)
        self.audio.submit_scheduled(
            sid, item.kind, item.action, priority=item.priority, volume=item.volume,
            duration_s=item.duration_s, repeat=item.repeat,
            exp_ms=slot.due_ms + self.planner.allowance_ms(item) + _patience_ms(item),
            on_result=self._on_result, at_ms=at_ms, extra=slot_fields(slot),
            board_text=item.board_text)

    def _on_result(self, sid: str, stage: str, reason: str | None) -> None:
        """Progress of a submitted slot (audio service, core thread)."""
        sub = self.submitted.get(sid)
        if sub is None:
            return
        if stage == "started":
            sub.started = True
        if stage == "started" or stage in FINAL_STAGES:
            self._settle(sub)
        if stage in ("expired", "stopped") and not sub.started:
            self._emit_skipped(sub.slot, stage)  # the audio service has no record of it
        if stage in FINAL_STAGES:
            self.submitted.pop(sid, None)
            self.core.mark_state_dirty()

    def _settle(self, sub: _Submitted) -> None:
        """A slot handed over ahead started (or ended without starting): it is decided."""
        if sub.ahead and sub.slot.key not in self.planner.log:
            self.planner.log.mark(sub.slot.key, sub.slot.due_ms, AIRED)
            self.planner.log.save()
        sub.ahead = False

    # --- skipped slots -------------------------------------------------------------------

    def _report_skipped(self, slots: list[Slot]) -> None:
        for slot in slots:
            sid = slot_id(slot)
            sub = self.submitted.pop(sid, None)
            if sub is not None and self.audio is not None:
                self.audio.cancel(sid)  # handed over ahead, then the clock jumped past it
        for slot in slots[:MAX_SKIP_EVENTS]:
            self._emit_skipped(slot, "missed")
        rest = slots[MAX_SKIP_EVENTS:]
        if rest:
            self.core.emit_event({"type": "schedule", "result": "slots_skipped",
                                  "reason": "missed", "count": len(rest),
                                  "first": rest[0].due_ms, "last": rest[-1].due_ms})
        if slots:
            log.warning("schedule: %d slot(s) missed beyond their catch-up: skipped", len(slots))

    def _emit_skipped(self, slot: Slot, reason: str) -> None:
        self.core.emit_event({
            "type": "play", "origin": "schedule", "id": slot_id(slot), **slot_fields(slot),
            "kind": slot.item.kind, "priority": slot.priority, "result": "skipped",
            "reason": reason, "played_ms": 0})

    # --- prefetch and media alerts ---------------------------------------------------------

    def _needed(self, now: int) -> set[tuple[str, str]]:
        if self.held:  # the date is unknown: everything any item may need
            return {ref for _, item in self.book.items() for ref in item.media_refs()}
        return self.planner.media_needed(now, self.prefetch_days)

    def prefetch(self) -> None:
        """Pin and fetch the media of the next ``prefetch_days``; then check for misses."""
        if self.audio is None:
            return
        needed = self._needed(self.clock.now_ms())
        self.audio.set_pinned({sha for _, sha in needed})
        for url, sha in sorted(needed):
            if sha in self._prefetching or self.audio.have(sha):
                continue
            self._prefetching.add(sha)
            self.audio.prefetch(url, sha, then=self._prefetched)
        self.check_media()

    def _prefetched(self, sha: str, result: Any) -> None:
        self._prefetching.discard(sha)
        if isinstance(result, BaseException):
            log.warning("schedule: prefetch of %s failed: %s", sha[:12], result)
        self.check_media()

    def check_media(self) -> None:
        """Raise ``media_unavailable`` (key: the item) for an item with a slot within
        ``media_alert_lead_s`` whose media is not cached; clear the others."""
        if self.audio is None or self.held:
            return
        have = {sha for _, item in self.book.items() for _, sha in item.media_refs()
                if self.audio.have(sha)}
        alerts = self.planner.missing_media_alerts(self.clock.now_ms(), have, self.alert_lead_s)
        active = set()
        for a in alerts:
            active.add(a.source)
            self.core.set_alert("media_unavailable", True, {
                "item": a.source, "due": a.due_ms,
                "missing": [{"url": url, "sha256": sha} for url, sha in a.missing]},
                key=a.source)
        for source in self._media_alerts - active:
            self.core.set_alert("media_unavailable", False, key=source)
        self._media_alerts = active

    # --- state -------------------------------------------------------------------------

    def state(self) -> dict:
        snap = self.planner.snapshot(self.clock.now_ms())
        snap["held"] = self.held
        return snap


def _patience_ms(item: Any) -> int:
    """How long a due slot may wait in the queue behind higher-priority audio: an hour, or its
    own length when longer (a live relay of several hours)."""
    return max(3_600_000, (item.duration_s or 0) * 1000)


def _doc_topic(target: str) -> str:
    return f"{target}/desired/schedule"


def install(core: Core, cfg: dict, *, audio: Any) -> ScheduleService:
    svc = ScheduleService(core, cfg, audio=audio)
    svc.start()
    return svc
