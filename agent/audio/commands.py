"""The arguments of the audio commands (SPEC §7, docs/AUDIO.md): ``play``, ``live``, ``say``,
``stop``, ``volume`` and ``test``.

Each ``validate_*`` returns every problem as ``args.key: what`` (empty: valid), checked by the
shared rules of :mod:`agent.args`: a value refused here is refused in the same words inside a
schedule item or a board command. The audio service registers them with the core, which
answers ``bad_args`` before anything happens.
"""

from __future__ import annotations

from dataclasses import replace

from agent import args as a
from agent.args import Obj, problems

PLAY = Obj(required=("media",), fields={
    "media": a.MEDIA, "priority": a.PRIORITY, "volume": a.VOLUME, "repeat": a.REPEAT,
    "at": a.At(), "board_text": a.BOARD_TEXT})
LIVE = Obj(required=("url",), fields={
    **a.LIVE, "priority": a.PRIORITY, "volume": a.VOLUME, "duration_s": a.DURATION,
    "board_text": a.BOARD_TEXT})
SAY = Obj(required=("text",), fields={
    "text": a.SAY_TEXT, "lang": a.LANG, "priority": a.PRIORITY, "repeat": a.REPEAT,
    "volume": a.VOLUME, "at": a.At(), "board_text": a.BOARD_TEXT})
STOP = Obj(fields={"id": a.ID, "all": a.IsTrue()}, rules=(a.at_most_one("id", "all"),))
VOLUME = Obj(required=("level",), fields={"level": a.VOLUME})
TEST = Obj(fields={"priority": a.PRIORITY, "volume": a.VOLUME,
                   "duration_s": a.Int(lo=1, hi=10)})  # the tone's length


def validate_play(args: dict, now_ms: int | None = None) -> list[str]:
    """``at`` is checked against ``now_ms`` (at most 7 days ahead) when given."""
    schema = PLAY if now_ms is None else replace(PLAY, fields={**PLAY.fields,
                                                               "at": a.At(now_ms=now_ms)})
    return problems(schema, args)


def validate_live(args: dict) -> list[str]:
    return problems(LIVE, args)


def validate_say(args: dict, now_ms: int | None = None) -> list[str]:
    """``at`` as for ``play``: a CAP alert's future onset (docs/CAP.md)."""
    schema = SAY if now_ms is None else replace(SAY, fields={**SAY.fields,
                                                             "at": a.At(now_ms=now_ms)})
    return problems(schema, args)


def validate_stop(args: dict) -> list[str]:
    return problems(STOP, args)


def validate_volume(args: dict) -> list[str]:
    return problems(VOLUME, args)


def validate_test(args: dict) -> list[str]:
    return problems(TEST, args)
