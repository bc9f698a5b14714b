"""Ranges of a device's event ``seq``: the one definition of what is missing (docs/CTL.md,
"Missing events"). A seq is *covered* when its event is stored (``events``) or recorded lost
(``seq_lost``: the device said it no longer holds it); everything else up to the highest
covered seq (or the device's own newest, ``seq_top``) is *missing*. Pure functions over sorted
ranges; the store runs the queries (:meth:`ctl.store.RelayStore.missing_seqs`)."""

from __future__ import annotations

SPAN = 1000  # seqs per resend command (the device refuses more)


def covered_ranges(seqs: list[int], lost: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``seqs`` (sorted) and ``lost`` ranges merged into sorted, disjoint ranges."""
    ivs = sorted([(s, s) for s in seqs] + [(r[0], r[1]) for r in lost])
    out: list[tuple[int, int]] = []
    for lo, hi in ivs:
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def holes(start: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges after ``start`` not covered, up to the highest covered seq, at most
    :data:`SPAN` long each."""
    out: list[tuple[int, int]] = []
    nxt = start + 1
    for lo, hi in covered:
        if hi < nxt:
            continue
        for a in range(nxt, lo, SPAN):
            out.append((a, min(a + SPAN - 1, lo - 1)))
        nxt = max(nxt, hi + 1)
    return out
