"""``ttcs-ctl`` as a user runs it: a real process against a real mosquitto (and real agents
where the command talks to devices)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from tests.conftest import ROOT, Watcher

EVIL = "krongpa-evil-c09"
VICTIM = "krongpa-phutuc-c03"


def ctl(*args: str, timeout: float = 60, env: dict | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def ctl_config(tmp_path: Path, port: int, **extra) -> Path:
    path = tmp_path / "ctl.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": port}, **extra}))
    return path


# --- send: acks are device data ----------------------------------------------------------

def _answer_like_a_stolen_cabinet(w: Watcher, group: str) -> threading.Thread:
    def run():
        [cmd] = w.wait_for(lambda: w.json(f"grp/{group}/cmd"), 20, what="the command")
        acks = [{"stage": "received", "ts": "x"},
                {"stage": ["done"]},  # not a stage
                {"stage": "done", "ts": 10**15, "detail": ["x"], "device": VICTIM,
                 "reason": f"\x1b[2J\n12:00:00 {VICTIM} done"}]
        w.publish("ttcs/dev/Bad Name/ack", {"v": 1, "id": cmd["id"], "stage": "done"})
        for ack in acks:
            w.publish(f"ttcs/dev/{EVIL}/ack", {"v": 1, "id": cmd["id"], **ack})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_send_shows_hostile_acks_as_text(broker, tmp_path):
    cfg = ctl_config(tmp_path, broker.port)
    for as_json in (False, True):
        w = Watcher(broker.port, ["ttcs/grp/+/cmd"])
        try:
            t = _answer_like_a_stolen_cabinet(w, "krongpa")
            out = ctl("--config", str(cfg), "send", "grp/krongpa", "ping", "--unsigned",
                      "--timeout", "10", *(["--json"] if as_json else []))
            t.join(5)
        finally:
            w.close()
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and "\x1b" not in out.stdout
        lines = out.stdout.splitlines()
        assert len(lines) == 2, out.stdout
        if as_json:
            assert [json.loads(ln)["device"] for ln in lines] == [EVIL, EVIL]
        else:
            assert lines[0].startswith("??:??:?? krongpa-evil-c09") and " received" in lines[0]
            assert lines[1].split()[1:3] == [EVIL, "done"]
            assert f'"[2J 12:00:00 {VICTIM} done"' in lines[1]  # quoted, on its own line
