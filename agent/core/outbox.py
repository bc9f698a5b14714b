"""Store-and-forward of acks, events and health (SPEC §10).

Every event, final ack and offline ack or health sample is first stored in SQLite, then
published with QoS 1; its row is deleted only when the broker has acknowledged it (PUBACK).
While the link is down rows accumulate (flagged ``historical``) and are sent in order on
reconnect, a window of ``inflight`` at a time. What may be lost to a crash goes straight out
while connected with nothing waiting (:meth:`Outbox.send_or_store`: health samples and the acks
of steps on the way). Used only from the core thread.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.core.clock import Clock
from agent.core.store import Store, encode

log = logging.getLogger(__name__)

# Rows that may be published before the transaction that stored them commits. An ack carries no
# ``seq``: if a crash undoes its row, what it said was still true when sent (and a command left
# open is reported ``failed``/``interrupted`` at the next start). Sending acks at once spares
# the controller an fsync of waiting per ack. Events never go early (see ``pump``).
EARLY_KINDS = frozenset({"ack"})


class Publisher(Protocol):
    connected: bool

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> int | None: ...


class Outbox:
    def __init__(self, store: Store, link: Publisher, clock: Clock, inflight: int = 20) -> None:
        self.store = store
        self.link = link
        self.clock = clock
        self.inflight_max = inflight
        self._inflight: dict[int, int] = {}  # mid -> rowid
        self._last_sent = 0  # highest rowid handed to the link in this connection

    def add(self, topic: str, body: dict, *, kind: str, event: bool = False, qos: int = 1) -> dict:
        """Commit ``body`` durably and try to send it. Returns the body as stored."""
        if not self.link.connected:
            body = {**body, "historical": True}
        stored = self.store.enqueue(topic, body, qos=qos, kind=kind, now_ms=self.clock.now_ms(),
                                    event=event)
        if kind in EARLY_KINDS or not self.store.in_transaction:
            self.pump()
        return stored

    def send_or_store(self, topic: str, body: dict, *, kind: str) -> dict:
        """For messages that may be lost (health samples, acks of steps on the way): while
        connected with nothing waiting, publish without storing — two SQLite writes less each,
        most of an idle agent's writes to the SD card. paho resends it after a reconnect; only
        a crash before its PUBACK loses it. Offline, or while older rows wait, it is stored."""
        # depth counts rows in flight too: 0 means nothing is waiting to go before this
        if (self.link.connected and self.depth == 0
                and self.link.publish(topic, encode(body), qos=1) is not None):
            return body
        return self.add(topic, body, kind=kind)

    def pump(self) -> None:
        """Hand pending rows to the link, oldest first, up to the in-flight window.

        Inside a store transaction only acks go, and only while no other row is waiting
        before them (order is kept): an event must never be published while a crash could still
        undo it, or its ``seq`` could be given to another event after the restart. The core
        pumps again after its commit."""
        early_only = self.store.in_transaction
        while self.link.connected and len(self._inflight) < self.inflight_max:
            limit = self.inflight_max - len(self._inflight)
            rows = self.store.pending(after=self._last_sent, limit=limit)
            if not rows:
                return
            for row in rows:
                if early_only and row.kind not in EARLY_KINDS:
                    return
                mid = self.link.publish(row.topic, row.payload, qos=max(1, row.qos))
                if mid is None:
                    return  # the link dropped; on_disconnected resets the window
                self._inflight[mid] = row.rowid
                self._last_sent = row.rowid
            if len(rows) < limit:
                return  # that was all (no second query to find nothing)

    def on_published(self, mid: int) -> None:
        rowid = self._inflight.pop(mid, None)
        if rowid is not None:
            self.store.delivered(rowid)
            self.pump()

    def on_connected(self) -> None:
        self._reset()
        self.pump()

    def on_disconnected(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Unacknowledged rows are still in the store: they are sent again from the start.
        self._inflight.clear()
        self._last_sent = 0

    @property
    def depth(self) -> int:
        return self.store.depth()
