"""Filling gaps in the devices' event ``seq`` (docs/PROTOCOL.md, "Resend"; docs/CTL.md).

The relay stores events by (device, seq). A seq beyond the last contiguous one + 1 means events
were lost on the way (the broker dropped them: the relay away longer than its queue, a full
queue after a burst). After ``relay.gap_wait_s`` (events may still arrive out of order, or
through another relay process sharing the subscription), the relay sends the device a signed
``resend`` command for each missing range (at most :data:`SPAN` seqs each); the device
publishes those events again. Asks are repeated with backoff (``relay.gap_retry_s`` doubling up
to ``relay.gap_retry_max_s``) while the range is still missing: not sent while the device is
known offline, at once when it is back. What the device says it no longer holds (``missing``
in its ``done`` ack: pruned after its ``outbox.keep_days``) is recorded as lost: counted,
logged, and never asked for again.

The database is the truth, so several relay processes sharing the subscriptions (``$share``)
and a restarted relay agree: missing = neither in ``events`` nor in ``seq_lost``
(:meth:`ctl.store.RelayStore.missing_seqs`, the one definition). The same code runs on SQLite
and PostgreSQL: a device's bookkeeping is done in one transaction that first locks the
device's row (on SQLite the transaction is IMMEDIATE: the whole database), and each ask is
claimed by an UPDATE that only one process can make (``next_ms`` still due), so one process
sends each. The tables (``seq_asks``, ``seq_lost``, ``seq_top``, ``seq_probe``) are in the
store's schema.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.protocol import canonical
from ctl.sanitize import as_int, device_id, parse_object
from ctl.seqs import SPAN, covered_ranges, holes

__all__ = ["SPAN", "GapFiller", "GapSettings", "covered_ranges", "from_config", "holes"]

log = logging.getLogger(__name__)

TTL_MS = 600_000  # a resend command expires after this
ID_RE = re.compile(r"rs-(\d{1,16})-(\d{1,16})-[0-9a-f]{6}")
ASK_UPSERT = ("INSERT INTO seq_asks(device, lo, hi, noticed_ms, attempts, next_ms, sent_ms)"
              " VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, lo) DO UPDATE SET"
              " hi = excluded.hi, noticed_ms = excluded.noticed_ms,"
              " attempts = excluded.attempts, next_ms = excluded.next_ms,"
              " sent_ms = excluded.sent_ms")


@dataclass
class GapSettings:
    wait_s: float = 10.0
    retry_s: float = 30.0
    retry_max_s: float = 600.0
    backfill: int | None = None  # seqs below a device's first stored one asked for (None: all)
    probe_s: float = 3600.0  # each device asked past its newest seq this often (0: at connect)
    probe_rate: int = 100  # probes per tick at most

    @classmethod
    def from_config(cls, relay: dict) -> GapSettings:
        return cls(wait_s=float(relay["gap_wait_s"]), retry_s=float(relay["gap_retry_s"]),
                   retry_max_s=float(relay["gap_retry_max_s"]),
                   backfill=None if relay["gap_backfill"] is None
                   else int(relay["gap_backfill"]),
                   probe_s=float(relay["gap_probe_s"]))


@dataclass
class GapCounters:
    resends: int = 0  # resend commands sent
    asked: int = 0  # seqs asked for
    filled: int = 0  # seqs that arrived after being asked for (resent)
    lost: int = 0  # seqs the devices no longer held
    probes: int = 0  # resends past a device's newest stored seq (tail losses)


class GapFiller:
    """Gap bookkeeping over the relay's store. :meth:`seen` and :meth:`handle_ack` run on the
    MQTT thread inside or beside the relay's transactions; :meth:`tick` on the relay's loop.
    ``publish(topic, payload)`` sends a command; ``sign(env)`` signs it (None: gaps are
    noticed and logged, nothing is asked)."""

    def __init__(self, store, settings: GapSettings, prefix: str,
                 publish: Callable[[str, bytes], None] | None = None,
                 sign: Callable[[dict], dict] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.prefix = prefix
        self.publish = publish
        self.sign = sign
        self.counters = GapCounters()
        self._lock = threading.Lock()
        self._dirty: dict[str, int] = {}  # device -> when it first needed a look
        self._contig: dict[str, int] = {}  # device -> every seq up to here is in or lost
        self._asked: dict[str, set[int]] = {}  # device -> seqs asked for (to count fills)
        self._probe_at: int | None = None  # when to probe every device (see probe_all)
        self._probe_queue: list[str] = []
        self._probe_last = 0
        self._dirty_from_asks()

    def _dirty_from_asks(self) -> None:
        """After a restart: the devices with open asks need a look."""
        for r in self.store.q("SELECT DISTINCT device FROM seq_asks"):
            self._dirty[r["device"]] = 0

    # --- input (MQTT thread) -------------------------------------------------------------

    def seen(self, device: str, seq: int, now_ms: int) -> None:
        """A new (not duplicate) event was stored."""
        with self._lock:
            asked = self._asked.get(device)
            if asked and seq in asked:  # a fill: look again soon, to close the ask
                asked.discard(seq)
                self.counters.filled += 1
                self._dirty.setdefault(device, now_ms)
                return
            contig = self._contig.get(device)
            if contig is not None and seq == contig + 1 and device not in self._dirty:
                self._contig[device] = seq
                return
            if contig is not None and seq <= contig:
                return
            self._dirty.setdefault(device, now_ms)

    def handle_ack(self, topic: str, payload: bytes, now_ms: int) -> bool:
        """An ack: True when ``topic`` is an ack topic (handled here, ours or not)."""
        head = f"{self.prefix}/dev/"
        if not (topic.startswith(head) and topic.endswith("/ack")):
            return False
        device = topic[len(head):-len("/ack")]
        body = parse_object(payload)
        if not device_id(device) or body is None or not isinstance(body.get("id"), str):
            return True
        m = ID_RE.fullmatch(body["id"])
        if m is None:
            return True
        lo, hi = int(m.group(1)), int(m.group(2))
        stage = body.get("stage")
        if stage == "done":
            detail = body.get("detail") if isinstance(body.get("detail"), dict) else {}
            last = as_int(detail.get("last_seq"))
            if last is not None:
                hi = min(hi, last)  # past the device's end nothing is lost
                self._learn_top(device, last, now_ms)
            if lo <= hi:
                self._record_lost(device, lo, hi, detail.get("missing"), now_ms)
        elif stage in ("rejected", "failed", "expired"):
            log.warning("%s: resend %d..%d %s (%s)", device, lo, hi, stage, body.get("reason"))
        return True

    def _learn_top(self, device: str, last: int, now_ms: int) -> None:
        """The device's newest seq, as it said: everything up to it is expected (what it
        resends may be dropped on the way again; then it is asked for like any gap)."""
        with self.store.tx():
            self.store.x("INSERT INTO seq_top(device, last_seq) VALUES(?, ?) ON CONFLICT (device)"
                         " DO UPDATE SET last_seq = CASE WHEN excluded.last_seq >"
                         " seq_top.last_seq THEN excluded.last_seq ELSE seq_top.last_seq END",
                         device, last)
        with self._lock:
            self._dirty.setdefault(device, now_ms)

    def _record_lost(self, device: str, lo: int, hi: int, missing, now_ms: int) -> None:
        if not isinstance(missing, list):
            missing = []
        lost = []
        for r in missing[:SPAN]:
            a, b = (as_int(r[0]), as_int(r[1])) if isinstance(r, list) and len(r) == 2 \
                else (None, None)
            if a is None or b is None:
                continue
            a, b = max(a, lo), min(b, hi)
            if a <= b:
                lost.append((a, b))
        with self.store.tx():
            self._lock_device(device)
            for a, b in lost:
                for x, y in self.store.record_lost(device, a, b, now_ms):
                    self.counters.lost += y - x + 1
                    log.warning("%s: events %d..%d are lost (the device no longer holds"
                                " them)", device, x, y)
        with self._lock:
            self._dirty[device] = 0  # look again at once

    # --- time (the relay's loop) -----------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        wait_ms = int(self.settings.wait_s * 1000)
        with self._lock:
            ready = [d for d, at in self._dirty.items() if now_ms - at >= wait_ms]
            for d in ready:
                del self._dirty[d]
        for device in ready:
            with self.store.tx():
                self._lock_device(device)
                self._sync(device, now_ms)
        self._send_due(now_ms)
        self._probe(now_ms)

    def _lock_device(self, device: str) -> None:
        """PostgreSQL: hold the device's row for the transaction, as the relay's ingest does
        (several relays on one database then work on a device one at a time; SQLite's
        IMMEDIATE transaction already holds the whole database)."""
        if self.store.pg:
            self.store.one("SELECT 1 AS x FROM devices WHERE device=? FOR UPDATE", device)

    def _sync(self, device: str, now_ms: int) -> None:
        """Make ``seq_asks`` match what is missing now for ``device``."""
        start = self._contig.get(device)
        if start is None:
            row = self.store.one("SELECT MIN(seq) AS lo FROM events WHERE device=?", device)
            if row is None or row["lo"] is None:
                return
            back = self.settings.backfill
            start = 0 if back is None else max(0, row["lo"] - 1 - back)
        row = self.store.one("SELECT last_seq FROM seq_top WHERE device=?", device)
        # up to the device's newest seq as it told us (a resend answer): its tail too
        missing, end = self.store.missing_seqs(device, start, row["last_seq"] if row else None)
        with self._lock:
            if missing:
                self._contig[device] = missing[0][0] - 1
            elif end is not None:
                self._contig[device] = max(start, end)
        old = {r["lo"]: r for r in self.store.q("SELECT * FROM seq_asks WHERE device=?",
                                                device)}
        keep = set()
        for lo, hi in missing:
            prev = old.get(lo) or next((r for r in old.values() if r["lo"] <= lo <= r["hi"]),
                                       None)
            if prev is None:
                log.warning("%s: events %d..%d missing; asking the device again", device, lo,
                            hi)
                self.store.x(ASK_UPSERT, device, lo, hi, now_ms, 0, now_ms, None)
            elif prev["lo"] != lo or prev["hi"] != hi:
                self.store.x(ASK_UPSERT, device, lo, hi, prev["noticed_ms"], prev["attempts"],
                             prev["next_ms"], prev["sent_ms"])
            keep.add(lo)
        for lo in set(old) - keep:
            self.store.x("DELETE FROM seq_asks WHERE device=? AND lo=?", device, lo)

    def _send_due(self, now_ms: int) -> None:
        """Ask for the due ranges of devices not known to be offline, after a fresh look at
        what is missing (another relay process may have stored the events meanwhile). Each
        device in its own transaction; each ask claimed by moving its ``next_ms`` on, which
        only one process sharing the database can do."""
        if self.publish is None or self.sign is None:
            return
        with self.store.lock:
            devices = [r["device"] for r in self.store.q(
                "SELECT DISTINCT a.device FROM seq_asks a LEFT JOIN devices d"
                " ON d.device = a.device WHERE a.next_ms <= ?"
                " AND (d.online IS NULL OR d.online != 0) LIMIT 200", now_ms)]
        for device in sorted(devices):
            with self.store.tx():
                self._lock_device(device)
                self._sync(device, now_ms)
                due = self.store.q("SELECT * FROM seq_asks WHERE device=? AND next_ms <= ?"
                                   " ORDER BY lo", device, now_ms)
                for r in due:
                    attempts = r["attempts"] + 1
                    delay = min(self.settings.retry_max_s,
                                self.settings.retry_s * 2 ** (attempts - 1))
                    claimed = self.store.x(
                        "UPDATE seq_asks SET attempts=?, next_ms=?, sent_ms=? WHERE device=?"
                        " AND lo=? AND next_ms <= ?", attempts, now_ms + int(delay * 1000),
                        now_ms, device, r["lo"], now_ms).rowcount
                    if claimed:
                        self._ask(device, r["lo"], r["hi"], now_ms)

    # --- tail losses ---------------------------------------------------------------------

    def probe_all(self, now_ms: int) -> None:
        """The relay (re)connected, so it may have missed a device's newest events, which no
        later event would reveal: after the settle time, ask each device for the seqs past the
        newest one stored (it sends what it has there; nothing is missing past its end)."""
        with self._lock:
            self._probe_at = now_ms + int(self.settings.wait_s * 1000)

    def _probe(self, now_ms: int) -> None:
        if self.publish is None or self.sign is None:
            return
        every = int(self.settings.probe_s * 1000)
        with self._lock:
            if not self._probe_last:
                self._probe_last = now_ms
            if self._probe_at is None and every and now_ms - self._probe_last >= every:
                self._probe_at = now_ms
            start = self._probe_at is not None and now_ms >= self._probe_at
            if start:
                self._probe_at = None
                self._probe_last = now_ms
        if start:
            with self.store.lock:
                rows = self.store.q("SELECT device FROM devices WHERE max_seq IS NOT NULL"
                                    " AND (online IS NULL OR online != 0)")
            self._probe_queue = [r["device"] for r in rows]
        batch, self._probe_queue = (self._probe_queue[:self.settings.probe_rate],
                                    self._probe_queue[self.settings.probe_rate:])
        recent = now_ms - int(self.settings.wait_s * 1000)
        for device in batch:
            with self.store.tx():  # claimed, so relay processes sharing the load probe once
                self.store.x("INSERT OR IGNORE INTO seq_probe(device, at_ms) VALUES(?, 0)",
                             device)
                claimed = self.store.x("UPDATE seq_probe SET at_ms=? WHERE device=? AND"
                                       " at_ms < ?", now_ms, device, recent).rowcount
                row = self.store.one("SELECT MAX(seq) AS top FROM events WHERE device=?",
                                     device)
            if not claimed or row is None or row["top"] is None:
                continue
            self._ask(device, row["top"] + 1, row["top"] + SPAN, now_ms, probe=True)

    def _ask(self, device: str, lo: int, hi: int, now_ms: int, probe: bool = False) -> None:
        env = {"v": 1, "id": f"rs-{lo}-{hi}-{secrets.token_hex(3)}", "type": "resend",
               "target": f"dev/{device}", "ts": now_ms, "exp": now_ms + TTL_MS,
               "args": {"from_seq": lo, "to_seq": hi}}
        self.publish(f"{self.prefix}/dev/{device}/cmd", canonical(self.sign(env)))
        if probe:
            self.counters.probes += 1
            return
        self.counters.resends += 1
        self.counters.asked += hi - lo + 1
        with self._lock:
            self._asked.setdefault(device, set()).update(range(lo, hi + 1))
        log.info("%s: resend %d..%d asked", device, lo, hi)

    def lost_total(self) -> int:
        row = self.store.one("SELECT COALESCE(SUM(hi - lo + 1), 0) AS n FROM seq_lost")
        return row["n"]

    def open_asks(self) -> int:
        return self.store.one("SELECT COUNT(*) AS n FROM seq_asks")["n"]


def from_config(cfg: dict, store, publish: Callable[[str, bytes], None]) -> GapFiller | None:
    """The relay's gap filler; it signs with ``signing.kid``/``key_file`` (without them gaps
    are logged and counted, nothing is asked). The same on SQLite and PostgreSQL."""
    from agent import protocol
    from ctl.keys import load_private_key

    sign = None
    kid, key_file = cfg["signing"].get("kid"), cfg["signing"].get("key_file")
    if kid and key_file:
        key = load_private_key(key_file)

        def sign(env: dict) -> dict:
            return protocol.sign(env, key, kid)
    else:
        log.warning("relay: signing.kid/key_file not set: gaps in seq are logged, never asked"
                    " for again (resend)")
    return GapFiller(store, GapSettings.from_config(cfg["relay"]), cfg["mqtt"]["topic_prefix"],
                     publish=publish, sign=sign)
