"""The update service in process (a fake link, a fake clock): probation, giving up, the
window with an untrusted clock. The real thing, end to end, is tests/test_update.py."""

from __future__ import annotations

import pytest

from agent.core.clock import FakeClock
from agent.update.layout import Layout
from agent.update.service import UpdateService
from tests.fakes import make_core


class Audio:
    """What the update service reads of the audio service: what airs and waits."""

    def __init__(self) -> None:
        self.current = None
        self.arbiter = self

    def snapshot(self) -> dict:
        return {"current": self.current, "queue": []}


@pytest.fixture
def device(tmp_path, monkeypatch):
    def make(record: dict | None = None, running: str = "venvs/new", **update):
        clock = FakeClock()
        core = make_core(tmp_path, clock=clock, extra={"update": {
            "prefix": str(tmp_path / "opt"), "probation_s": 10, **update}})
        layout = Layout(tmp_path / "opt")
        for name in ("old", "new"):
            (layout.venvs / name).mkdir(parents=True, exist_ok=True)
        layout.switch(running)
        if record is not None:
            layout.write(record)
        monkeypatch.setattr(Layout, "running", lambda self: running)
        core.stops = []
        core.request_stop = lambda: core.stops.append(clock.monotonic())
        svc = UpdateService(core, core.cfg, audio=Audio())
        svc.start()
        core.run_pending()
        return core, clock, layout, svc
    return make


PROBATION = {"state": "probation", "id": "c-1", "version": "new", "from": "venvs/old",
             "to": "venvs/new", "starts": 1, "max_failed_starts": 3, "probation_s": 10}


def step(core, clock, seconds: float) -> None:
    for _ in range(int(seconds * 2)):
        clock.advance(0.5)
        core.run_pending()


def test_probation_commits_once_the_link_held_long_enough(device):
    core, clock, layout, _ = device(PROBATION)
    step(core, clock, 4)  # not yet connected: no hold
    core.link.connect()
    step(core, clock, 5)
    core.link.drop()  # a break restarts the hold
    core.link.connect()
    step(core, clock, 8)
    assert layout.read()["state"] == "probation"
    step(core, clock, 3)
    assert layout.read()["state"] == "committed"
    done = [a for a in core.link.json("/ack") if a["id"] == "c-1"]
    assert [a["stage"] for a in done] == ["done"] and done[0]["detail"]["version"] == "new"
    assert not core.stops


def test_probation_gives_up_when_the_link_never_comes(device):
    core, clock, layout, _ = device(PROBATION)
    step(core, clock, 9)
    assert layout.read()["state"] == "probation"
    step(core, clock, 2)
    rec = layout.read()
    assert rec["state"] == "rollback" and "not connected" in rec["why"]
    assert core.stops  # asked to stop: the boot guard switches back at the next start


def test_probation_gives_up_when_the_link_keeps_breaking(device):
    core, clock, layout, _ = device(PROBATION)
    for _ in range(5):  # connected for 6 s at a time, never the 10 s asked
        core.link.connect()
        step(core, clock, 6)
        core.link.drop()
    rec = layout.read()
    assert rec["state"] == "rollback" and "did not hold its broker link" in rec["why"]


def test_old_version_reports_the_rollback_once(device):
    record = {**PROBATION, "state": "rolled_back", "why": "3 starts without a commit"}
    core, _, layout, _ = device(record, running="venvs/old")
    core.link.connect()
    core.run_pending()
    failed = [a for a in core.link.json("/ack") if a["id"] == "c-1"]
    assert failed[0]["stage"] == "failed" and failed[0]["reason"] == "rolled_back"
    assert layout.read()["reported"] is True


def test_window_needs_a_trusted_clock(device, monkeypatch):
    *_, svc = device(window="00:00-23:59")
    assert svc._in_window()
    monkeypatch.setattr(svc.core.trust, "trusted", lambda: False)
    assert not svc._in_window()


def test_without_the_boot_guard_the_new_version_switches_back_itself(device):
    record = {**PROBATION, "state": "rollback", "why": "core not connected"}
    core, _, layout, _ = device(record)
    assert layout.current() == "venvs/old" and layout.read()["state"] == "rolled_back"
    assert core.stops


def test_stopping_kills_the_install_command_under_way():
    import threading
    import time

    from agent.update.install import Jobs, UpdateError

    jobs, errors = Jobs(), []

    def work():
        try:
            jobs.run(["sleep", "30"], "install", "pip install")
        except UpdateError as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.3)
    began = time.monotonic()
    jobs.stop()
    t.join(5)
    assert time.monotonic() - began < 2 and errors and errors[0].reason == "install"
    with pytest.raises(UpdateError, match="stopping"):
        jobs.run(["true"], "install", "next step")
