"""Board text of audio items (docs/AUDIO.md, "Board text"): the text an item carries is shown
on the board while the item airs, through the board service handed to the audio service."""

from __future__ import annotations

import logging
import unicodedata
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.audio.prepare import Meta

log = logging.getLogger(__name__)


class Board(Protocol):
    """What the audio service needs of the board service (:mod:`agent.board.service`)."""

    def show_audio_text(self, cmd_id: str, text: str, priority: str,
                        duration_s: float) -> bool: ...
    def stop_id(self, cmd_id: str) -> bool: ...
    def stop_all(self) -> list[str]: ...


def board_cut(text: str, limit: int) -> str:
    """A spoken text for the board: NFC, cut to ``limit`` characters with an ellipsis."""
    text = unicodedata.normalize("NFC", text).strip()
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def follow(board: Board | None, meta: Meta, stage: str, final: bool, max_s: float) -> bool:
    """Keep ``meta``'s board text up while it airs: shown at ``started``/``resumed`` (for at
    most ``max_s`` of board time), withdrawn when it is preempted or ends (``final``).
    Returns whether it is on the board; a board error is logged, never raised."""
    if board is None:
        return False
    try:
        if stage in ("started", "resumed"):
            meta.on_board = board.show_audio_text(meta.id, meta.board_text, meta.priority,
                                                  max_s)
        elif (final or stage == "preempted") and meta.on_board:
            meta.on_board = False
            board.stop_id(meta.id)
    except Exception:  # a board bug must not stop the audio
        log.exception("board text of %s failed", meta.id)
    return meta.on_board
