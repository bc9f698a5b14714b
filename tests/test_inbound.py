"""The core's inbound path guards every handler: a handler that raises answers its command
``failed``/``internal_error`` (a document: ``refused``/``internal_error``), the agent goes on,
and the next command is served. Shown for the board and the schedule handlers."""

from __future__ import annotations

import json

from agent import protocol
from agent.board import service as board_service
from agent.core.inbound import FuncHandler
from agent.schedule import service as schedule_service
from tests.conftest import Keys
from tests.fakes import make_core

CMD = "ttcs/dev/dev-1/cmd"


def _rig(tmp_path, keys: Keys, **extra):
    core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64}, extra=extra)
    core.link.connect()
    core.run_pending()
    return core


def _send(core, keys: Keys, typ: str, args: dict) -> str:
    env = keys.command("dev/dev-1", typ, args, ts=core.clock.now_ms())
    core.on_message(CMD, protocol.canonical(env), False)
    core.run_pending()
    return env["id"]


def _acks(core, cmd_id: str) -> list[dict]:
    return [a for a in core.link.json("/ack") if a["id"] == cmd_id]


def _boom(*args, **kwargs):
    raise RuntimeError("a bug in the handler")


def test_a_board_handler_that_raises_fails_its_command_and_the_next_one_is_served(
        tmp_path, monkeypatch):
    keys = Keys()
    core = _rig(tmp_path, keys, board={"driver": "image", "image_path": str(tmp_path / "b.png")})
    board = board_service.install(core, core.cfg)
    monkeypatch.setattr(board.content, "add_message", _boom)  # the real handler now raises
    bad = _send(core, keys, "board", {"text": "Thông báo"})
    stages = [(a["stage"], a.get("reason")) for a in _acks(core, bad)]
    assert stages == [("received", None), ("failed", "internal_error")]
    assert "RuntimeError: a bug in the handler" in _acks(core, bad)[-1]["detail"]["message"]
    assert core.store.open_list() == []  # not left open until the next restart
    ok = _send(core, keys, "ping", {})
    assert [a["stage"] for a in _acks(core, ok)] == ["received", "done"]


def test_any_command_type_is_guarded(tmp_path):
    keys = Keys()
    core = _rig(tmp_path, keys)
    core.register_command("volume", FuncHandler(_boom))
    bad = _send(core, keys, "volume", {"level": 50})
    assert [(a["stage"], a.get("reason")) for a in _acks(core, bad)] == [
        ("received", None), ("failed", "internal_error")]


class _Audio:
    """The scheduler's view of the audio service; nothing here airs."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_schedule_handler_that_raises_is_refused_as_internal_error(tmp_path, monkeypatch):
    keys = Keys()
    core = _rig(tmp_path, keys)
    sched = schedule_service.install(core, core.cfg, audio=_Audio())
    monkeypatch.setattr(sched, "apply", _boom)
    doc = keys.command("dev/dev-1", "schedule", {"items": []}, rev=3, ts=core.clock.now_ms())
    core.on_message("ttcs/dev/dev-1/desired/schedule", protocol.canonical(doc), True)
    core.run_pending()
    [event] = [e for e in core.link.json("/event") if e["type"] == "schedule"]
    assert (event["result"], event["reason"], event["rev"]) == ("refused", "internal_error", 3)
    assert "a bug in the handler" in event["detail"]["message"]
    ok = _send(core, keys, "ping", {})
    assert [a["stage"] for a in _acks(core, ok)] == ["received", "done"]
    assert json.loads(json.dumps(core.snapshot()))["device"] == "dev-1"


# --- integers beyond JSON's exact range (issue 15) ------------------------------------------

def test_a_huge_integer_in_a_signed_command_is_refused_with_an_ack(tmp_path):
    """ts ≥ 2^63 on an untrusted clock used to reach SQLite (replay memory) and overflow: no ack
    at all. Every integer in an envelope must be within ±(2^53 - 1)."""
    keys = Keys()
    core = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64}, trust="never")
    core.link.connect()
    core.run_pending()
    cases = {"ts": dict(ts=2**63), "exp": dict(ts=core.clock.now_ms(), exp=2**64),
             "args": dict(ts=core.clock.now_ms())}
    for name, times in cases.items():
        args = {"level": 2**63} if name == "args" else {}
        env = keys.command("dev/dev-1", "volume" if args else "ping", args, cmd_id=f"big-{name}",
                           **times)
        core.on_message(CMD, protocol.canonical(env), False)
        core.run_pending()
        assert [(a["stage"], a.get("reason")) for a in _acks(core, env["id"])] == [
            ("rejected", "bad_envelope")], name
        assert "2^53" in _acks(core, env["id"])[0]["detail"]["message"]
    ok = _send(core, keys, "ping", {})  # the agent goes on
    assert [a["stage"] for a in _acks(core, ok)] == ["received", "done"]


def _doc(core, keys: Keys, rev: int) -> bytes:
    env = keys.command("dev/dev-1", "schedule", {"items": []}, rev=rev, ts=core.clock.now_ms())
    del env["id"]
    return protocol.canonical(protocol.sign(env, keys.private, keys.kid))


def _schedule_events(core) -> list[tuple]:
    return [(e["rev"], e["result"], e.get("reason")) for e in core.link.json("/event")
            if e["type"] == "schedule"]  # an empty document applies as "cleared"


def test_an_absurd_rev_cannot_lock_a_topic(tmp_path):
    """A signed document with rev 2^63 was applied, and no later document could ever be newer."""
    keys = Keys()
    core = _rig(tmp_path, keys)
    schedule_service.install(core, core.cfg, audio=_Audio())
    topic = "ttcs/dev/dev-1/desired/schedule"
    for rev in (2**63, 2**53, 7):
        core.on_message(topic, _doc(core, keys, rev), True)
        core.run_pending()
    assert _schedule_events(core) == [(None, "rejected", "bad_envelope"),
                                      (None, "rejected", "bad_envelope"), (7, "applied", "cleared")]
    core.on_message(topic, b"", True)  # the retained document cleared at the broker
    core.run_pending()
    assert len(_schedule_events(core)) == 3  # ignored: the document in force stays


def test_a_stored_document_with_an_absurd_rev_is_dropped_at_start(tmp_path):
    """The way out for a device that stored such a document before the rule: at the next start
    the stored copy is re-checked, refused, and the topic takes documents again."""
    from agent.schedule.store import ScheduleStore

    keys = Keys()
    core = _rig(tmp_path, keys)
    ScheduleStore(core.cfg["paths"]["state_dir"]).save("dev/dev-1", 2**63,
                                                       _doc(core, keys, 2**63))
    schedule_service.install(core, core.cfg, audio=_Audio())
    core.on_message("ttcs/dev/dev-1/desired/schedule", _doc(core, keys, 8), True)
    core.run_pending()
    events = _schedule_events(core)
    assert events[0][1:] == ("rejected", "bad_envelope") and events[-1] == (8, "applied", "cleared")
