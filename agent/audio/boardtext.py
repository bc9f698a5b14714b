"""Board text of audio items (docs/AUDIO.md, "Board text"): the text an item carries is shown
on the board while the item airs, through the board service handed to the audio service."""

from __future__ import annotations

import logging
import unicodedata
from typing import TYPE_CHECKING, Protocol

from agent.core.loop import Core

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


class LaterBoard:
    """TRANSITIONAL, until the assembly hands the board service to audio's ``install()``:
    agent/components.py installs audio before board and passes none, so this stands in for
    the board service installed on the core later, looked up at each call (no board service:
    texts are not shown, nothing to stop). Remove it with the ``core.audio`` line in
    :func:`agent.audio.service.install`."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def _board(self) -> Board | None:
        from agent.board import service as board_service

        return board_service.get(self._core)

    def show_audio_text(self, cmd_id: str, text: str, priority: str,
                        duration_s: float) -> bool:
        board = self._board()
        return board is not None and board.show_audio_text(cmd_id, text, priority, duration_s)

    def stop_id(self, cmd_id: str) -> bool:
        board = self._board()
        return board is not None and board.stop_id(cmd_id)

    def stop_all(self) -> list[str]:
        board = self._board()
        return board.stop_all() if board is not None else []
