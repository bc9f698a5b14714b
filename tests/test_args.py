"""The shared argument schema (agent/args.py) and the one Priority (agent/protocol.py).

A value gets the same verdict and the same words wherever it comes in: as a command argument,
inside a schedule item or as board content. And emergency goes before priority before normal
in the arbiter, on the board and in the schedule planner.
"""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent import args, config
from agent.audio import tts
from agent.audio.commands import (
    validate_live,
    validate_play,
    validate_say,
    validate_stop,
    validate_test,
)
from agent.board.content import BoardContent, validate_command_args, validate_document_args
from agent.core.clock import FakeClock
from agent.protocol import Priority
from agent.schedule.model import ScheduleBook, SchedulePlanner, validate_schedule_args
from agent.schedule.store import SlotLog
from tests.test_arbiter import Rig, file_item

SHA = "ab" * 32
MEDIA = {"url": "https://m.vn/a.mp3", "sha256": SHA}
TZ = "Asia/Ho_Chi_Minh"


def item(**kw) -> dict:
    """A valid schedule item with ``kw`` merged in (None: leave the key out)."""
    base = {"id": "news", "media": MEDIA, "days": ["mon"], "times": ["05:00"], **kw}
    return {k: v for k, v in base.items() if v is not None}


def schedule(**kw) -> list[str]:
    return validate_schedule_args({"items": [item(**kw)]})


def say_item(say) -> list[str]:
    return schedule(media=None, say=say)


def board_message(**kw) -> list[str]:
    return validate_document_args({"messages": [{"id": "m", "text": "Tin", **kw}]})


def message_at(errors: list[str], path: str) -> str:
    """The one problem reported for ``path``, without the path."""
    found = [e.removeprefix(f"{path}: ") for e in errors if e.startswith(f"{path}: ")]
    assert len(found) == 1, (path, errors)
    return found[0]


