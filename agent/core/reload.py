"""Applying a reloaded config (SIGHUP): every changed key applies at once or needs a restart.

Whoever can apply a key while running registers a hook for it (:meth:`Reloader.on_reload`,
reached through ``Core.on_reload``): the core for its own keys, each service for what it holds
(the audio service, for one, copies ``security.media_hosts`` into its media cache at start).
A changed key that no hook claims, or whose hook raised, is reported as needing a restart,
by its full path (``mqtt.port``, not ``mqtt``), and keeps its old value in the running config.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Path = tuple[str, ...]
Hook = Callable[[dict], None]


def changed_keys(old: Any, new: Any, path: Path = ()) -> list[Path]:
    """The paths of the leaves that differ between two configs (a mapping on both sides is
    compared key by key, anything else as a whole; keys starting with ``_`` are not config)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Path] = []
        for key in sorted(set(old) | set(new), key=str):
            if str(key).startswith("_"):
                continue
            if key not in old or key not in new:
                out.append((*path, key))
            else:
                out += changed_keys(old[key], new[key], (*path, key))
        return out
    return [] if old == new else [path]


def dotted(path: Path) -> str:
    return ".".join(path)


def copy_key(dst: dict, src: dict, path: Path) -> None:
    """Set ``path`` in ``dst`` to its value in ``src`` (or remove it), in place: the parts
    that hold the config dict see the new value."""
    for key in path[:-1]:
        dst, src = dst[key], src[key]
    if path[-1] in src:
        dst[path[-1]] = copy.deepcopy(src[path[-1]])
    else:
        dst.pop(path[-1], None)


class Reloader:
    def __init__(self) -> None:
        self._hooks: list[tuple[tuple[Path, ...], Hook]] = []

    def on_reload(self, keys: Iterable[str], fn: Hook) -> None:
        """Call ``fn(new_cfg)`` (core thread) when a key under one of ``keys`` (dotted paths:
        ``"security.media_hosts"``, or a whole section ``"alerts"``) changed; ``fn`` applies
        what it holds. It may raise: its keys are then reported as needing a restart."""
        self._hooks.append((tuple(tuple(k.split(".")) for k in keys), fn))

    def apply(self, cfg: dict, new: dict) -> tuple[list[str], list[str]]:
        """Run the hooks concerned, copy what they applied into ``cfg``; return the applied
        and the restart-needing keys, dotted."""
        changed = changed_keys(cfg, new)
        applied: set[Path] = set()
        failed: set[Path] = set()
        for prefixes, fn in self._hooks:
            mine = [p for p in changed if any(p[:len(k)] == k for k in prefixes)]
            if not mine:
                continue
            try:
                fn(new)
            except Exception:
                log.exception("config reload: applying %s failed",
                              ", ".join(map(dotted, mine)))
                failed.update(mine)
            else:
                applied.update(mine)
        applied -= failed
        for path in sorted(applied):
            copy_key(cfg, new, path)
        return ([dotted(p) for p in sorted(applied)],
                [dotted(p) for p in changed if p not in applied])
