"""What the relay subscribes to, shared or not, and the re-read of retained ``status``.

``relay.shared_group: NAME`` lets several relay processes share the load (MQTT 5 shared
subscriptions, ``$share/NAME/...``): each ``health``, ``event`` and ``ack`` message goes to one
of them. ``status`` and ``state`` are retained, and a broker never hands retained messages to a
shared subscription, so every process subscribes to them directly (they are per device and
idempotent: each process writes the same row).

A retained ``status`` can still miss the relay: a burst larger than the broker's queue for the
relay's session (``max_queued_messages``) drops messages, and a device whose birth was dropped
would stay unknown (online NULL) until its next connect. So every ``relay.status_reread_s``,
the devices the store has with no known link state are subscribed to one by one
(``P/dev/ID/status``: the broker sends the retained message again), in small batches, and
unsubscribed at the next round.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DIRECT = ("status", "state")  # retained: never through $share
SHARED = ("health", "event", "ack")
BATCH = 100  # topics per SUBSCRIBE
ROUND_MAX = 1000  # devices re-read per round (each round a few seconds apart)


def topics(prefix: str, shared_group: str | None, acks: bool) -> list[tuple[str, int]]:
    share = f"$share/{shared_group}/" if shared_group else ""
    out = [(f"{prefix}/dev/+/{leaf}", 1) for leaf in DIRECT]
    out += [(f"{share}{prefix}/dev/+/{leaf}", 1) for leaf in SHARED if acks or leaf != "ack"]
    return out


class StatusReread:
    """Re-reads the retained status of devices whose link state the store does not know."""

    def __init__(self, store, prefix: str, every_s: float) -> None:
        self.store = store
        self.prefix = prefix
        self.every_ms = int(every_s * 1000)
        self.last_ms = 0
        self.pending: list[str] = []  # topics subscribed in the last round
        self.rounds = 0
        self.reread = 0  # devices asked for

    def tick(self, client: Any, now_ms: int) -> None:
        if self.every_ms <= 0 or now_ms - self.last_ms < self.every_ms:
            return
        self.last_ms = now_ms
        for i in range(0, len(self.pending), BATCH):
            client.unsubscribe(self.pending[i:i + BATCH])
        with self.store.lock:
            rows = self.store.q("SELECT device FROM devices WHERE online IS NULL LIMIT ?",
                                ROUND_MAX)
        self.pending = [f"{self.prefix}/dev/{r['device']}/status" for r in rows]
        if not self.pending:
            return
        self.rounds += 1
        self.reread += len(self.pending)
        log.info("relay: re-reading the retained status of %d device(s) with no known link"
                 " state", len(self.pending))
        for i in range(0, len(self.pending), BATCH):
            client.subscribe([(t, 1) for t in self.pending[i:i + BATCH]])
