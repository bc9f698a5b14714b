"""SIGTERM and SIGINT as a request to stop, for the long-running ``ttcs-ctl`` processes
(relay, serve). Installed first thing, before anything that answers the outside world starts,
so a stop that comes early is a clean stop too, never the default handler's abrupt end."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: list[int] = []

    def install(self) -> StopSignals:
        """Take SIGTERM and SIGINT (main thread only, as Python's signals are)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        self.event.set()

    def why(self, otherwise: str) -> str:
        """What stopped the process, for the log."""
        return f"{signal.Signals(self.received[0]).name} received" if self.received \
            else otherwise
