"""``ttcs-ctl schedule push`` and ``board push`` against a real mosquitto and a real agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import protocol
from ctl import push
from tests.conftest import ROOT, Watcher, agent_config, wait_online, wait_until

DEV = "krongpa-phutuc-c03"
SCHEDULE = {"items": [{"id": "sang", "say": {"text": "Xin chào bà con", "lang": "vi"},
                       "days": ["mon", "tue"], "times": ["05:00"]}]}
BOARD = {"messages": [{"id": "m1", "text": "Lịch tiêm chủng thứ Bảy"}], "rotate_s": 10}


@pytest.fixture
def setup(broker, keys, tmp_path, agent_factory):
    keyfile = tmp_path / "ctl.key"
    from cryptography.hazmat.primitives import serialization

    keyfile.write_bytes(keys.private.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    keyfile.chmod(0o600)
    cfg = tmp_path / "ctl.yaml"
    cfg.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": broker.port},
                                   "signing": {"kid": keys.kid, "key_file": str(keyfile)}}))
    w = Watcher(broker.port, ["ttcs/#"])
    agent_factory(agent_config(tmp_path, broker.port, keys))
    wait_online(w, DEV)
    yield cfg, w, keys
    w.close()


def write(tmp_path: Path, name: str, doc: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return p


def ctl(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl", "--config", str(cfg), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def retained(w: Watcher, topic: str) -> dict:
    return json.loads([p for t, p, _ in w.messages if t == topic][-1])


def test_schedule_push_bumps_rev_signs_and_diffs(setup, tmp_path):
    cfg, w, keys = setup
    topic = f"ttcs/dev/{DEV}/desired/schedule"
    first = ctl(cfg, "schedule", "push", str(write(tmp_path, "s.yaml", SCHEDULE)),
                "--target", f"dev/{DEV}", "--rev", "5")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "rev (none) -> 5" in first.stdout and '+        "text": "Xin chào bà con"' in first.stdout
    doc = wait_until(lambda: retained(w, topic) if any(t == topic for t, *_ in w.messages)
                     else None, what="retained document")
    assert doc["rev"] == 5 and doc["type"] == "schedule" and doc["target"] == f"dev/{DEV}"
    env = protocol.parse_envelope(doc, "schedule")
    protocol.verify(env, protocol.load_public_keys({keys.kid: keys.public_b64}), True)
    assert env.signed
    assert f"{DEV}" in first.stdout  # the device's own verdict on rev 5
    ev = wait_until(lambda: [e for e in w.json(f"dev/{DEV}/event")
                             if e.get("type") == "schedule" and e.get("rev") == 5], what="event")
    assert ev[0]["result"] in first.stdout
    # the same content again: nothing to push
    same = ctl(cfg, "schedule", "push", str(tmp_path / "s.yaml"), "--target", f"dev/{DEV}")
    assert same.returncode == 0 and "nothing pushed" in same.stdout
    # a change: rev 6 and a readable diff against what is live
    changed = {"items": [{**SCHEDULE["items"][0], "times": ["05:00", "17:00"]}]}
    second = ctl(cfg, "schedule", "push", str(write(tmp_path, "s2.yaml", changed)),
                 "--target", f"dev/{DEV}", "--wait", "5")
    assert "rev 5 -> 6" in second.stdout, second.stdout + second.stderr
    assert '+        "17:00"' in second.stdout and f"--- live dev/{DEV}/schedule rev 5" in second.stdout
    assert '"text": "Xin chào bà con"' not in second.stdout.split("+++")[1].replace(' "text"', "")
    wait_until(lambda: retained(w, topic)["rev"] == 6, what="rev 6 retained")
    # a lower forced rev is refused
    low = ctl(cfg, "schedule", "push", str(write(tmp_path, "s3.yaml", SCHEDULE)),
              "--target", f"dev/{DEV}", "--rev", "3")
    assert low.returncode == 64 and "above the live rev 6" in low.stderr


def test_invalid_documents_are_not_published(setup, tmp_path):
    cfg, w, _ = setup
    bad = {"items": [{"id": "x", "say": {"text": "a"}, "days": ["funday"], "times": ["25:00"]}],
           "extra": 1}
    out = ctl(cfg, "schedule", "push", str(write(tmp_path, "bad.yaml", bad)),
              "--target", "grp/krongpa")
    assert out.returncode == 1
    assert "bad.yaml: items[0].days" in out.stderr and "bad.yaml: items[0].times[0]" in out.stderr
    assert "args.extra: unknown key" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("items: [\n  - id: x\n   bad")
    out = ctl(cfg, "board", "push", str(broken), "--target", f"dev/{DEV}")
    assert out.returncode == 1 and "broken.yaml:" in out.stderr
    out = ctl(cfg, "board", "push", str(write(tmp_path, "b.yaml", BOARD)), "--target", "nope")
    assert out.returncode == 64
    assert not any("/desired/" in t for t, *_ in w.messages)


def test_board_push_to_a_group_and_dry_run(setup, tmp_path):
    cfg, w, _ = setup
    path = write(tmp_path, "b.yaml", BOARD)
    dry = ctl(cfg, "board", "push", str(path), "--target", "grp/krongpa", "--dry-run")
    assert dry.returncode == 0 and "dry run" in dry.stdout and "Lịch tiêm chủng" in dry.stdout
    assert not any("/desired/" in t for t, *_ in w.messages)
    out = ctl(cfg, "board", "push", str(path), "--target", "grp/krongpa", "--devices", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = retained(w, "ttcs/grp/krongpa/desired/board")
    assert doc["args"] == BOARD and doc["rev"] > 1_700_000_000  # no live doc: Unix seconds
    assert f"{DEV}" in out.stdout and "applied" in out.stdout


def test_next_rev_and_diff_units():
    live = push.Live(7, {"items": []}, {})
    assert push.next_rev(live, None, 1_800_000_000) == 8
    assert push.next_rev(push.Live(None, None, None), None, 1_800_000_000) == 1_800_000_000
    with pytest.raises(push.PushError):
        push.next_rev(live, 7, 0)
    text = push.diff(live, {"items": [{"id": "a"}]}, "grp/x", "schedule")
    assert "+    {" in text and '-  "items": []' in text
    assert push.parse_live(b"not json", "schedule").rev is None
    assert push.parse_live(b'{"type":"board","rev":3}', "schedule").rev is None


def test_device_results_are_printed_as_text(capsys):
    from ctl.main import _print_results
    from ctl.session import EXIT_DONE, EXIT_FAILED

    seen = {"krongpa-a": {"result": "applied\nkrongpa-b applied", "reason": "\x1b[31mx"},
            "krongpa-b": {"result": "applied"}}
    assert _print_results(seen) == EXIT_FAILED
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['krongpa-a                    "applied krongpa-b a…" ("[31mx")',
                     "krongpa-b                    applied"]
    assert _print_results({"krongpa-b": {"result": "applied"}}) == EXIT_DONE
