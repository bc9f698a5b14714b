"""A small thread pool that runs jobs by priority, with workers kept for the urgent ones.

An emergency download or text-to-speech job must never wait behind normal ones: two normal
downloads from a trickling host, held until their deadline, would otherwise fill a pool of two
workers. :class:`Lanes` takes jobs in priority order — emergency, then priority, then normal;
first come, first served within a lane — on ``workers`` shared threads, plus one thread that
takes emergency jobs only and one that takes priority or emergency jobs (:data:`RESERVED`).
So a priority job never waits behind a normal one, and an emergency job waits only when other
emergency jobs hold every thread it may use.

Its ``submit``/``shutdown`` are those of :class:`concurrent.futures.Executor`, with the lane
as the keyword ``lane`` (default normal). Threads start at the first job; they are daemons,
so a job stuck at shutdown (a download until its deadline) never holds the agent's exit.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from agent.protocol import Priority

# One extra worker per entry, taking only jobs of that lane or a more urgent one.
RESERVED: tuple[Priority, ...] = (Priority.EMERGENCY, Priority.PRIORITY)

_Job = tuple[int, int, Future, Callable[..., Any], tuple]


class Lanes:
    def __init__(self, workers: int, *, name: str,
                 reserved: Sequence[Priority] = RESERVED) -> None:
        self.name = name
        self._floors = [Priority.NORMAL] * workers + list(reserved)
        self._queue: list[_Job] = []  # a heap: (lane order, arrival, ...)
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               lane: Priority = Priority.NORMAL) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            heapq.heappush(self._queue, (lane.order, next(self._arrivals), fut, fn, args))
            if not self._threads:
                self._start()
            self._cond.notify_all()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; with ``cancel_futures`` the waiting ones are cancelled, else run.
        Idempotent."""
        with self._cond:
            self._closed = True
            if cancel_futures:
                for job in self._queue:
                    job[2].cancel()
                self._queue.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    def _start(self) -> None:
        for i, floor in enumerate(self._floors):
            thread = threading.Thread(target=self._work, args=(floor,), daemon=True,
                                      name=f"{self.name}-{floor}-{i}")
            thread.start()
            self._threads.append(thread)

    def _take(self, floor: Priority) -> _Job | None:
        """The most urgent waiting job, if this worker may run it; None at shutdown."""
        with self._cond:
            while True:
                if self._queue and self._queue[0][0] <= floor.order:
                    return heapq.heappop(self._queue)
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self, floor: Priority) -> None:
        while (job := self._take(floor)) is not None:
            _, _, fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - as concurrent.futures: the caller's
                fut.set_exception(e)
            else:
                fut.set_result(result)
