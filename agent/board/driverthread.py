"""The thread that owns a board driver (docs/BOARD.md, "Link supervision").

A serial write may block for seconds and a page takes a tenth of a second to draw: driver
calls never run on the core thread. Calls run in order; each result, or the exception it
raised, is handed to its callback on the core thread through ``post``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

STOP_JOIN_S = 3.0


class DriverThread:
    """One thread that owns the driver: calls run in order, each result (or the exception
    raised) is handed to its callback on the core thread through ``post``."""

    def __init__(self, post: Callable[..., None]) -> None:
        self._post = post
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="board-driver", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], then: Callable[[Any], None]) -> None:
        self._queue.put((fn, then))

    def drain(self) -> None:
        """Block until every submitted call has run and its callback was posted (tests)."""
        self._queue.join()

    def stop(self, timeout: float = STOP_JOIN_S) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            fn, then = item
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - every driver failure goes to the core
                result = exc
            self._post(then, result)
            self._queue.task_done()
