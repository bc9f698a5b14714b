"""``ttcs-ctl relay``: the controller-side watcher of the fleet (SPEC §10, docs/CTL.md).

It subscribes to every device's ``status``, ``state``, ``health`` and ``event`` topics and keeps
what it learns in its store (SQLite, or PostgreSQL: :mod:`ctl.store`), written in batches by a
writer thread (:mod:`ctl.ingest`):

- events deduplicated by (device, ``seq``), with gaps in ``seq`` noticed (and marked filled
  when the missing events arrive late);
- the latest health sample of each device and 5-minute aggregates of its numbers (pruned
  after ``relay.health_keep_days``; event bodies emptied after ``relay.events_keep_days``),
  and each device's heartbeat interval, learned from the gap
  between consecutive live samples;
- online/offline transitions (for uptime): offline on the device's will or clean shutdown, or
  after ``relay.missed_beats`` heartbeats without a word from it;
- notices (offline, recovered, alert raised/cleared), gathered into batches and handed to
  :mod:`ctl.notify` for delivery: a new group (a device's link, or one of its alerts) goes out
  after ``relay.group_wait_s``, later changes to it at most every ``relay.group_interval_s``.

:class:`Relay` is pure logic over a :class:`RelayStore`: every call takes ``now_ms`` so tests
drive time. :func:`run` wires it to MQTT. Nothing a device sends can crash it: a payload that
is not a JSON object of the expected shape is counted and dropped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ctl import ingest, notify, subs
from ctl.config import GROUP_INTERVAL_S, GROUP_WAIT_S, grouping
from ctl.gaps import GapFiller
from ctl.gaps import from_config as gaps_from_config
from ctl.relaylink import RelayLink
from ctl.sanitize import (
    CODE_MAX,
    KEY_MAX,
    REASON_MAX,
    TYPE_RE,
    as_int,
    bounded,
    clean,
    device_id,
    device_time,
    parse_object,
    quote,
)
from ctl.stopsignal import StopSignals
from ctl.store import TS_FLAG, RelayStore, open_store

log = logging.getLogger(__name__)

LEAVES = ("status", "state", "health", "event")
# what a message the relay does not understand raises (counted in ``dropped``)
HANDLER_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError)
Row = Any  # a row of the store (sqlite3.Row or a dict), read by column name
MAX_INTERVAL_MS = 86_400_000
LAG_FRESH_MS = 10_000  # a lag measured longer ago than this: the relay has caught up
STALL_S = 5.0  # a tick's wait longer than tick_s by this: the process was stopped or starved
MIN_INTERVAL_MS = 1_000

# --- the logic ---------------------------------------------------------------------------

@dataclass
class RelaySettings:
    heartbeat_default_s: float = 60.0
    missed_beats: int = 3
    group_wait_s: float = GROUP_WAIT_S  # a new group's first notice waits this long
    group_interval_s: float = GROUP_INTERVAL_S  # later changes to a group: at most this often
    alert_codes: list[str] = field(default_factory=list)  # empty: all
    channels: list[str] = field(default_factory=list)
    health_keep_days: int = 31
    events_keep_days: int = 90  # event bodies received longer ago are emptied
    ts_past_days: float = 400.0  # device times older than this (or further ahead than
    ts_future_s: float = 3600.0  # ts_future_s) are replaced by the relay's receive time

    @classmethod
    def from_config(cls, cfg: dict, channels: list[str]) -> RelaySettings:
        r = cfg["relay"]
        wait, interval, _ = grouping(r)
        return cls(heartbeat_default_s=float(r["heartbeat_default_s"]),
                   missed_beats=int(r["missed_beats"]), group_wait_s=wait,
                   group_interval_s=interval,
                   alert_codes=list(cfg["alerts"]["codes"]), channels=channels,
                   health_keep_days=int(r["health_keep_days"]),
                   events_keep_days=int(r["events_keep_days"]),
                   ts_past_days=float(r["ts_past_days"]), ts_future_s=float(r["ts_future_s"]))


@dataclass
class Counters:
    messages: int = 0
    dropped: int = 0
    duplicates: int = 0
    gaps: int = 0
    notices: int = 0
    batches: int = 0
    device_time: int = 0  # device times out of window, replaced by the receive time


class Relay:
    """What the relay does with each message and each tick; ``now_ms`` is always passed in."""

    def __init__(self, store: RelayStore, settings: RelaySettings, prefix: str = "ttcs",
                 gaps: GapFiller | None = None) -> None:
        self.store = store
        self.settings = settings
        self.prefix = prefix
        self.gaps = gaps  # resend of missing seqs (ctl/gaps.py)
        self.counters = Counters()
        self.watch_since_ms = 0  # the relay could not hear anything before this (see connected)
        self.last_prune_ms = 0
        self._raw = ""  # the payload of the message being handled
        self.lag_ms = 0  # how far behind the devices the last batch was (see _measure_lag)
        self.lag_at_ms = 0

    # --- input ---------------------------------------------------------------------------

    def connected(self, now_ms: int) -> None:
        """The link to the broker is (back) up: silence before now is not the devices' fault."""
        self.not_reading(now_ms)
        if self.gaps is not None:  # what was lost while away shows no gap yet: ask
            self.gaps.probe_all(now_ms)

    def not_reading(self, now_ms: int) -> None:
        """The relay could not read until now (its link down, or its process stopped or
        starved while the broker held the devices' messages): their silence until now is not
        theirs; it is judged from now on, as after a start (a silent device is then noticed
        up to the stall's length later)."""
        self.watch_since_ms = max(self.watch_since_ms, now_ms)

    def handle(self, topic: str, payload: bytes, retained: bool, now_ms: int) -> None:
        """One MQTT message; anything malformed is counted in ``dropped`` and ignored."""
        self.handle_batch([(topic, payload, retained, now_ms)])

    def handle_batch(self, messages: list[tuple[str, bytes, bool, int]]) -> None:
        """Messages ``(topic, payload, retained, now_ms)`` in one transaction. A message that
        is not understood leaves nothing behind and the others are kept: when one fails, the
        batch is rolled back and done again with each message in its own savepoint (two
        statements a message saved in the usual case). A device's messages stay in their
        order (on PostgreSQL they are taken device by device, so that two relays sharing it
        lock device rows in the same order). Acks of the relay's own ``resend`` commands go
        to the gap filler."""
        parsed = []
        for topic, payload, retained, now_ms in messages:
            self.counters.messages += 1
            if self.gaps is not None and self.gaps.handle_ack(topic, payload, now_ms):
                continue
            p = self._parse(topic, payload)
            if p is None:
                self.counters.dropped += 1
            else:
                parsed.append((*p, retained, now_ms, payload))
        if not parsed:
            return
        self._measure_lag(parsed)
        if self.store.pg:
            parsed.sort(key=lambda m: m[0])  # stable: each device's order is kept
        errors = (*HANDLER_ERRORS, *self.store.errors)
        before = dict(vars(self.counters))
        try:
            with self.store.tx():
                for m in parsed:
                    self._apply(*m)
            return
        except errors:
            vars(self.counters).update(before)  # counted again below
        with self.store.tx():
            for m in parsed:
                try:
                    with self.store.savepoint():
                        self._apply(*m)
                except errors as e:
                    self.counters.dropped += 1
                    log.warning("dropped %s from %s: %s", m[1], m[0], e)

    def _measure_lag(self, parsed: list) -> None:
        """How far behind the devices the relay reads (:func:`ctl.ingest.batch_lag` over
        the batch's live health samples)."""
        lag = ingest.batch_lag([(m[4], as_int(m[2].get("ts"))) for m in parsed
                                if m[1] == "health" and not m[3]
                                and m[2].get("historical") is not True])
        if lag is not None:
            self.lag_ms, self.lag_at_ms = lag, parsed[-1][4]

    def _apply(self, device: str, leaf: str, body: dict, retained: bool, now_ms: int,
               payload: bytes) -> None:
        self._raw = payload.decode()  # stored as received (JSON, checked by _parse)
        getattr(self, f"_on_{leaf}")(device, body, retained, now_ms)

    def _parse(self, topic: str, payload: bytes) -> tuple[str, str, dict] | None:
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/")
        if len(rest) != 2 or rest[1] not in LEAVES or not device_id(rest[0]):
            return None
        body = parse_object(payload)
        return None if body is None else (rest[0], rest[1], body)

    def _device(self, device: str, now_ms: int) -> Row:
        select = "SELECT * FROM devices WHERE device=?" + (" FOR UPDATE" if self.store.pg
                                                           else "")
        row = self.store.one(select, device)
        if row is not None:
            return row
        self.store.x("INSERT OR IGNORE INTO devices(device, first_seen_ms) VALUES(?, ?)",
                     device, now_ms)
        return self.store.one(select, device)

    def _limit_sql(self, interval: str = "interval_ms") -> str:
        """SQL: how long a device may stay silent (``missed_beats`` intervals)."""
        return (f"{int(self.settings.missed_beats)} * COALESCE({interval},"
                f" {int(self.settings.heartbeat_default_s * 1000)})")

    def _seen(self, device: str, now_ms: int) -> None:
        """Heard from it now: its heartbeat check is due ``missed_beats`` intervals later
        (the ``devices_due`` index: ticks read only the devices due)."""
        self.store.x(f"UPDATE devices SET last_seen_ms=?, next_check_ms=CASE WHEN online=1"
                     f" THEN ? + {self._limit_sql()} END WHERE device=?", now_ms, now_ms, device)

    def _alive(self, device: str, row: Row, body: dict, retained: bool,
               now_ms: int) -> None:
        """A live message proves the device is up (a historical or retained one does not)."""
        if retained or body.get("historical") is True:
            return
        self._seen(device, now_ms)
        if row["online"] == 0:
            self._transition(device, True, now_ms, "heard", row, now_ms)

    def _on_status(self, device: str, body: dict, retained: bool, now_ms: int) -> None:
        state, session = body.get("state"), as_int(body.get("session"))
        if state not in ("online", "offline"):
            raise ValueError(f"status state {quote(state, 40)}")
        row = self._device(device, now_ms)
        if session is not None and row["session"] is not None and session < row["session"]:
            return  # a late will of an older session (Sparkplug's bdSeq)
        if session is not None:
            self.store.x("UPDATE devices SET session=? WHERE device=?", session, device)
        if state == "online":
            if row["last_seen_ms"] is None or not retained:
                self._seen(device, now_ms)
            if row["online"] != 1:
                self._transition(device, True, now_ms, "online", row, now_ms)
            return
        reason = clean(body.get("reason") or "lost", REASON_MAX) or "lost"
        if row["online"] != 0:
            self._transition(device, False, now_ms, reason, row, now_ms)
        elif row["reason"] != reason:
            self.store.x("UPDATE devices SET reason=? WHERE device=?", reason, device)

    def _ts(self, device: str, body: dict, now_ms: int) -> tuple[int, str | None]:
        """The message's ``ts`` if it is within the window around the relay's clock; else
        the receive time, flagged (the body keeps what the device sent)."""
        raw = as_int(body.get("ts"))
        if raw is None:
            raise ValueError("no integer ts")
        ts = device_time(raw, now_ms, int(self.settings.ts_past_days * 86_400_000),
                         int(self.settings.ts_future_s * 1000))
        if ts is not None:
            return ts, None
        self.counters.device_time += 1
        log.warning("%s: ts %d is outside the window around the relay's clock; the receive"
                    " time is used", device, raw)
        return now_ms, TS_FLAG

    def _on_health(self, device: str, body: dict, retained: bool, now_ms: int) -> None:
        ts, flags = self._ts(device, body, now_ms)
        live = body.get("historical") is not True and not retained
        row = self._heard_health(device, ts, now_ms) if live else None
        if row is None:  # a device not seen before, or a sample that is no sign of life
            row = self._device(device, now_ms)
            if live:
                row = self._heard_health(device, ts, now_ms)
        self.store.set_latest_health(device, ts, now_ms, self._raw, flags)
        self.store.add_health_sample(device, ts, body)
        if live and row["online"] == 0:
            self._transition(device, True, now_ms, "heard", row, now_ms)

    def _heard_health(self, device: str, ts: int, now_ms: int) -> Row | None:
        """A live sample: learn the interval (from the previous live sample's ``ts``) and
        take it as a sign of life, in one statement that also reads what the caller needs
        (SET reads the row's values before the update); None when the device has no row."""
        learned = (f"CASE WHEN health_ts IS NOT NULL AND ? - health_ts BETWEEN"
                   f" {MIN_INTERVAL_MS} AND {MAX_INTERVAL_MS} THEN ? - health_ts END")
        return self.store.one(
            f"UPDATE devices SET interval_ms=COALESCE({learned}, interval_ms), health_ts=?,"
            f" last_seen_ms=?, next_check_ms=CASE WHEN online=1 THEN ? +"
            f" {self._limit_sql(f'COALESCE({learned}, interval_ms)')} END WHERE device=?"
            " RETURNING online, since_ms", ts, ts, ts, now_ms, now_ms, ts, ts, device)

    def _on_state(self, device: str, body: dict, retained: bool, now_ms: int) -> None:
        row = self._device(device, now_ms)
        self.store.x("UPDATE devices SET state=? WHERE device=?", self._raw, device)
        self._alive(device, row, body, retained, now_ms)

    def _on_event(self, device: str, body: dict, retained: bool, now_ms: int) -> None:
        seq, typ = as_int(body.get("seq")), body.get("type")
        if seq is None or seq < 1 or not isinstance(typ, str) or not TYPE_RE.fullmatch(typ):
            raise ValueError(f"event without seq or with a bad type ({quote(typ, 40)})")
        ts, flags = self._ts(device, body, now_ms)
        row = self._device(device, now_ms)
        cur = self.store.x(
            "INSERT OR IGNORE INTO events(device, seq, ts, type, historical, received_ms, body,"
            " flags) VALUES(?, ?, ?, ?, ?, ?, ?, ?)", device, seq, ts, typ,
            int(body.get("historical") is True), now_ms, self._raw, flags)
        if cur.rowcount == 0:
            self.counters.duplicates += 1
            return
        if self.gaps is not None:
            self.gaps.seen(device, seq, now_ms)
        self._track_seq(device, row["max_seq"], seq, now_ms)
        if typ == "play":
            self.store.add_play_record(device, seq, body)
        if typ == "alert":
            self._alert(device, body, ts, flags, now_ms)
        self._alive(device, row, body, retained, now_ms)

    def _track_seq(self, device: str, max_seq: int | None, seq: int, now_ms: int) -> None:
        if max_seq is None or seq > max_seq:
            self.store.x("UPDATE devices SET max_seq=? WHERE device=?", seq, device)
        if max_seq is not None and seq > max_seq + 1:
            self.counters.gaps += 1
            log.warning("%s: events %d..%d missing", device, max_seq + 1, seq - 1)
            self.store.x("INSERT OR IGNORE INTO gaps(device, first_seq, last_seq, noticed_ms)"
                         " VALUES(?, ?, ?, ?)", device, max_seq + 1, seq - 1, now_ms)
        elif max_seq is not None and seq < max_seq:
            self._fill_gap(device, seq, now_ms)

    def _fill_gap(self, device: str, seq: int, now_ms: int) -> None:
        for gap in self.store.q("SELECT * FROM gaps WHERE device=? AND filled_ms IS NULL"
                                " AND first_seq<=? AND last_seq>=?", device, seq, seq):
            have = self.store.one("SELECT COUNT(*) AS n FROM events WHERE device=? AND seq"
                                  " BETWEEN ? AND ?", device, gap["first_seq"], gap["last_seq"])
            if have["n"] == gap["last_seq"] - gap["first_seq"] + 1:
                self.store.x("UPDATE gaps SET filled_ms=? WHERE device=? AND first_seq=?",
                             now_ms, device, gap["first_seq"])

    def _alert(self, device: str, body: dict, ts: int, flags: str | None,
               now_ms: int) -> None:
        """An alert notice. ``code`` and ``key`` are stored cleaned and capped (one line of
        text each: ``ctl.sanitize``); ``detail`` only while small."""
        code, state = body.get("code"), body.get("state")
        if not isinstance(code, str) or state not in ("raised", "cleared"):
            return
        code = clean(code, CODE_MAX)
        if not code:
            return
        key = clean(body["key"], KEY_MAX) or None if isinstance(body.get("key"), str) else None
        self.store.x("INSERT OR IGNORE INTO alerts(device, seq, ts, state, code, key, flags)"
                     " VALUES(?, ?, ?, ?, ?, ?, ?)", device, body["seq"], ts, state, code, key,
                     flags)  # every alert is kept; alert_codes filters what is notified
        if self.settings.alert_codes and code not in self.settings.alert_codes:
            return
        detail = {"historical": body.get("historical") is True}
        if flags == TS_FLAG:
            detail["device_time_invalid"] = True
        if isinstance(body.get("detail"), dict):
            kept = bounded(body["detail"])
            detail["detail"] = kept if kept is not None else {"dropped": "over 2 KiB"}
        self._notice(device, "alert" if state == "raised" else "cleared", ts, now_ms,
                     code=code, key=key, detail=detail)

    # --- transitions and notices -----------------------------------------------------------

    def _transition(self, device: str, online: bool, ts: int, reason: str,
                    row: Row, now_ms: int) -> None:
        """Record the change at ``ts`` (when it happened) and a notice (made at ``now_ms``)."""
        due = f"COALESCE(last_seen_ms, 0) + {self._limit_sql()}" if online else "NULL"
        self.store.x(f"UPDATE devices SET online=?, since_ms=?, reason=?, next_check_ms={due}"
                     " WHERE device=?", int(online), ts, None if online else reason, device)
        if not online:  # learn afresh after it: the gap across an outage is not a heartbeat
            self.store.x("UPDATE devices SET health_ts=NULL WHERE device=?", device)
        self.store.x("INSERT INTO transitions(device, ts, online, reason) VALUES(?, ?, ?, ?)",
                     device, ts, int(online), reason)
        if online and row["online"] is None:
            return  # first sighting of a device that is up: nothing to tell anyone
        self._notice(device, "online" if online else "offline", ts, now_ms,
                     detail={"reason": reason, "since": row["since_ms"]})

    def _notice(self, device: str, kind: str, ts: int | None, now_ms: int, *,
                code: str | None = None, key: str | None = None,
                detail: dict | None = None) -> None:
        self.counters.notices += 1
        self.store.x("INSERT INTO notices(device, kind, code, key, ts, received_ms, detail)"
                     " VALUES(?, ?, ?, ?, ?, ?, ?)", device, kind, code, key,
                     ts if ts is not None else now_ms, now_ms, _dumps(detail or {}))

    # --- time ----------------------------------------------------------------------------

    def interval_ms(self, row: Row) -> int:
        return row["interval_ms"] or int(self.settings.heartbeat_default_s * 1000)

    def tick(self, now_ms: int, heard_until_ms: int | None = None) -> int | None:
        """Check heartbeats and group due notices; returns the new batch id, if any. Each
        step has its own transaction: a fault in one never holds back the other.
        ``heard_until_ms``: messages received after it may still wait to be stored (the
        writer's backlog), so silence is judged up to there only."""
        with self.store.tx():
            self._check_heartbeats(now_ms, heard_until_ms)
        with self.store.tx():
            batch = self._maybe_batch(now_ms)
        if now_ms - self.last_prune_ms > 3_600_000:
            self._prune(now_ms)
        return batch

    def _check_heartbeats(self, now_ms: int, heard_until_ms: int | None = None) -> None:
        """Only the devices whose check is due (``next_check_ms``, indexed): silent ones go
        offline, the others are rescheduled. Silence is judged up to what the relay has read:
        ``heard_until_ms`` (its writer's backlog) less its lag behind the devices."""
        until = now_ms if heard_until_ms is None else min(now_ms, heard_until_ms)
        if now_ms - self.lag_at_ms <= LAG_FRESH_MS:  # reading messages the broker held
            until -= self.lag_ms
        for row in self.store.q("SELECT * FROM devices WHERE next_check_ms < ?"
                                " ORDER BY next_check_ms LIMIT 5000", until):
            if row["online"] != 1:
                self.store.x("UPDATE devices SET next_check_ms=NULL WHERE device=?",
                             row["device"])
                continue
            heard = max(row["last_seen_ms"] or 0, self.watch_since_ms)
            limit = self.settings.missed_beats * self.interval_ms(row)
            if until - heard > limit:
                log.info("%s: no heartbeat for %d s", row["device"], (until - heard) // 1000)
                self._transition(row["device"], False, heard, "heartbeat", row, now_ms)
            else:
                self.store.x("UPDATE devices SET next_check_ms=? WHERE device=?",
                             heard + limit, row["device"])

    def _maybe_batch(self, now_ms: int) -> int | None:
        """Alertmanager's grouping, a group being a device's link or one of its alerts
        (:func:`ctl.notify.group_key`): a group's pending notices are due ``group_wait_s``
        after the first of them, and not before ``group_interval_s`` after the group was last
        notified. When any group is due, one batch takes every due group and every new one
        (not notified within the interval), so a burst of new trouble is one message."""
        pending = [dict(r) for r in
                   self.store.q("SELECT * FROM notices WHERE batch IS NULL ORDER BY id")]
        if not pending:
            return None
        wait_ms = int(self.settings.group_wait_s * 1000)
        interval_ms = int(self.settings.group_interval_s * 1000)
        last = self._last_notified(now_ms - interval_ms)
        first: dict[tuple, int] = {}
        for n in pending:
            first.setdefault(notify.group_key(n), n["received_ms"])
        due = {g for g, at in first.items()
               if now_ms >= max(at + wait_ms, last.get(g, -interval_ms) + interval_ms)}
        if not due:
            return None
        taken = [n for n in pending if notify.group_key(n) in due or
                 notify.group_key(n) not in last]
        body = {"created": now_ms, "window_s": self.settings.group_interval_s,
                "group_wait_s": self.settings.group_wait_s,
                "group_interval_s": self.settings.group_interval_s,
                "items": notify.summarise(taken)}
        batch = self.store.insert_id("INSERT INTO batches(created_ms, body) VALUES(?, ?)",
                                     now_ms, _dumps(body))
        ids = [n["id"] for n in taken]
        for i in range(0, len(ids), 500):  # SQLite bounds the variables of one statement
            chunk = ids[i:i + 500]
            self.store.x(f"UPDATE notices SET batch=? WHERE id IN ({','.join('?' * len(chunk))})",
                         batch, *chunk)
        for channel in self.settings.channels:
            self.store.x("INSERT INTO deliveries(batch, channel, next_ms) VALUES(?, ?, ?)",
                         batch, channel, now_ms)
        self.counters.batches += 1
        return batch

    def _last_notified(self, since_ms: int) -> dict[tuple, int]:
        """When each group was last in a batch made after ``since_ms``."""
        out: dict[tuple, int] = {}
        for r in self.store.q("SELECT n.device, n.kind, n.code, n.key, MAX(b.created_ms) AS at"
                              " FROM batches b JOIN notices n ON n.batch = b.id"
                              " WHERE b.created_ms > ? GROUP BY n.device, n.kind, n.code, n.key",
                              since_ms):
            g = notify.group_key(dict(r))
            out[g] = max(out.get(g, 0), r["at"])
        return out

    def _prune(self, now_ms: int) -> None:
        self.last_prune_ms = now_ms
        horizon = now_ms - self.settings.health_keep_days * 86_400_000
        with self.store.tx():  # by the bucket_ms index
            self.store.x("DELETE FROM health_5m WHERE bucket_ms < ?", horizon)
        n = self.store.prune_event_bodies(now_ms - self.settings.events_keep_days * 86_400_000)
        if n:
            log.info("relay: emptied the bodies of %d event(s) received over %d days ago", n,
                     self.settings.events_keep_days)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# --- the process -------------------------------------------------------------------------

def run(cfg: dict, *, once_s: float | None = None, stop: StopSignals | None = None) -> int:
    """Run the relay until SIGTERM/SIGINT (or for ``once_s`` seconds; ``stop``: the signals
    as the caller took them, e.g. serve). The stop is logged; the step under way finishes,
    the MQTT session is closed, the database checkpointed and closed, the counters logged."""
    stop = stop or StopSignals().install()
    store = open_store(cfg["relay"])
    channels = notify.channels_from_config(cfg["alerts"])
    settings = RelaySettings.from_config(cfg, [c.name for c in channels])
    gaps = gaps_from_config(cfg, store, lambda topic, body: client.publish(topic, body, qos=1))
    relay = Relay(store, settings, cfg["mqtt"]["topic_prefix"], gaps=gaps)
    dispatcher = notify.Dispatcher(store, channels, cfg["alerts"]["retry"], cfg["relay"])
    writer = ingest.Writer(relay)
    client = _connect(cfg, relay, writer)
    reread = subs.StatusReread(store, cfg["mqtt"]["topic_prefix"],
                               float(cfg["relay"]["status_reread_s"]))
    log.info("relay: %d channel(s): %s; a new group waits %g s, changes to it %g s",
             len(channels), ", ".join(settings.channels) or "none", settings.group_wait_s,
             settings.group_interval_s)
    note = grouping(cfg["relay"])[2]
    if note:
        log.warning("%s (docs/CTL.md)", note)
    end = time.monotonic() + once_s if once_s else None
    tick_s = float(cfg["relay"]["tick_s"])
    try:
        while not stop.event.is_set() and (end is None or time.monotonic() < end):
            _step(relay, dispatcher, writer, client)
            _step_ingest(gaps, reread, client)
            waited = time.monotonic()
            stop.event.wait(tick_s)
            waited = time.monotonic() - waited
            if waited > tick_s + STALL_S:  # what the broker held meanwhile is not read yet
                log.warning("relay: the process was stopped or starved for %.0f s; silence"
                            " is judged from now", waited)
                relay.not_reading(_now_ms())
        log.info("relay: %s, stopping", stop.why("--once time is up"))
    finally:
        client.stop()  # no message comes in after this
        writer.stop()  # what came in is stored
        store.close()
        c = relay.counters
        log.info("relay stopped: %d messages, %d dropped, %d duplicates, %d notices,"
                 " %d batches; database closed", c.messages, c.dropped, c.duplicates,
                 c.notices, c.batches)
        if gaps is not None:
            g = gaps.counters
            log.info("relay seq gaps: %d resend(s) asking %d seq(s), %d filled, %d lost;"
                     " %d tail probe(s)", g.resends, g.asked, g.filled, g.lost, g.probes)
        log.info("relay: %d status re-read(s)", reread.reread)
        for handler in logging.getLogger().handlers:
            handler.flush()
    return 0


def _step(relay: Relay, dispatcher: Any, writer: ingest.Writer, link: RelayLink) -> None:
    now = _now_ms()
    if not link.connected.is_set():  # nothing can be heard: nobody is silent
        relay.not_reading(now)
    try:
        if not relay.store.leader():
            return  # another relay on this PostgreSQL ticks and notifies
        relay.tick(now, writer.heard_until_ms())
        dispatcher.run_due(now)
    except Exception:  # the relay keeps running; the next tick retries
        log.exception("relay tick failed")


def _step_ingest(gaps: GapFiller | None, reread: subs.StatusReread, client: RelayLink) -> None:
    now = _now_ms()
    try:
        if gaps is not None:
            gaps.tick(now)
        reread.tick(client, now)
    except Exception:  # the relay keeps running; the next tick retries
        log.exception("relay gap/status step failed")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _connect(cfg: dict, relay: Relay, writer: ingest.Writer) -> RelayLink:
    """A persistent MQTT session (the broker queues QoS 1 messages while the relay is away)."""
    m = cfg["mqtt"]
    prefix = m["topic_prefix"]
    link: RelayLink

    def on_connect() -> None:
        relay.connected(_now_ms())
        link.subscribe(subs.topics(prefix, cfg["relay"]["shared_group"],
                                   acks=relay.gaps is not None and relay.gaps.sign is not None))
        log.info("relay connected to %s:%s", m["host"], m["port"])

    def on_message(topic: str, payload: bytes, retained: bool) -> None:  # only enqueue
        writer.put(topic, payload, retained, _now_ms())

    link = RelayLink(m, cfg["relay"]["client_id"], on_message=on_message,
                     on_connect=on_connect)
    return link.start()
