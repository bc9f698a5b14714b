"""Kept events and the ``resend`` command (docs/PROTOCOL.md, "Resend").

The store keeps every event as first stored (table ``kept``, written in the same transaction
as the event's outbox row: no extra write to the card). A controller that finds a gap in a
device's ``seq`` sends ``resend`` with ``{"from_seq", "to_seq"}``; the device publishes again,
through the outbox, each event of that range it still holds, with ``"resent": true`` added
(otherwise the same body), and answers ``done`` with ``detail: {"sent": n, "missing": [[lo,
hi], ...], "last_seq": N}``: the ranges it no longer holds (pruned after
``outbox.keep_days`` or above ``outbox.keep_max_mb``) and the last seq it has given. Seqs above
``last_seq`` are not made yet: neither sent nor missing (so a controller may ask past the end
to find events lost at the tail).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from agent.args import Int, Obj, Problems, problems
from agent.protocol import Envelope

log = logging.getLogger(__name__)

MAX_SPAN = 1000  # seqs per resend command
PRUNE_EVERY_S = 600
SEQ = Int(lo=1, hi=2**53)


def _span(obj: dict, path: str, errors: Problems) -> None:
    lo, hi = obj.get("from_seq"), obj.get("to_seq")
    if not (isinstance(lo, int) and isinstance(hi, int)):
        return
    if hi < lo:
        errors.append((f"{path}.to_seq", "must not be below from_seq"))
    elif hi - lo + 1 > MAX_SPAN:
        errors.append((f"{path}.to_seq", f"at most {MAX_SPAN} seqs per command"))


RESEND_ARGS = Obj(fields={"from_seq": SEQ, "to_seq": SEQ}, required=("from_seq", "to_seq"),
                  rules=(_span,), shape='{"from_seq": N, "to_seq": M}')


def missing_ranges(lo: int, hi: int, have: list[int]) -> list[list[int]]:
    """The ranges of ``lo..hi`` not in ``have`` (sorted seqs within it)."""
    out: list[list[int]] = []
    nxt = lo
    for seq in have:
        if seq > nxt:
            out.append([nxt, seq - 1])
        nxt = seq + 1
    if nxt <= hi:
        out.append([nxt, hi])
    return out


class SentLog:
    """The ``resend`` command and the pruning of kept events, on the core thread."""

    def __init__(self, core: Any, keep_days: float, keep_max_mb: float) -> None:
        self.core = core
        self.store = core.store
        self.keep_ms = int(keep_days * 86_400_000)
        self.max_bytes = int(keep_max_mb * 1024 * 1024)
        self.resent = 0
        self.pruned = 0

    def validate(self, args: dict) -> list[str]:
        return problems(RESEND_ARGS, args)

    def execute(self, env: Envelope) -> None:
        if not env.target.startswith("dev/"):  # seqs are per device: no group has a range
            self.core.ack(env.id, "failed", "bad_args",
                          {"message": "resend targets one device (dev/ID), not a group"})
            return
        lo, hi = env.args["from_seq"], env.args["to_seq"]
        self.prune()  # what is past the keep window is reported missing, not sent
        rows = self.store.kept_range(lo, hi)
        for _seq, topic, payload, kind in rows:
            body = {**json.loads(payload), "resent": True}
            self.core.outbox.add(topic, body, kind=kind)
        self.resent += len(rows)
        last = self.store.last_seq  # seqs above it are not made yet: neither sent nor missing
        missing = missing_ranges(lo, min(hi, last), [r[0] for r in rows]) if lo <= last else []
        if missing:
            log.info("resend %d..%d: %d sent, no longer held: %s", lo, hi, len(rows), missing)
        self.core.ack(env.id, "done", detail={"sent": len(rows), "missing": missing,
                                              "last_seq": last})

    def prune(self) -> None:
        dropped = self.store.kept_prune(self.core.clock.now_ms() - self.keep_ms, self.max_bytes)
        if dropped:
            self.pruned += dropped
            log.info("kept events: %d dropped (older than the keep window or above its size)",
                     dropped)


def install(core: Any, cfg: dict) -> SentLog:
    out = cfg["outbox"]
    log_ = SentLog(core, float(out["keep_days"]), float(out["keep_max_mb"]))
    core.register_command("resend", log_)
    core.call_every(PRUNE_EVERY_S, log_.prune, first_s=5)
    return log_
