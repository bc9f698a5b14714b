"""Where versions live and which one runs (docs/UPDATE.md, docs/DEPLOY.md).

``PREFIX/venvs/NAME/`` one venv per installed version; ``PREFIX/venv`` → ``venvs/NAME``, the
current one, switched with one ``rename`` of a new symlink over it; ``PREFIX/update.json`` the
update in progress, shared with the boot guard (``scripts/boot-guard``, which belongs to
neither version and reads only this file and the link). Its ``state``:

- ``probation``: switched to ``to``; the boot guard counts ``starts`` and switches back to
  ``from`` once ``max_failed_starts`` starts passed without a commit;
- ``rollback``: the new version gave up (never connected); the guard switches back at once;
- ``rolled_back``: the guard switched back; the old version reports it (``reported``);
- ``committed``: the new version held a healthy core for ``probation_s``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from drivers.fsutil import atomic_write, fsync_dir


class Layout:
    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        self.venvs = self.prefix / "venvs"
        self.link = self.prefix / "venv"
        self.record_path = self.prefix / "update.json"
        self.downloads = self.prefix / "downloads"

    def current(self) -> str | None:
        """The link's target, ``venvs/NAME``; None when it is not a link."""
        try:
            return os.readlink(self.link)
        except OSError:
            return None

    def running(self) -> str | None:
        """``venvs/NAME`` of the interpreter running this code, when it is one of ours."""
        import sys

        here = Path(sys.prefix).resolve()
        if here.parent == self.venvs.resolve():
            return f"venvs/{here.name}"
        return None

    def switch(self, target: str) -> None:
        """Point the link at ``target`` (``venvs/NAME``): a new link renamed over the old."""
        tmp = self.prefix / "venv.new"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, self.link)
        fsync_dir(self.prefix)

    def read(self) -> dict | None:
        try:
            body = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def write(self, record: dict) -> None:
        atomic_write(self.record_path, json.dumps(record, indent=1).encode())

    def installed(self) -> list[str]:
        """Names of the venvs, oldest first (by modification time)."""
        try:
            dirs = [d for d in self.venvs.iterdir() if d.is_dir()]
        except OSError:
            return []
        return [d.name for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]

    def prune(self, keep_old: int, *protected: str | None) -> list[str]:
        """Remove all but the current venv, ``protected`` ones and the ``keep_old`` newest
        others. Return the names removed."""
        keep = {Path(p).name for p in (self.current(), *protected) if p}
        others = [n for n in self.installed() if n not in keep]
        doomed = others[:max(0, len(others) - keep_old)]
        for name in doomed:
            shutil.rmtree(self.venvs / name, ignore_errors=True)
        return doomed

    def describe(self, in_progress: dict | None = None) -> dict:
        """Running and previous versions, any update in progress (``in_progress``: the
        running agent's own, queued or downloading), the last one's outcome: for the state
        snapshot, ``ttcs-agent status`` and ``doctor``."""
        running = self.running() or self.current()
        name = Path(running).name if running else None
        rec = self.read() or {}
        failed = Path(rec["to"]).name if rec.get("state") == "rolled_back" and rec.get("to") \
            else None  # kept for a look, not a version to go back to
        others = [n for n in self.installed() if n not in (name, failed)]
        if in_progress is None and rec.get("state") in ("probation", "rollback"):
            in_progress = {"id": rec.get("id"), "version": rec.get("version"),
                           "phase": rec["state"], "starts": rec.get("starts")}
        out = {"running": name, "previous": others[-1] if others else None,
               "in_progress": in_progress}
        if rec.get("state") in ("committed", "rolled_back"):
            out["last"] = {k: rec.get(k) for k in ("version", "state", "why", "id")}
        return out