# Each case: the same bad value sent in every place that takes it, and the one message.
SAME_MESSAGE = {
    "unknown key with did-you-mean": ("unknown key (did you mean 'priority'?)", [
        (validate_play({"media": MEDIA, "prority": "normal"}), "args.prority"),
        (validate_say({"text": "Xin chào", "prority": "normal"}), "args.prority"),
        (schedule(prority="normal"), "items[0].prority"),
        (validate_command_args({"text": "Tin", "prority": "normal"}), "args.prority"),
    ]),
    "unknown key inside an object": ("unknown key (did you mean 'lang'?)", [
        (validate_play({"media": {**MEDIA, "lng": "vi"}}), "args.media.lng"),
        (schedule(media=[{**MEDIA, "lng": "vi"}]), "items[0].media[0].lng"),
        (say_item({"text": "Xin chào", "lng": "vi"}), "items[0].say.lng"),
    ]),
    "over-long say text": ("must be a non-empty text of at most 5000 characters", [
        (validate_say({"text": "x" * 5001}), "args.text"),
        (say_item({"text": "x" * 5001}), "items[0].say.text"),
        (say_item("x" * 5001), "items[0].say"),
        (validate_say({"text": "  "}), "args.text"),
        (say_item({"text": "  "}), "items[0].say.text"),
    ]),
    "bad priority": ("must be one of emergency, priority, normal, not 'urgent'", [
        (validate_play({"media": MEDIA, "priority": "urgent"}), "args.priority"),
        (validate_live({"url": "https://s.vn/x", "priority": "urgent"}), "args.priority"),
        (validate_say({"text": "Xin chào", "priority": "urgent"}), "args.priority"),
        (validate_test({"priority": "urgent"}), "args.priority"),
        (schedule(priority="urgent"), "items[0].priority"),
        (validate_command_args({"text": "Tin", "priority": "urgent"}), "args.priority"),
    ]),
    "bad sha256": ("must be 64 hexadecimal digits", [
        (validate_play({"media": {**MEDIA, "sha256": "abc"}}), "args.media.sha256"),
        (validate_live({"url": "https://s.vn/x", "fallback": {**MEDIA, "sha256": "abc"}}),
         "args.fallback.sha256"),
        (schedule(media={**MEDIA, "sha256": "abc"}), "items[0].media.sha256"),
        (schedule(media=None, live={"url": "https://s.vn/x", "fallback": [{**MEDIA, "sha256": "abc"}]},
                  duration_s=60), "items[0].live.fallback[0].sha256"),
    ]),
    "bad language tag": ("must be a language tag such as 'vi'", [
        (validate_say({"text": "Xin chào", "lang": "not a lang"}), "args.lang"),
        (validate_play({"media": [{**MEDIA, "lang": "vi\n"}]}), "args.media[0].lang"),
        (say_item({"text": "Xin chào", "lang": "not a lang"}), "items[0].say.lang"),
        (schedule(media={**MEDIA, "lang": "vi\n"}), "items[0].media.lang"),
    ]),
    "media URL": ("must be an http or https URL of at most 2048 characters", [
        (validate_play({"media": {**MEDIA, "url": "ftp://m.vn/a.mp3"}}), "args.media.url"),
        (schedule(media={**MEDIA, "url": "https://m.vn/a b.mp3"}), "items[0].media.url"),
    ]),
    "stream URL": ("must be an http, https or rtsp URL of at most 2048 characters", [
        (validate_live({"url": "file:///etc/passwd"}), "args.url"),
        (validate_live({"url": "https://s.vn/x", "backups": ["http:///x"]}), "args.backups[0]"),
        (schedule(media=None, live="file:///etc/passwd", duration_s=60), "items[0].live"),
        (schedule(media=None, live={"url": "https://s.vn/x", "backups": ["http:///x"]},
                  duration_s=60), "items[0].live.backups[0]"),
    ]),
    "volume": ("must be an integer 0–100", [
        (validate_play({"media": MEDIA, "volume": 101}), "args.volume"),
        (validate_say({"text": "Xin chào", "volume": True}), "args.volume"),
        (schedule(volume=101), "items[0].volume"),
    ]),
    "duration": ("must be an integer 1–86400", [
        (validate_live({"url": "https://s.vn/x", "duration_s": 0}), "args.duration_s"),
        (schedule(duration_s=0), "items[0].duration_s"),
        (validate_command_args({"text": "Tin", "duration_s": 86_401}), "args.duration_s"),
    ]),
    "id": ("must be 1–64 of [A-Za-z0-9._:-]", [
        (validate_stop({"id": "a b"}), "args.id"),
        (schedule(id="a b"), "items[0].id"),
        (validate_document_args({"messages": [{"id": "a b", "text": "Tin"}]}),
         "args.messages[0].id"),
    ]),
    "board text": ("must be a non-empty text of at most 1000 characters", [
        (validate_command_args({"text": "x" * 1001}), "args.text"),
        (board_message(text="x" * 1001), "args.messages[0].text"),
    ]),
    "day name": ("must be one of mon, tue, wed, thu, fri, sat, sun, not 'monday' "
                 "(did you mean 'mon'?)", [
        (schedule(days=["monday"]), "items[0].days[0]"),
        (board_message(days=["monday"]), "args.messages[0].days[0]"),
    ]),
    "window dates": ("must not be before from", [
        (schedule(**{"from": "2025-02-01", "until": "2025-01-31"}), "items[0].until"),
        (board_message(**{"from": "2025-02-01", "until": "2025-01-31"}),
         "args.messages[0].until"),
    ]),
    "required": ("is required", [
        (validate_play({}), "args.media"),
        (validate_say({}), "args.text"),
        (schedule(times=None), "items[0].times"),
        (validate_command_args({}), "args.text"),
    ]),
}


@pytest.mark.parametrize("case", SAME_MESSAGE)
def test_the_same_bad_value_gets_the_same_message_everywhere(case):
    expected, places = SAME_MESSAGE[case]
    assert [message_at(errors, path) for errors, path in places] == [expected] * len(places)


def test_unknown_key_is_worded_as_in_the_config():
    with pytest.raises(config.ConfigError) as e:
        config.parse("device:\n  id: c03\nlog:\n  levl: info\n")
    [line] = e.value.problems
    assert line.endswith("log.levl: unknown key (did you mean 'level'?)")
    assert validate_command_args({"text": "Tin", "efect": "static"}) == [
        "args.efect: unknown key (did you mean 'effect'?)"]


def test_say_text_limit_is_one_for_commands_schedules_and_speech():
    assert validate_say({"text": "x" * 5000}) == []
    assert say_item({"text": "x" * 5000}) == [] and say_item("x" * 5000) == []
    assert tts.MAX_TEXT == args.SAY_TEXT.max_len == 5000


def test_texts_are_counted_after_nfc():
    decomposed = "e\u0323\u0302" * 500  # "ệ" × 500, three code points each
    assert validate_say({"text": "x", "board_text": decomposed}) == []
    assert validate_command_args({"text": decomposed * 2}) == []
    assert validate_say({"text": "x", "board_text": decomposed + "x"}) != []


