"""Play records (docs/AUDIO.md, "Play records"): one ``play`` event per item, whatever happened
to it, built from the segments the arbiter closes (or, for an item the agent was airing when it
died, from what the airing journal kept: :meth:`PlayRecords.interrupted`); the final report of
the ``test`` command; and the ``silent_output`` alert from each measured segment.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from agent.audio.journal import INTERRUPTED, Interrupted
from agent.core.loop import Core

if TYPE_CHECKING:
    from agent.audio.prepare import Meta


def merge_levels(parts: list[dict], silence_dbfs: float) -> dict | None:
    """One verification summary from the segments' (power-average weighted by seconds)."""
    good = [p for p in parts if isinstance(p, dict) and "rms_dbfs" in p]
    if not good:
        errors = [p for p in parts if isinstance(p, dict) and p.get("error")]
        return errors[-1] if errors else None
    weights = [max(p.get("seconds") or 0.0, 0.1) for p in good]
    power = sum(w * 10 ** (p["rms_dbfs"] / 10)
                for w, p in zip(weights, good, strict=True)) / sum(weights)
    rms = round(10 * math.log10(power), 1) if power > 0 else -120.0
    return {"rms_dbfs": rms, "peak_dbfs": max(p["peak_dbfs"] for p in good),
            "seconds": round(sum(p.get("seconds") or 0 for p in good), 1),
            "silent": rms < silence_dbfs}


def with_extra(body: dict, extra: dict) -> dict:
    """``body`` plus the caller's ``extra`` fields that do not clash with its own."""
    return {**body, **{k: v for k, v in extra.items() if k not in body}}


class PlayRecords:
    """Sends the records through ``core.emit_event`` and the alert through ``core.set_alert``.
    ``meter``: the monitoring input (None without one: records carry no verification).
    A segment shorter than ``silent_min_ms`` proves nothing about silence."""

    def __init__(self, core: Core, meter: Any, *, silent_min_ms: int) -> None:
        self.core = core
        self.meter = meter
        self.silent_min_ms = silent_min_ms
        self.last_level: float | None = None  # the last measured segment's, for health

    def segment(self, meta: Meta | None, record: dict) -> None:
        """A segment closed: kept on its item until the item's final stage (one event per
        item); one of an item the service does not know is sent as it is."""
        if meta is None:
            self.core.emit_event({"type": "play", **record})
            return
        meta.segments.append(record)
        self._check_silence(record)

    def aired(self, meta: Meta, result: str) -> None:
        """The item's record, from its segments (then dropped)."""
        body = self._body(meta.id, meta.origin, meta.volume, meta.segments, result)
        if "detail" in meta.segments[-1]:
            body["detail"] = meta.segments[-1]["detail"]
        if meta.relay is not None:
            body["live"] = meta.relay.report()
        meta.segments = []
        self.core.emit_event(with_extra(body, meta.extra))

    def interrupted(self, item: Interrupted) -> None:
        """The record of an item the agent was airing when it last died (a power cut, a
        crash), from what the airing journal kept: ``result: "interrupted"``, ``ended`` and
        the last segment's end the last moment known."""
        body = self._body(item.id, item.origin, item.volume, item.segments, INTERRUPTED)
        body["ended"] = max(body["ended"], item.ended)
        self.core.emit_event(with_extra(body, item.extra))

    def _body(self, item_id: str, origin: str, volume: int | None, segs: list[dict],
              result: str) -> dict:
        last = segs[-1]
        body = {"type": "play", "id": item_id, "origin": origin, "kind": last["kind"],
                "media": last["media"], "priority": last["priority"],
                "started": segs[0]["started"], "ended": last["ended"], "result": result,
                "played_ms": sum(s["played_ms"] for s in segs),
                "requested_ms": last["requested_ms"], "repeat": last["repeat"],
                "volume": volume,
                "preemptions": sum(1 for s in segs if s["result"] == "preempted"),
                "segments": [{k: s.get(k) for k in ("started", "ended", "played_ms", "result")}
                             for s in segs]}
        if self.meter is not None:
            body["verification"] = self._verification(segs)
        return body

    def not_aired(self, meta: Meta, reason: str, message: str) -> None:
        """The record of a scheduled item that could not be prepared (no command to ack)."""
        self.core.emit_event(with_extra(
            {"type": "play", "id": meta.id, "origin": meta.origin, "kind": meta.kind,
             "result": "failed", "reason": reason, "detail": {"message": message},
             "played_ms": 0}, meta.extra))

    def test_report(self, meta: Meta, *, output: str, audio_ok: bool, amplifier: dict) -> dict:
        """What ``test`` reports in its final ack: output, amplifier, verification, verdict."""
        segs = meta.segments
        played = sum(s["played_ms"] for s in segs)
        ver = self._verification(segs) if self.meter is not None else None
        if ver is None or "rms_dbfs" not in ver:
            verdict = "unverified"
        else:
            verdict = "fail" if ver["silent"] else "pass"
        return {"output": output, "audio_ok": audio_ok, "played_ms": played,
                "requested_ms": segs[-1]["requested_ms"] if segs else None,
                "amplifier": amplifier, "verification": ver, "verdict": verdict}

    def _verification(self, segs: list[dict]) -> dict | None:
        return merge_levels([s.get("verification") for s in segs], self.meter.silence_dbfs)

    def _check_silence(self, record: dict) -> None:
        ver = record.get("verification")
        if not isinstance(ver, dict) or "rms_dbfs" not in ver:
            return
        self.last_level = ver["rms_dbfs"]
        if record["played_ms"] >= self.silent_min_ms:
            self.core.set_alert("silent_output", bool(ver["silent"]),
                                {"rms_dbfs": ver["rms_dbfs"], "id": record["id"]}
                                if ver["silent"] else None)
