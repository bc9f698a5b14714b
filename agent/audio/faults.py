"""Output and amplifier faults (docs/AUDIO.md, "Health, state, alerts"): ``audio_fault`` (an
output failure or an unusable device; cleared when the device is back — polled — or the next
item starts) and ``amplifier_fault`` (the fault input or a relay write error)."""

from __future__ import annotations

import logging

from agent.audio.amplifier import Amplifier
from agent.core.loop import Core
from drivers.audio.base import AudioOutput

log = logging.getLogger(__name__)


class Faults:
    """Raises and clears the two alerts through ``core.set_alert``. Core thread only."""

    def __init__(self, core: Core, output: AudioOutput, amp: Amplifier) -> None:
        self.core = core
        self.output = output
        self.amp = amp
        self._fault: str | None = None  # last output failure, cleared by a good start
        self._output_ok = True

    @property
    def audio_ok(self) -> bool:
        return self._output_ok and self._fault is None

    def check(self, busy: bool) -> None:
        """Poll the output and amplifier (``busy``: something airs, so a fault it had is not
        cleared by the poll: the end of the item tells)."""
        try:
            self._output_ok = bool(self.output.ok())
        except Exception as e:  # noqa: BLE001
            self._output_ok = False
            log.warning("audio output check failed: %s", e)
        if self._output_ok and self._fault and not busy:
            self._fault = None  # recovered; the next play proves it
        self._push_audio_alert()
        if self.amp.fault_pin is not None or self.amp.relay_error:
            fault = bool(self.amp.fault()) or bool(self.amp.relay_error)
            self.core.set_alert("amplifier_fault", fault,
                                {"error": self.amp.relay_error} if fault else None)

    def output_failed(self, error: str | None) -> None:
        """The output failed (``error``), or started an item (None: it works)."""
        self._fault = error
        if error is not None:
            self._output_ok = bool(self.output.ok())
        self._push_audio_alert()

    def _push_audio_alert(self) -> None:
        ok = self.audio_ok
        detail = None if ok else {
            "error": self._fault or self.output.last_error or "output device unavailable"}
        self.core.set_alert("audio_fault", not ok, detail)