@pytest.mark.parametrize("url,ok", [
    ("http://h/x", True), ("https://h:8000/live", True), ("rtsp://h/x", True),
    ("file:///etc/passwd", False), ("http:///x", False), ("http://h/a b", False), (3, False),
    ("http://[::1/x", False), ("https://h/" + "x" * 2040, False),
])
def test_stream_urls(url, ok):
    assert args.STREAM_URL.ok(url) is ok
    assert (validate_live({"url": url}) == []) is ok


def test_validators_never_raise_on_odd_values():
    odd = [None, True, 1.5, [], {}, [[]], {"a": {}}, "x" * 10_000]
    for value in odd:
        for key in ("media", "priority", "text", "lang", "days", "live", "say", "times", "id"):
            validate_play({key: value})
            validate_say({key: value})
            validate_command_args({key: value})
            schedule(**{key: value})
        validate_schedule_args(value)
        validate_document_args(value)


# --- one Priority ----------------------------------------------------------------------------

def test_priority_is_its_wire_string_and_compares_by_urgency():
    assert Priority.EMERGENCY > Priority.PRIORITY > Priority.NORMAL
    assert Priority.NORMAL < "emergency" and Priority.PRIORITY < "emergency"  # not alphabetical
    assert "emergency" > Priority.NORMAL  # noqa: SIM300 - a plain string on the left on purpose
    assert [p.order for p in Priority] == [0, 1, 2]
    assert sorted(Priority, key=lambda p: p.order) == ["emergency", "priority", "normal"]
    assert max(Priority) is Priority.EMERGENCY
    assert json.dumps({"priority": Priority.EMERGENCY}) == '{"priority": "emergency"}'
    assert {"emergency": 1}[Priority.EMERGENCY] == 1
    assert Priority.parse("priority") is Priority.PRIORITY and Priority.parse("high") is None
    assert Priority.parse(2) is None
    with pytest.raises(TypeError):
        _ = Priority.NORMAL < "zzz"  # never alphabetical


def test_arbiter_airs_emergency_before_priority_before_normal():
    rig = Rig()
    rig.arb.submit(file_item("first", "emergency"))
    for item_id, prio in [("n", "normal"), ("p", "priority"), ("e", "emergency")]:
        rig.arb.submit(file_item(item_id, prio))
    assert [q["id"] for q in rig.arb.snapshot()["queue"]] == ["e", "p", "n"]
    aired = []
    for _ in range(4):
        aired.append(rig.out.source)
        rig.advance(1)
        rig.end()
    assert aired == ["/m/first.wav", "/m/e.wav", "/m/p.wav", "/m/n.wav"]


def test_arbiter_lets_a_higher_priority_cut_in():
    rig = Rig()
    rig.arb.submit(file_item("n", "normal"))
    rig.arb.submit(file_item("p", "priority"))
    rig.arb.submit(file_item("e", "emergency"))
    assert rig.out.source == "/m/e.wav"
    assert rig.stages("n")[-1] == "preempted" and rig.stages("p")[-1] == "preempted"


def test_board_shows_emergency_before_priority_before_normal():
    local = datetime(2025, 11, 26, 16, 40, tzinfo=ZoneInfo(TZ))
    board = BoardContent(FakeClock(now_ms=int(local.timestamp() * 1000)), TZ)
    for cmd_id, prio in [("n", "normal"), ("p", "priority"), ("e", "emergency")]:
        board.add_message(cmd_id, {"text": f"Tin {cmd_id}", "priority": prio})
    board.update()
    assert board.current().message_id == "e"
    assert [q["id"] for q in board.snapshot()["queue"]] == ["e", "p", "n"]


def test_planner_hands_over_emergency_before_priority_before_normal():
    due_ms = int(datetime(2025, 12, 1, 5, 0, tzinfo=ZoneInfo(TZ)).timestamp() * 1000)
    book = ScheduleBook(TZ)
    applied, reason = book.apply("dev/c03", 1, {"items": [
        item(id="n"), item(id="p", priority="priority"), item(id="e", priority="emergency")]})
    assert applied, reason
    assert [s.item_id for s in book.slots_between(due_ms, due_ms + 1)] == ["e", "p", "n"]
    clock = FakeClock(due_ms + 30_000)  # all three missed by 30 s: within their grace
    planner = SchedulePlanner(book, clock, log=SlotLog())
    planner.log.checked_until_ms = due_ms - 60_000
    assert [s.item_id for s in planner.due(clock.now_ms(), True).due] == ["e", "p", "n"]
