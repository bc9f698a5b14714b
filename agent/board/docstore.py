"""Where the board's ``desired/board`` documents are kept between restarts (docs/BOARD.md):
``<state_dir>/board-docs/doc-<topic>.json``, byte for byte as received, atomically written,
verified again at boot. The schedule's store, in a folder of its own."""

from __future__ import annotations

from pathlib import Path

from agent.schedule.store import ScheduleStore

DOC_FOLDER = "board-docs"


class BoardDocStore(ScheduleStore):
    """The last applied board document of each topic, kept as received (re-verified at boot)."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.dir = Path(state_dir) / DOC_FOLDER
