"""Board content on a FakeClock: documents, windows, rotation, ad-hoc overrides, records."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.board.content import (
    BoardContent,
    validate_command_args,
    validate_document_args,
)
from agent.core.clock import FakeClock

TZ = "Asia/Ho_Chi_Minh"
DEV, GRP = "dev/krongpa-phutuc-c03", "grp/krongpa"


def clock_at(iso_local: str) -> FakeClock:
    local = datetime.fromisoformat(iso_local).replace(tzinfo=ZoneInfo(TZ))
    return FakeClock(now_ms=int(local.timestamp() * 1000))


def doc(*messages: dict, rotate_s: int = 10) -> dict:
    return {"messages": list(messages), "rotate_s": rotate_s}


def msg(mid: str, text: str | None = None, **window) -> dict:
    return {"id": mid, "text": text or f"Tin {mid}", **window}


def shown_id(content: BoardContent) -> str | None:
    current = content.current()
    return current.message_id if current else None


@pytest.fixture
def clock() -> FakeClock:
    return clock_at("2025-11-26T16:40:00")  # a Wednesday afternoon


@pytest.fixture
def board(clock: FakeClock) -> BoardContent:
    return BoardContent(clock, TZ)


# --- validation -------------------------------------------------------------------------


def test_valid_document_has_no_errors() -> None:
    args = doc(
        msg(
            "a",
            "Lịch tiêm chủng",
            days=["mon", "sat"],
            times=["05:00-06:30", "22:00-01:00"],
            **{"from": "2025-11-01", "until": "2025-12-31"},
        )
    )
    assert validate_document_args(args) == []


def test_document_errors_name_every_bad_key() -> None:
    args = {
        "messages": [
            {
                "id": "bad id!",
                "text": "",
                "days": ["monday"],
                "times": ["5:00-6:00"],
                "until": "2025-13-01",
                "colour": "red",
            },
            {"id": "x", "text": "ok"},
            {"id": "x", "text": "dup"},
        ],
        "rotate_s": 0,
        "extra": 1,
    }
    errors = validate_document_args(args)
    for key in (
        "args.extra",
        "messages[0].colour",
        "messages[0].id",
        "messages[0].text",
        "messages[0].days",
        "messages[0].times",
        "messages[0].until",
        "messages[2].id: duplicate",
        "args.rotate_s",
    ):
        assert any(key in e for e in errors), f"no error for {key}: {errors}"
    assert validate_document_args("nope") == ["args: must be an object"]
    assert validate_document_args({"messages": "x"})


def test_command_validation() -> None:
    assert (
        validate_command_args(
            {"text": "Mất điện 14h", "priority": "emergency", "duration_s": 60, "effect": "static"}
        )
        == []
    )
    errors = validate_command_args(
        {"text": " ", "priority": "urgent", "duration_s": True, "effect": "blink", "colour": 1}
    )
    assert len(errors) == 5
    assert validate_command_args({"text": "x" * 1001})
    assert validate_command_args({"text": "x", "duration_s": 0})


# --- documents and revisions ---------------------------------------------------------------


def test_higher_rev_replaces_lower_or_equal_is_ignored(board: BoardContent) -> None:
    assert board.apply_document(DEV, 5, doc(msg("a"))) == (True, "applied")
    assert board.apply_document(DEV, 5, doc(msg("b"))) == (False, "stale_rev")
    assert board.apply_document(DEV, 4, doc(msg("c"))) == (False, "stale_rev")
    assert board.apply_document(DEV, 6, {"messages": "x"}) == (False, "bad_args")
    board.update()
    assert shown_id(board) == "a"
    assert board.apply_document(DEV, 6, doc(msg("b"))) == (True, "applied")
    changes = board.update()
    assert shown_id(board) == "b"
    assert [(r.message_id, r.result) for r in changes.records] == [("a", "withdrawn")]
    assert board.snapshot()["documents"] == {DEV: {"rev": 6, "messages": 1}}


def test_union_device_first_and_device_wins_duplicate_ids(
    board: BoardContent, clock: FakeClock
) -> None:
    board.apply_document(GRP, 1, doc(msg("shared", "nhóm"), msg("g1"), rotate_s=5))
    board.apply_document(DEV, 1, doc(msg("shared", "thiết bị"), msg("d1"), rotate_s=5))
    seen = []
    for _ in range(4):
        board.update()
        seen.append((shown_id(board), board.current().text))
        clock.advance(5)
    assert seen == [
        ("shared", "thiết bị"),
        ("d1", "Tin d1"),
        ("g1", "Tin g1"),
        ("shared", "thiết bị"),
    ]


def test_documents_round_trip_for_persistence(board: BoardContent, clock: FakeClock) -> None:
    board.apply_document(DEV, 3, doc(msg("a")))
    restored = BoardContent(clock, TZ)
    for topic, held in board.documents().items():
        assert restored.apply_document(topic, held["rev"], held["args"]) == (True, "applied")
    restored.update()
    assert shown_id(restored) == "a"


def test_unknown_timezone_is_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="timezone"):
        BoardContent(clock, "Mars/Olympus")


# --- rotation ------------------------------------------------------------------------------


def test_rotation_every_rotate_s_with_records(board: BoardContent, clock: FakeClock) -> None:
    board.apply_document(DEV, 1, doc(msg("a"), msg("b"), msg("c"), rotate_s=10))
    start_ms = clock.now_ms()
    assert board.update().changed and shown_id(board) == "a"
    clock.advance(9.9)
    assert not board.update().changed and shown_id(board) == "a"
    assert board.next_deadline_s() == pytest.approx(0.1)
    clock.advance(0.1)
    changes = board.update()
    assert shown_id(board) == "b"
    (record,) = changes.records
    assert (record.message_id, record.result, record.started_ms, record.ended_ms) == (
        "a",
        "rotated",
        start_ms,
        start_ms + 10_000,
    )
    assert record.to_event()["type"] == "board" and record.to_event()["text"] == "Tin a"
    clock.advance(10)
    board.update()
    clock.advance(10)
    board.update()
    assert shown_id(board) == "a"  # c, then around again


def test_single_message_stays_without_spurious_records(
    board: BoardContent, clock: FakeClock
) -> None:
    board.apply_document(DEV, 1, doc(msg("only"), rotate_s=5))
    board.update()
    for _ in range(10):
        clock.advance(5)
        changes = board.update()
        assert not changes.changed and changes.records == []
    assert shown_id(board) == "only"


def test_no_content_blank_board(board: BoardContent) -> None:
    changes = board.update()
    assert changes.shown is None and board.current() is None and not changes.changed


# --- windows -------------------------------------------------------------------------------


def test_times_window_in_device_timezone() -> None:
    clock = clock_at("2025-11-26T04:59:00")
    board = BoardContent(clock, TZ)
    board.apply_document(DEV, 1, doc(msg("morning", times=["05:00-06:00"])))
    board.update()
    assert board.current() is None
    assert board.next_deadline_s() == pytest.approx(60.0)
    clock.advance(60)
    board.update()
    assert shown_id(board) == "morning"
    clock.advance(59 * 60 + 59)
    board.update()
    assert shown_id(board) == "morning"
    clock.advance(1)
    changes = board.update()
    assert board.current() is None
    assert [(r.message_id, r.result) for r in changes.records] == [("morning", "withdrawn")]


def test_overnight_window_belongs_to_the_day_it_starts() -> None:
    clock = clock_at("2025-11-29T21:59:00")  # Saturday
    board = BoardContent(clock, TZ)
    board.apply_document(DEV, 1, doc(msg("night", days=["sat"], times=["22:00-02:00"])))
    expectations = [
        (0, None),
        (60, "night"),
        (3 * 3600, "night"),
        (3600, None),
    ]  # 22:00, 01:00 Sun, 02:00
    for step, expected in expectations:
        clock.advance(step)
        board.update()
        assert shown_id(board) == expected, f"after +{step}s"
    clock.advance(20 * 3600)  # Sunday 22:00: not a Saturday
    board.update()
    assert board.current() is None


def test_from_until_days() -> None:
    clock = clock_at("2025-11-30T12:00:00")  # Sunday
    board = BoardContent(clock, TZ)
    board.apply_document(
        DEV,
        1,
        doc(
            msg("weekday", days=["mon", "tue", "wed", "thu", "fri"]),
            msg("dec", **{"from": "2025-12-01", "until": "2025-12-01"}),
            msg("always"),
        ),
    )
    board.update()
    assert shown_id(board) == "always"
    clock.advance(24 * 3600)  # Monday 1 December
    seen = set()
    for _ in range(3):
        board.update()
        seen.add(shown_id(board))
        clock.advance(10)
    assert seen == {"weekday", "dec", "always"}
    clock.advance(24 * 3600)  # Tuesday 2 December: past "until"
    seen = set()
    for _ in range(3):
        board.update()
        seen.add(shown_id(board))
        clock.advance(10)
    assert seen == {"weekday", "always"}


def test_untrusted_clock_holds_back_windowed_messages(clock: FakeClock) -> None:
    trusted = [False]
    board = BoardContent(clock, TZ, trusted=lambda: trusted[0])
    board.apply_document(DEV, 1, doc(msg("windowed", times=["00:00-24:00"]), msg("plain")))
    for _ in range(3):
        board.update()
        assert shown_id(board) == "plain"
        clock.advance(10)
    trusted[0] = True
    seen = set()
    for _ in range(2):
        board.update()
        seen.add(shown_id(board))
        clock.advance(10)
    assert seen == {"windowed", "plain"}


# --- ad-hoc commands -----------------------------------------------------------------------


def stages(changes) -> list[tuple[str, str]]:
    return [(s.cmd_id, s.stage) for s in changes.stages]


def test_adhoc_overrides_standing_for_its_duration_then_standing_returns(
    board: BoardContent, clock: FakeClock
) -> None:
    board.apply_document(DEV, 1, doc(msg("a"), msg("b"), rotate_s=10))
    board.update()
    clock.advance(4)
    board.add_message("c-1", {"text": "Họp dân lúc 19h", "duration_s": 30, "effect": "static"})
    changes = board.update()
    shown = board.current()
    assert (shown.message_id, shown.source, shown.effect, shown.text) == (
        "c-1",
        "command",
        "static",
        "Họp dân lúc 19h",
    )
    assert stages(changes) == [("c-1", "queued"), ("c-1", "started")]
    assert [(r.message_id, r.result) for r in changes.records] == [("a", "preempted")]
    clock.advance(29.5)
    assert not board.update().changed
    assert board.next_deadline_s() == pytest.approx(0.5)
    clock.advance(0.5)
    changes = board.update()
    assert stages(changes) == [("c-1", "done")]
    assert shown_id(board) == "a"  # the interrupted message resumes with a fresh turn
    (record,) = changes.records
    assert record.result == "done" and record.ended_ms - record.started_ms == 30_000


def test_priority_order_and_paused_display_time(board: BoardContent, clock: FakeClock) -> None:
    board.add_message("n1", {"text": "bình thường 1", "duration_s": 20})
    board.add_message("n2", {"text": "bình thường 2", "duration_s": 20})
    board.update()
    assert shown_id(board) == "n1"
    clock.advance(5)
    board.add_message("p1", {"text": "ưu tiên", "priority": "priority", "duration_s": 10})
    changes = board.update()
    assert shown_id(board) == "p1"
    assert ("n1", "preempted") in stages(changes) and ("p1", "started") in stages(changes)
    clock.advance(3)
    board.add_message("e1", {"text": "KHẨN CẤP: lũ quét", "priority": "emergency", "duration_s": 5})
    board.update()
    assert shown_id(board) == "e1"
    assert board.current().priority == "emergency"
    clock.advance(5)
    changes = board.update()
    assert stages(changes) == [("e1", "done"), ("p1", "resumed")]
    clock.advance(7)  # p1 had 7 s of its 10 left
    changes = board.update()
    assert stages(changes) == [("p1", "done"), ("n1", "resumed")]
    clock.advance(14.9)  # n1 had 15 s left
    assert not board.update().changed
    clock.advance(0.1)
    changes = board.update()
    assert stages(changes) == [("n1", "done"), ("n2", "started")]
    snap = board.snapshot()
    assert snap["showing"]["id"] == "n2" and snap["queue"][0]["id"] == "n2"


def test_emergency_overrides_everything_even_if_queued_later(board: BoardContent) -> None:
    board.apply_document(DEV, 1, doc(msg("a")))
    board.add_message("p", {"text": "ưu tiên", "priority": "priority"})
    board.add_message("e", {"text": "KHẨN", "priority": "emergency"})
    board.update()
    assert shown_id(board) == "e"


def test_remove_stops_shown_and_queued(board: BoardContent, clock: FakeClock) -> None:
    board.apply_document(DEV, 1, doc(msg("a")))
    board.add_message("x", {"text": "một"})
    board.add_message("y", {"text": "hai"})
    board.update()
    assert board.remove("y") and not board.remove("nope")
    assert board.remove("x")
    changes = board.update()
    assert stages(changes) == [("y", "stopped"), ("x", "stopped")]
    assert [(r.message_id, r.result) for r in changes.records] == [("x", "stopped")]
    assert shown_id(board) == "a"
    board.add_message("z", {"text": "ba"})
    assert board.clear_commands() == ["z"]


def test_bad_command_args_raise(board: BoardContent) -> None:
    with pytest.raises(ValueError, match=r"args\.text"):
        board.add_message("c", {"text": ""})


def test_text_is_stored_nfc(board: BoardContent) -> None:
    import unicodedata

    board.add_message("c", {"text": unicodedata.normalize("NFD", "Bão  số 3")})
    board.update()
    assert board.current().text == "Bão số 3"


def test_audio_text_goes_ahead_of_older_messages_of_its_priority(
    board: BoardContent, clock: FakeClock
) -> None:
    board.add_message("n1", {"text": "Họp tổ 5", "duration_s": 100})
    board.update()
    clock.advance(10)
    board.add_message("audio", {"text": "Bản tin sáng", "duration_s": 600}, front=True)
    changes = board.update()
    assert shown_id(board) == "audio", "the text of what airs shows at once"
    assert stages(changes) == [("audio", "queued"), ("n1", "preempted"), ("audio", "started")]
    board.add_message("n2", {"text": "Tiêm chủng", "duration_s": 100})
    board.add_message("p1", {"text": "Cúp điện", "priority": "priority", "duration_s": 5})
    board.update()
    assert shown_id(board) == "p1", "a higher message still goes over it"
    clock.advance(5)
    board.update()
    assert shown_id(board) == "audio", "and a newer one of its priority does not"
    assert board.remove("audio")
    changes = board.update()
    assert shown_id(board) == "n1" and ("n1", "resumed") in stages(changes)
    assert [q["id"] for q in board.snapshot()["queue"]] == ["n1", "n2"]
