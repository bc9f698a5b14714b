"""Live updates for the pages: server-sent events. Threads (the fleet watcher, the MQTT link)
``publish`` events; each open page has a bounded asyncio queue on the server's event loop and
receives the events its user may see. A page that cannot keep up loses the oldest events and is
told to reload (``event: reload``), so one slow phone never holds the others back."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

QUEUE_MAX = 1000
KEEPALIVE_S = 15.0


@dataclass(eq=False)  # each page is its own client (hashed by identity)
class _Client:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    allow: Callable[[str, dict], bool]  # (kind, data) -> may this page see it
    overflowed: bool = False


class Hub:
    def __init__(self) -> None:
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """End every page's stream (the server is stopping)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.loop.call_soon_threadsafe(c.queue.put_nowait, None)
            except RuntimeError:
                pass

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """From any thread: hand ``data`` to every page allowed to see it."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                if c.allow(kind, data):
                    c.loop.call_soon_threadsafe(self._put, c, kind, data)
            except RuntimeError:  # its loop is closed: the page is gone
                self._drop(c)

    def _put(self, c: _Client, kind: str, data: dict) -> None:
        if c.queue.qsize() >= QUEUE_MAX - 1:  # one place kept for the stop
            c.overflowed = True
            return
        c.queue.put_nowait((kind, data))

    def _drop(self, c: _Client) -> None:
        with self._lock:
            self._clients.discard(c)

    async def stream(self, allow: Callable[[str, dict], bool],
                     disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        """The ``text/event-stream`` body for one page."""
        c = _Client(asyncio.Queue(QUEUE_MAX), asyncio.get_running_loop(), allow)
        with self._lock:
            self._clients.add(c)
        try:
            yield "retry: 1000\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(c.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    if await disconnected():
                        return
                    yield ": keepalive\n\n"
                    continue
                if item is None:  # the server is stopping
                    return
                kind, data = item
                if c.overflowed:
                    yield "event: reload\ndata: {}\n\n"
                    return
                yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
        finally:
            self._drop(c)
