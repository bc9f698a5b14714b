"""Kept events and the ``resend`` command (agent/core/sentlog.py), with the core's fakes."""

from __future__ import annotations

import json

from agent import protocol
from agent.core import sentlog
from agent.core.store import Store, encode
from tests.conftest import Keys
from tests.fakes import make_core

CMD = "ttcs/dev/dev-1/cmd"


def _rig(tmp_path, keys: Keys, **outbox):
    core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64},
                     extra={"outbox": outbox} if outbox else None)
    log = sentlog.install(core, core.cfg)
    core.link.connect()
    core.run_pending()
    return core, log


def _send(core, keys: Keys, args: dict) -> list[dict]:
    env = keys.command("dev/dev-1", "resend", args, ts=core.clock.now_ms())
    core.on_message(CMD, protocol.canonical(env), False)
    core.run_pending()
    return [a for a in core.link.json("/ack") if a["id"] == env["id"]]


def test_every_event_is_kept_in_its_own_transaction(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    with store.transaction():
        body = store.enqueue("t/event", {"type": "play", "x": "á"}, qos=1, kind="play",
                             now_ms=5, event=True)
        assert store.kept_range(1, 1)[0][2] == encode(body)
    store.enqueue("t/ack", {"stage": "done"}, qos=1, kind="ack", now_ms=6)
    assert store.kept_size()[0] == 1  # acks are not kept


def test_resend_republishes_the_same_bodies_flagged_resent(tmp_path):
    keys = Keys()
    core, _ = _rig(tmp_path, keys)
    for i in range(5):
        core.emit_event({"type": "play", "item": f"i{i}"})
    core.run_pending()
    first = {e["seq"]: e for e in core.link.json("/event")}
    acks = _send(core, keys, {"from_seq": 2, "to_seq": 4})
    assert [a["stage"] for a in acks] == ["received", "done"]
    assert acks[-1]["detail"] == {"sent": 3, "missing": [], "last_seq": 5}
    again = [e for e in core.link.json("/event") if e.get("resent")]
    assert [e["seq"] for e in again] == [2, 3, 4]
    for e in again:
        assert {k: v for k, v in e.items() if k != "resent"} == first[e["seq"]]
    raw = [p for t, p, *_ in core.link.published if t.endswith("/event")]
    assert raw[-1] == encode({**first[4], "resent": True})  # byte for byte, plus the flag


def test_resend_reports_what_it_no_longer_holds(tmp_path):
    keys = Keys()
    core, log = _rig(tmp_path, keys, keep_days=1)
    core.emit_event({"type": "alert", "code": "door_open", "state": "raised"})
    core.run_pending()
    core.clock.advance(2 * 86_400)
    core.emit_event({"type": "alert", "code": "door_open", "state": "cleared"})
    core.run_pending()
    log.prune()
    acks = _send(core, keys, {"from_seq": 1, "to_seq": 5})
    # 3..5 are not made yet: not missing
    assert acks[-1]["detail"] == {"sent": 1, "missing": [[1, 1]], "last_seq": 2}
    acks = _send(core, keys, {"from_seq": 3, "to_seq": 1002})  # past the end: nothing
    assert acks[-1]["detail"] == {"sent": 0, "missing": [], "last_seq": 2}


def test_kept_events_are_bounded_by_size_oldest_first(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    for i in range(200):
        store.enqueue("t/event", {"type": "play", "pad": "x" * 1000}, qos=1, kind="play",
                      now_ms=i, event=True)
    dropped = store.kept_prune(0, 50_000)
    rows, size = store.kept_size()
    assert size <= 50_000 and rows > 40
    assert dropped == 200 - rows
    assert store.kept_range(1, 1000)[0][0] == 200 - rows + 1  # the newest stay


def test_resend_arguments_are_checked(tmp_path):
    keys = Keys()
    core, _ = _rig(tmp_path, keys)
    for args, words in (({"from_seq": 5, "to_seq": 4}, "args.to_seq: must not be below"),
                        ({"from_seq": 1, "to_seq": 1001}, "at most 1000 seqs"),
                        ({"from_seq": 0, "to_seq": 3}, "args.from_seq: must be an integer"),
                        ({"from_seq": 1}, "args.to_seq: is required"),
                        ({"from_seq": 1, "to_seq": 2, "form": 1}, "args.form: unknown key")):
        acks = _send(core, keys, args)
        assert acks[-1]["stage"] == "rejected" and acks[-1]["reason"] == "bad_args", args
        assert any(words in e for e in acks[-1]["detail"]["errors"]), (args, acks[-1])


def test_missing_ranges():
    assert sentlog.missing_ranges(1, 10, []) == [[1, 10]]
    assert sentlog.missing_ranges(1, 10, [1, 2, 5, 10]) == [[3, 4], [6, 9]]
    assert sentlog.missing_ranges(3, 3, [3]) == []
    assert json.dumps(sentlog.missing_ranges(1, 2, [2])) == "[[1, 1]]"


def test_resend_to_a_group_fails(tmp_path):
    keys = Keys()
    core, _ = _rig(tmp_path, keys)
    env = keys.command("grp/g1", "resend", {"from_seq": 1, "to_seq": 2}, ts=core.clock.now_ms())
    core.on_message("ttcs/grp/g1/cmd", protocol.canonical(env), False)
    core.run_pending()
    acks = [a for a in core.link.json("/ack") if a["id"] == env["id"]]
    assert [(a["stage"], a.get("reason")) for a in acks] == [("received", None),
                                                            ("failed", "bad_args")]
