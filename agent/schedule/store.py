"""Schedule persistence in the state dir: last good document per topic, and the slot log.

Layout under ``<state_dir>/schedule/``:

- ``doc-<topic percent-encoded>.json``, one per topic: ``{"v": 1, "topic", "rev",
  "envelope_b64"}``. The envelope is kept byte for byte as received, so the agent re-verifies
  its signature at boot instead of trusting a file on an SD card.
- ``slots.json``: the keys of slots already aired or skipped, with their due time, and the
  wall time up to which the planner has decided every slot (``checked_until_ms``). This is what
  makes a restart, a repeated call or a clock stepping back never air a slot twice.

Every write goes through :func:`drivers.fsutil.atomic_write`: a power cut leaves the old or the
new file, never half of one. A corrupt file is logged and ignored, never raised.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from drivers.fsutil import atomic_write

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
DOC_PREFIX = "doc-"
DOC_SUFFIX = ".json"
SLOT_LOG_NAME = "slots.json"

AIRED = "aired"
SKIPPED = "skipped"
_OUTCOME_CODES = {AIRED: "a", SKIPPED: "s"}
_CODE_OUTCOMES = {v: k for k, v in _OUTCOME_CODES.items()}


def topic_filename(topic: str) -> str:
    """A file name for ``topic`` that cannot escape the folder: ``grp/krongpa`` ->
    ``doc-grp%2Fkrongpa.json``. The prefix keeps ``.`` and ``..`` harmless."""
    return f"{DOC_PREFIX}{quote(topic, safe='')}{DOC_SUFFIX}"


def filename_topic(name: str) -> str | None:
    if not (name.startswith(DOC_PREFIX) and name.endswith(DOC_SUFFIX)):
        return None
    return unquote(name[len(DOC_PREFIX):-len(DOC_SUFFIX)])


class ScheduleStore:
    """The last applied schedule document of each topic, as received."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir) / "schedule"

    def save(self, topic: str, rev: int, envelope: bytes) -> None:
        """Store a document after it was applied (an empty-items document too: its rev must
        survive a reboot, or an older document could be replayed after it)."""
        record = {
            "v": 1,
            "topic": topic,
            "rev": rev,
            "envelope_b64": base64.b64encode(envelope).decode("ascii"),
        }
        atomic_write(self.dir / topic_filename(topic), json.dumps(record).encode())

    def delete(self, topic: str) -> None:
        try:
            (self.dir / topic_filename(topic)).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> dict[str, tuple[int, bytes]]:
        """topic -> (rev, envelope bytes) for every readable document file."""
        if not self.dir.is_dir():
            return {}
        docs: dict[str, tuple[int, bytes]] = {}
        for path in sorted(self.dir.iterdir()):
            if filename_topic(path.name) is None:
                continue  # temp files of an interrupted write, the slot log, strangers
            loaded = self._load(path)
            if loaded is not None:
                topic, rev, envelope = loaded
                docs[topic] = (rev, envelope)
        return docs

    @staticmethod
    def _load(path: Path) -> tuple[str, int, bytes] | None:
        try:
            record = json.loads(path.read_bytes())
            topic, rev = record["topic"], record["rev"]
            envelope = base64.b64decode(record["envelope_b64"], validate=True)
        except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
            log.warning("schedule store: ignoring unreadable %s: %s", path, e)
            return None
        if not isinstance(topic, str) or type(rev) is not int:
            log.warning("schedule store: ignoring %s: bad topic or rev", path)
            return None
        if topic_filename(topic) != path.name:
            log.warning("schedule store: ignoring %s: names topic %r", path, topic)
            return None
        return topic, rev, envelope


@dataclass
class SlotEntry:
    due_ms: int
    outcome: str  # AIRED | SKIPPED


class SlotLog:
    """Keys of slots already decided (aired or skipped), bounded to the last ``keep_days``.

    With ``path=None`` it lives in memory only (tests, or a planner nobody persists).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        keep_days: int = 14,
        max_entries: int = 50_000,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.keep_ms = keep_days * DAY_MS
        self.max_entries = max_entries
        self.entries: dict[str, SlotEntry] = {}
        self.checked_until_ms: int | None = None
        self._dirty = False
        if self.path is not None:
            self._load()

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike, **kw) -> SlotLog:
        return cls(Path(state_dir) / "schedule" / SLOT_LOG_NAME, **kw)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def outcome(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry.outcome if entry else None

    def mark(self, key: str, due_ms: int, outcome: str) -> None:
        if outcome not in _OUTCOME_CODES:
            raise ValueError(f"outcome must be {AIRED!r} or {SKIPPED!r}")
        self.entries[key] = SlotEntry(due_ms, outcome)
        self._dirty = True

    def prune(self, now_ms: int) -> None:
        """Forget slots due more than ``keep_days`` before now, and the oldest beyond
        ``max_entries``. The planner never looks back further than a day, so this is ample."""
        cutoff = now_ms - self.keep_ms
        kept = {k: e for k, e in self.entries.items() if e.due_ms >= cutoff}
        if len(kept) > self.max_entries:
            newest = sorted(kept.items(), key=lambda kv: kv[1].due_ms)[-self.max_entries:]
            kept = dict(newest)
        if len(kept) != len(self.entries):
            self.entries = kept
            self._dirty = True

    def save(self) -> None:
        """Write the log if anything changed since the last save (SD cards wear out)."""
        if self.path is None or not self._dirty:
            self._dirty = False
            return
        slots = {k: [e.due_ms, _OUTCOME_CODES[e.outcome]] for k, e in self.entries.items()}
        data = {"v": 1, "checked_until_ms": self.checked_until_ms, "slots": slots}
        atomic_write(self.path, json.dumps(data, separators=(",", ":")).encode())
        self._dirty = False

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("slot log %s unreadable, starting empty: %s", self.path, e)
            return
        self.entries = _parse_slots(data.get("slots") if isinstance(data, dict) else None)
        checked = data.get("checked_until_ms") if isinstance(data, dict) else None
        self.checked_until_ms = checked if type(checked) is int else None


def _parse_slots(raw: object) -> dict[str, SlotEntry]:
    if not isinstance(raw, dict):
        return {}
    entries: dict[str, SlotEntry] = {}
    for key, value in raw.items():
        if (
            isinstance(value, list)
            and len(value) == 2
            and type(value[0]) is int
            and value[1] in _CODE_OUTCOMES
        ):
            entries[key] = SlotEntry(value[0], _CODE_OUTCOMES[value[1]])
    return entries
