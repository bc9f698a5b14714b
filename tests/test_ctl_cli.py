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


# --- keygen and pubkey --------------------------------------------------------------------

def test_keygen_never_writes_through_a_planted_symlink(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    out_file = folder / "district.key"
    victim, planted = tmp_path / "readable-by-all.txt", tmp_path / "not-yet-there.txt"
    victim.write_text("x")
    victim.chmod(0o644)
    (folder / "district.key.tmp").symlink_to(victim)  # the old fixed temporary name
    done = ctl("keygen", "--out", str(out_file))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "x"  # the private key never went through the link
    assert (folder / "district.key.tmp").is_symlink()
    assert out_file.stat().st_mode & 0o777 == 0o600 and not out_file.is_symlink()
    assert b"PRIVATE KEY" in out_file.read_bytes()
    assert {p.name for p in folder.iterdir()} == {"district.key", "district.key.tmp"}
    # a dangling link at the fixed name: still not followed
    (folder / "district.key.tmp").unlink()
    (folder / "district.key.tmp").symlink_to(planted)
    assert ctl("keygen", "--out", str(out_file), "--force").returncode == 0
    assert not planted.exists()


def test_keygen_refuses_an_existing_key_and_pubkey_prints_its_public_key(tmp_path):
    key = tmp_path / "district.key"
    first = ctl("keygen", "--out", str(key), "--kid", "huyen-1")
    assert first.returncode == 0, first.stderr
    pub_line = next(ln for ln in first.stdout.splitlines() if "huyen-1:" in ln)
    before = key.read_bytes()
    again = ctl("keygen", "--out", str(key))
    assert again.returncode == 64 and key.read_bytes() == before
    assert f"ttcs-ctl pubkey {key}" in again.stderr and "--force" in again.stderr
    shown = ctl("pubkey", str(key), "--kid", "huyen-1")
    assert shown.returncode == 0, shown.stderr
    assert pub_line in shown.stdout.splitlines() and "PRIVATE" not in shown.stdout
    key.chmod(0o644)
    refused = ctl("pubkey", str(key))
    assert refused.returncode == 1 and "chmod 600" in refused.stderr
