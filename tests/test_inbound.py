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
