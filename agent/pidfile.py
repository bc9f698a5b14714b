"""The agent's pid file, ``state_dir/agent.pid``, and whether a process id is alive.

:mod:`agent.app` writes the file at start and removes it at exit; ``ttcs-agent status`` and
``doctor`` ask :func:`pid_alive` about the pid the core puts in ``status.json``.
"""

from __future__ import annotations

import os

PID_FILE = "agent.pid"


def pid_path(state_dir: str) -> str:
    return os.path.join(state_dir, PID_FILE)


def write_pid(state_dir: str) -> None:
    with open(pid_path(state_dir), "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid(state_dir: str) -> None:
    try:
        os.unlink(pid_path(state_dir))
    except FileNotFoundError:
        pass


def pid_alive(pid: object) -> bool:
    """Whether a process ``pid`` exists (one of another user counts); False for a non-int."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
