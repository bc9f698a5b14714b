"""agent.pidfile: the pid file the agent leaves in state_dir, and the liveness check."""

from __future__ import annotations

import os
import subprocess
import sys

from agent.pidfile import pid_alive, pid_path, remove_pid, write_pid


def test_write_and_remove_the_pid_file(tmp_path):
    write_pid(str(tmp_path))
    assert pid_path(str(tmp_path)) == str(tmp_path / "agent.pid")
    assert (tmp_path / "agent.pid").read_text() == f"{os.getpid()}\n"
    remove_pid(str(tmp_path))
    assert not (tmp_path / "agent.pid").exists()
    remove_pid(str(tmp_path))  # already gone: no error


def test_pid_alive():
    assert pid_alive(os.getpid())
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert not pid_alive(int(done.stdout))  # reaped: no such process (pids are not reused fast)
    assert not pid_alive(None) and not pid_alive("42")
