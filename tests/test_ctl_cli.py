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


# --- send to a group: what it waits for, who answered -------------------------------------

def _signing(tmp_path: Path, keys) -> dict:
    from cryptography.hazmat.primitives import serialization

    key_file = tmp_path / "ctl.key"
    key_file.write_bytes(keys.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_file.chmod(0o600)
    return {"kid": keys.kid, "key_file": str(key_file)}


def test_send_to_a_group_says_what_it_waits_for_and_who_answered(broker, keys, tmp_path,
                                                                 agent_factory):
    from ctl.store import RelayStore
    from tests.conftest import agent_config, wait_online

    w = Watcher(broker.port, ["ttcs/+/+/status"])
    try:
        for device in (VICTIM, "krongpa-chuse-c01"):
            agent_factory(agent_config(tmp_path, broker.port, keys, device=device))
            wait_online(w, device)
    finally:
        w.close()
    db = tmp_path / "relay.db"
    store = RelayStore(str(db))
    for device, online in ((VICTIM, 1), ("krongpa-chuse-c01", None), ("krongpa-old-c07", 0),
                           ("other-c01", 1)):
        store.x("INSERT INTO devices(device, online, first_seen_ms) VALUES(?, ?, 0)", device,
                online)
    relay = {"db_path": str(db), "groups": {"krongpa": ["krongpa-*"]}}
    cfg = ctl_config(tmp_path, broker.port, signing=_signing(tmp_path, keys), relay=relay)
    out = ctl("--config", str(cfg), "send", "grp/krongpa", "ping", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    assert err[0] == ("grp/krongpa: waiting up to 30 s for acks from the 2 devices the relay's"
                      f" store lists in it (krongpa-chuse-c01, {VICTIM}); offline per the"
                      " relay, not waited for: krongpa-old-c07; others may answer too")
    assert err[1] == f"answered: krongpa-chuse-c01 done, {VICTIM} done"
    assert err[2].startswith("offline per the relay") and err[2].endswith("krongpa-old-c07")
    # a member the relay believes online that does not answer: named, exit 2
    store.x("INSERT INTO devices(device, online, first_seen_ms) VALUES(?, 1, 0)",
            "krongpa-silent-c08")
    store.close()
    out = ctl("--config", str(cfg), "send", "grp/krongpa", "ping", "--timeout", "4")
    assert out.returncode == 2, out.stderr
    assert "did not finish (online or unknown per the relay): krongpa-silent-c08" in out.stderr
    # no store: the size of the group is unknown, and it says so
    relay["db_path"] = str(tmp_path / "nowhere.db")
    cfg = ctl_config(tmp_path, broker.port, signing=_signing(tmp_path, keys), relay=relay)
    out = ctl("--config", str(cfg), "send", "grp/krongpa", "ping", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert "how many devices listen to a group is unknown (no relay store at" in out.stderr
    assert "stops 3 s after every device that answered has finished" in out.stderr
    assert f"answered: krongpa-chuse-c01 done, {VICTIM} done" in out.stderr
    assert "the group's size is unknown" in out.stderr


def test_the_wait_ends_when_the_known_members_have_finished():
    import queue
    import time

    from ctl.send import Group, _follow_acks

    class Feed:
        messages: queue.Queue = queue.Queue()

    for device in ("krongpa-a", "krongpa-b"):
        Feed.messages.put((f"ttcs/dev/{device}/ack",
                           json.dumps({"id": "c1", "stage": "done", "ts": 0}).encode(), False))
    start = time.monotonic()
    group = Group({"krongpa-a": True, "krongpa-b": None, "krongpa-c": False})
    assert _follow_acks(Feed, "c1", "grp/krongpa", 30, True, None, group, settle_s=3) == 0
    assert time.monotonic() - start < 1  # not the 3 s settle, not the 30 s timeout


# --- the README's controller section, as written -------------------------------------------

def test_the_readmes_controller_section_works_as_written(broker, tmp_path, agent_factory):
    """Run the README's commands with HOME in a temp folder; the only change is the broker's
    port. An agent trusting the key keygen printed answers the sends."""
    import os
    import re
    import signal
    import time

    from tests.conftest import Keys, agent_config, wait_online

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On the controller"):]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start:section.index("\n```", start)]
    block = block.replace("port: 1883", f"port: {broker.port}")
    lines = block.splitlines()
    first_send = next(i for i, ln in enumerate(lines) if ln.startswith("ttcs-ctl send"))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("TTCS_CTL_CONFIG", None)

    def sh(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euc", script], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    setup = sh("\n".join(lines[:first_send]))
    assert setup.returncode == 0, setup.stderr
    kid, pub = re.search(r'^\s+([\w.-]+): "([A-Za-z0-9+/=]+)"$', setup.stdout, re.M).groups()
    keys = Keys()
    keys.kid, keys.public_b64 = kid, pub
    w = Watcher(broker.port, ["ttcs/+/+/status"])
    try:
        agent_factory(agent_config(tmp_path, broker.port, keys, device=VICTIM))
        wait_online(w, VICTIM)
    finally:
        w.close()
    sends = [ln for ln in lines[first_send:] if ln.startswith("ttcs-ctl send")]
    assert len(sends) == 2
    for line in sends:
        out = sh(line, timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        assert re.search(rf"{VICTIM}\s+done", out.stdout), out.stdout
    [watch_line] = [ln for ln in lines[first_send:] if ln.startswith("ttcs-ctl watch")]
    live = subprocess.Popen(["bash", "-c", "exec " + watch_line.split("#")[0]], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4)
    live.send_signal(signal.SIGINT)
    out, err = live.communicate(timeout=20)
    assert live.returncode == 0, err
    assert VICTIM in out


# --- help, --config, a missing config -------------------------------------------------------

def test_help_is_plain_text():
    for args in ([], ["keygen"], ["pubkey"], ["send"], ["watch"], ["relay"], ["report"],
                 ["schedule"], ["schedule", "push"], ["board", "push"], ["version"]):
        out = ctl(*args, "--help")
        assert out.returncode == 0, out.stderr
        for markup in ("``", ":class:", ":func:", ":mod:", ":data:", ".. "):
            assert markup not in out.stdout, (args, markup, out.stdout)
    top = ctl("--help").stdout
    assert "~/.config/ttcs/ctl.yaml" in top and "config/ctl.example.yaml" in top


def test_config_before_or_after_the_command(broker, tmp_path):
    cfg = ctl_config(tmp_path, broker.port)
    before = ctl("--config", str(cfg), "watch", "--once", "0.5")
    after = ctl("watch", "--once", "0.5", "--config", str(cfg))
    both = ctl("--config", str(tmp_path / "nowhere.yaml"), "watch", "--config", str(cfg),
               "--once", "0.5")
    for out in (before, after, both):
        assert out.returncode == 0 and "0/0 online" in out.stdout, out.stderr
    push = ctl("schedule", "push", str(tmp_path / "s.yaml"), "--target", "grp/x",
               "--config", str(tmp_path / "nowhere.yaml"))
    assert push.returncode == 64 and f"no config file at {tmp_path}/nowhere.yaml" in push.stderr


def test_a_missing_config_says_where_and_how_to_start(tmp_path):
    import os

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("TTCS_CTL_CONFIG", None)
    out = ctl("send", "dev/krongpa-a1", "ping", env=env)
    assert out.returncode == 64 and "Traceback" not in out.stderr
    default = tmp_path / ".config" / "ttcs" / "ctl.yaml"
    assert f"no config file at {default} (the default path" in out.stderr
    assert "config/ctl.example.yaml" in out.stderr
    assert f"cp config/ctl.example.yaml {default}" in out.stderr
    named = ctl("watch", env={**env, "TTCS_CTL_CONFIG": str(tmp_path / "x.yaml")})
    assert f"no config file at {tmp_path}/x.yaml (given by $TTCS_CTL_CONFIG)" in named.stderr
    assert ctl("keygen", "--out", str(tmp_path / "k"), env=env).returncode == 0  # no config


def test_relay_without_the_controller_extras_says_what_to_install(tmp_path):
    cfg = tmp_path / "ctl.yaml"
    cfg.write_text(yaml.safe_dump({"relay": {"db_path": str(tmp_path / "relay.db")}}))
    # gmqtt made unimportable, as on a machine with ttcs-agent installed without [ctl]
    code = ("import sys; sys.modules['gmqtt'] = None; from ctl.main import main;"
            f" sys.exit(main(['--config', {str(cfg)!r}, 'relay']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 1, out.stderr
    assert "gmqtt is missing" in out.stderr and "ttcs-agent[ctl]" in out.stderr
    assert "Traceback" not in out.stderr
