"""The relay's writer thread: messages go from the MQTT link's thread to the store without
waiting for a disk. ``on_message`` only enqueues; the writer takes what has come within
``linger_s`` of the first message (up to ``max_batch``) and stores it with
:meth:`ctl.relay.Relay.handle_batch`, one transaction (one fsync) per batch, so the rate is
bounded by statements, not by fsyncs (docs/SCALE.md). Without the linger a writer as fast as
the network thread takes a few messages at a time: many small commits, each an fsync, and
the two threads taking turns on the GIL for each (measured: 17 messages a batch).

``stop()`` stores what is still queued before it returns: the relay calls it after the MQTT
client has stopped and before the store is closed, so nothing received is lost on SIGTERM.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()
LAG_MAX_MS = 6 * 3_600_000  # a receive time − ts larger than this is a wrong clock
STOP_RETRY_S = 30.0  # at the stop, a failing database is retried this long


def batch_lag(samples: list[tuple[int, int | None]]) -> int | None:
    """How far behind the devices a batch was read: the median of receive time − ``ts``
    over ``(received_ms, ts)`` pairs of live messages (the median, so that a few devices with
    a wrong clock do not move it; negative or over :data:`LAG_MAX_MS`: a clock, not a lag);
    None without any. When the broker held messages for the relay (a stall, a catch-up),
    the heartbeat check judges silence that far back (:meth:`ctl.relay.Relay.tick`)."""
    lags = [r - t for r, t in samples if t is not None and 0 <= r - t <= LAG_MAX_MS]
    return statistics.median_low(lags) if lags else None


class Writer:
    """A queue and the thread that empties it into ``relay.handle_batch``."""

    def __init__(self, relay: Any, *, max_batch: int = 2000, max_queue: int = 20_000,
                 linger_s: float = 0.05) -> None:
        self.relay = relay
        self.max_batch = max_batch
        self.linger_s = linger_s  # a message waits at most this long for others to join it
        # bounded: when the store falls behind, the link's thread waits here and the broker keeps
        # the QoS 1 messages (back-pressure instead of unbounded memory); small enough to be
        # stored within seconds when the relay stops (about 2 s on SQLite, 15 s on PostgreSQL)
        self.queue: queue.Queue = queue.Queue(max_queue)
        self.batches = 0
        self.retries = 0  # batches stored again after the database failed
        self.stopping = False
        self._storing_since: int | None = None  # receive time of the batch being stored
        self.thread = threading.Thread(target=self._run, name="relay-writer", daemon=True)
        self.thread.start()

    def put(self, topic: str, payload: bytes, retained: bool, now_ms: int) -> None:
        self.queue.put((topic, payload, retained, now_ms))

    def heard_until_ms(self) -> int | None:
        """Everything received before this (the receive time of the oldest message not yet
        stored) is in the store; None when nothing waits. A heartbeat check must not judge
        a device silent past it: its messages may be waiting here."""
        oldest = self._storing_since
        with self.queue.mutex:
            head = self.queue.queue[0] if self.queue.queue else None
        if head is not None and head is not _STOP:
            oldest = head[3] if oldest is None else min(oldest, head[3])
        return oldest

    def stop(self) -> None:
        """Store what is queued, then end the thread (idempotent). It waits as long as that
        takes: the store must not be closed under the writer (what is queued was already
        acknowledged to the broker)."""
        if self.thread.is_alive():
            if self.queue.qsize():
                log.info("relay writer: storing the %d messages still queued",
                         self.queue.qsize())
            self.stopping = True
            self.queue.put(_STOP)
            self.thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self.queue.get()
            if item is _STOP:
                return
            batch = [item]
            until = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch:
                try:
                    left = until - time.monotonic()
                    item = self.queue.get(timeout=left) if left > 0 else \
                        self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._storing_since = min(m[3] for m in batch)
            try:
                self._store(batch, stopping)
            finally:
                self._storing_since = None

    def _store(self, batch: list, stopping: bool) -> None:
        """Store ``batch``. The database failing (locked by another relay process past its
        busy timeout, a PostgreSQL restart, a full disk) is retried with backoff: the
        messages were acknowledged to the broker, so giving up loses them; meanwhile the link's
        thread waits on the full queue and the broker keeps the rest. While stopping it
        gives up after ``STOP_RETRY_S``. Any other error is a fault in the relay: logged,
        the batch dropped, the writer goes on."""
        delay, gave_up_at = 0.5, time.monotonic() + STOP_RETRY_S
        counted = dict(vars(self.relay.counters))
        while True:
            try:
                self.relay.handle_batch(batch)
                self.batches += 1
                return
            except self.relay.store.errors as e:
                vars(self.relay.counters).update(counted)  # counted again when stored
                if (stopping or self.stopping) and time.monotonic() > gave_up_at:
                    log.error("relay writer: %d messages not stored, the database still"
                              " failing at the stop: %s", len(batch), e)
                    return
                self.retries += 1
                log.warning("relay writer: storing %d messages failed (%s); again in %g s",
                            len(batch), e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:  # the writer never dies; the next batch goes on
                log.exception("relay writer: a batch of %d messages failed", len(batch))
                return
