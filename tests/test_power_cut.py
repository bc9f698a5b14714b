"""A power cut mid-item, with real processes: ``python -m agent run`` against mosquitto, airing
a long scheduled bulletin that a ``play`` command preempts, SIGKILLed while the command airs
and started again. Each of the two gets one play record, ``result: "interrupted"``, with the
time it aired up to the last position the agent wrote (``audio.journal_interval_s``: 1 s
here), and the command its ``failed``/``interrupted`` ack as before.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from agent.audio.tone import write_tone
from tests.conftest import Watcher, wait_online, wait_until
from tests.test_schedule_service import (
    DEV_TOPIC,
    DEVICE,
    MediaServer,
    audio_sections,
    hhmm,
    minute_ahead,
    schedule_doc,
    sid_at,
    slot_item,
    start_agent,
)

INTERVAL_S = 1
SLACK_MS = 400  # a loaded test machine: the core's timers and the kill are not exact


@pytest.fixture
def long_media(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    write_tone(str(folder / "long.wav"), seconds=90, rate=8000)
    server = MediaServer(folder)
    yield {"url": server.url("long.wav"),
           "sha256": hashlib.sha256((folder / "long.wav").read_bytes()).hexdigest()}
    server.close()


def plays(watcher: Watcher, item_id: str) -> list[dict]:
    """The play records of ``item_id``, once each (delivery is at least once)."""
    unique = {e["seq"]: e for e in watcher.json(f"dev/{DEVICE}/event")
              if e.get("type") == "play" and e.get("id") == item_id}
    return list(unique.values())


def playing(watcher: Watcher, item_id: str) -> bool:
    return any((s.get("playing") or {}).get("id") == item_id and s["playing"]["airing"]
               for s in watcher.json(f"dev/{DEVICE}/state"))


@pytest.mark.parametrize("backend", ["sim", "vlc"])
def test_items_on_air_at_a_sigkill_are_recorded_interrupted_at_the_next_start(
        tmp_path, broker, keys, agent_factory, monkeypatch, long_media, backend):
    watcher = Watcher(broker.port, ["ttcs/#"])
    try:
        airs_and_dies(tmp_path, broker, keys, agent_factory, monkeypatch, long_media, backend,
                      watcher)
    finally:
        watcher.close()


def airs_and_dies(tmp_path, broker, keys, agent_factory, monkeypatch, long_media, backend,
                  watcher: Watcher) -> None:
    sections = audio_sections(backend, tmp_path)
    sections["audio"] = {**sections.get("audio", {}), "journal_interval_s": INTERVAL_S}
    sections["amplifier"] = {"warm_up_s": 0}
    offset, slot = minute_ahead(8)
    sid = sid_at(slot)
    watcher.publish(DEV_TOPIC, schedule_doc(keys, 1, [slot_item(long_media, slot)]),
                    retain=True)
    agent = start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset, **sections)
    wait_online(watcher, DEVICE)
    wait_until(lambda: playing(watcher, sid), 30, what="the slot on air")
    time.sleep(3)
    cmd = keys.command(f"dev/{DEVICE}", "play", {"media": long_media, "priority": "priority"})
    watcher.publish(f"ttcs/dev/{DEVICE}/cmd", cmd)
    started = watcher.wait_ack(cmd["id"], "started", 20)
    time.sleep(4.5)
    agent.kill()  # SIGKILL: no stop hook runs
    killed_ms = int(time.time() * 1000) + offset  # the agent's clock
    assert plays(watcher, sid) == plays(watcher, cmd["id"]) == []

    watcher.clear()
    start_agent(tmp_path, broker, keys, agent_factory, monkeypatch, offset, **sections)
    wait_until(lambda: plays(watcher, sid) and plays(watcher, cmd["id"]), 20,
               what="the play records of both items")
    assert watcher.wait_ack(cmd["id"], "failed")["reason"] == "interrupted"
    time.sleep(1)  # anything sent twice would be here by now
    [bulletin], [command] = plays(watcher, sid), plays(watcher, cmd["id"])

    assert bulletin["result"] == "interrupted" and bulletin["origin"] == "schedule"
    assert (bulletin["item"], bulletin["topic"], bulletin["slot"], bulletin["due"]) == (
        "bulletin", f"dev/{DEVICE}", "T".join(hhmm(slot)), slot)
    assert bulletin["kind"] == "file" and bulletin["priority"] == "normal"
    assert bulletin["requested_ms"] == 90_000 and bulletin["preemptions"] == 1
    [seg] = bulletin["segments"]  # it aired once, until the command cut in
    assert seg["result"] == "preempted" and bulletin["played_ms"] == seg["played_ms"]
    assert abs(seg["ended"] - started["ts"]) <= SLACK_MS
    assert abs(bulletin["played_ms"] - (seg["ended"] - seg["started"])) <= SLACK_MS
    assert bulletin["played_ms"] >= 2500

    assert command["result"] == "interrupted" and command["origin"] == "command"
    assert command["priority"] == "priority" and command["preemptions"] == 0
    assert abs(command["started"] - started["ts"]) <= SLACK_MS
    aired_ms = killed_ms - started["ts"]  # about 4.5 s
    assert aired_ms - INTERVAL_S * 1000 - SLACK_MS <= command["played_ms"] <= aired_ms
    assert command["ended"] == command["started"] + command["played_ms"]
    assert command["segments"][-1]["result"] == "interrupted"
