"""Schedule model: validation, rev rules, slot expansion across DST, and the planner."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.clock import FakeClock
from agent.schedule.model import (
    DAY_MS,
    MINUTE_MS,
    ScheduleBook,
    SchedulePlanner,
    validate_schedule_args,
)
from agent.schedule.store import AIRED, SKIPPED, SlotLog

HCM = "Asia/Ho_Chi_Minh"
BERLIN = "Europe/Berlin"
HOUR_MS = 3_600_000
SHA = "ab" * 32
SHA2 = "cd" * 32


def ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: str = HCM) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def utc(ms_: int) -> datetime:
    return datetime.fromtimestamp(ms_ / 1000, UTC)


def item(id_: str = "news", **kw) -> dict:
    base = {"id": id_, "media": {"url": "https://media.example.vn/a.mp3", "sha256": SHA},
            "days": ["mon", "tue", "wed", "thu", "fri", "sat"], "times": ["05:00", "17:00"]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}  # None: leave the key out


def book_with(*items: dict, topic: str = "dev/c03", tz: str = HCM) -> ScheduleBook:
    book = ScheduleBook(tz)
    applied, reason = book.apply(topic, 1, {"items": list(items)})
    assert applied, reason
    return book


# --- validation ------------------------------------------------------------------------------

def test_valid_items_of_every_kind_have_no_errors():
    args = {"items": [
        item("a"),
        item("b", media=[{"url": "https://m.vn/vi.mp3", "sha256": SHA, "lang": "vi"},
                         {"url": "https://m.vn/en.mp3", "sha256": SHA2, "lang": "en"}]),
        {"id": "c", "live": "rtsp://radio.vn/live", "duration_s": 600, "dates": ["2025-12-01"],
         "times": ["06:00"]},
        {"id": "d", "live": {"url": "https://s.vn/x", "backups": ["https://s2.vn/x"],
                             "fallback": {"url": "https://m.vn/f.mp3", "sha256": SHA}},
         "duration_s": 60, "days": ["sun"], "times": ["07:00"], "priority": "priority"},
        {"id": "e:1.x-y_z", "say": {"text": "Thông báo", "lang": "vi"}, "days": ["mon"],
         "times": ["23:59", "00:00"], "from": "2025-01-01", "until": "2025-01-01",
         "timezone": BERLIN, "volume": 0, "catch_up_s": 0, "repeat": 10},
        {"id": "f", "say": "Xin chào", "dates": ["2025-02-28"], "times": ["12:00"],
         "priority": "emergency", "volume": 100},
    ]}
    assert validate_schedule_args(args) == []


@pytest.mark.parametrize("raw, expected", [
    (item(id="a b"), "items[0].id: must be 1–64"),
    (item(id="x" * 65), "items[0].id: must be 1–64"),
    (item(say="hi"), "items[0]: must have exactly one of media, live, say"),
    ({k: v for k, v in item().items() if k != "media"}, "exactly one of media, live, say"),
    (item(media={"url": "https://m.vn/a", "sha256": "abc"}), "items[0].media.sha256: must be 64"),
    (item(media={"url": "ftp://m.vn/a", "sha256": SHA}), "items[0].media.url: must be an http or https URL"),
    (item(media=[]), "items[0].media: must be a list of 1–8"),
    (item(media=[{"url": "https://m.vn/a", "sha256": SHA, "lng": "vi"}]),
     "items[0].media[0].lng: unknown key (did you mean 'lang'?)"),
    (item(tiems=["05:00"]), "items[0].tiems: unknown key (did you mean 'times'?)"),
    (item(dates=["2025-01-01"]), "items[0]: must have exactly one of days, dates"),
    ({k: v for k, v in item().items() if k != "days"}, "exactly one of days, dates"),
    (item(days=["monday"]), "items[0].days[0]: must be one of mon"),
    (item(days=["mon", "mon"]), "items[0].days: has duplicates"),
    (item(dates=["2025-02-30"], days=None), "items[0].dates[0]: must be a date"),
    (item(times=[]), "items[0].times: must be a list of 1–48"),
    (item(times=["24:00"]), "items[0].times[0]: must be a time HH:MM"),
    (item(times=["5:00"]), "items[0].times[0]: must be a time HH:MM"),
    (item(times=[f"{h:02d}:{m:02d}" for h in range(13) for m in (0, 15, 30, 45)]),
     "items[0].times: must be a list of 1–48"),
    (item(times=["05:00", "05:00"]), "items[0].times: has duplicates"),
    (item(**{"from": "2025-02-01", "until": "2025-01-31"}), "items[0].until: must not be before"),
    (item(**{"from": "20250101"}), "items[0].from: must be a date"),
    (item(timezone="Mars/Olympus"), "items[0].timezone: must be a timezone name"),
    (item(timezone="../../etc/passwd"), "items[0].timezone: must be a timezone name"),
    (item(priority="urgent"), "items[0].priority: must be one of"),
    (item(volume=101), "items[0].volume: must be an integer 0–100"),
    (item(volume=True), "items[0].volume: must be an integer 0–100"),
    (item(repeat=0), "items[0].repeat: must be an integer 1–10"),
    (item(catch_up_s=-1), "items[0].catch_up_s: must be an integer 0–86400"),
    (item(duration_s=0), "items[0].duration_s: must be an integer 1–86400"),
    ({"id": "l", "live": "https://s.vn/x", "days": ["mon"], "times": ["05:00"]},
     "items[0].duration_s: is required for a live item"),
    ({"id": "l", "live": {"url": "https://s.vn/x", "backups": ["file:///etc"]},
      "duration_s": 5, "days": ["mon"], "times": ["05:00"]},
     "items[0].live.backups[0]: must be an http, https or rtsp URL"),
    ({"id": "s", "say": {"text": "  "}, "days": ["mon"], "times": ["05:00"]},
     "items[0].say.text: must be a non-empty text"),
    ("not an item", "items[0]: must be an object"),
    (item(board_text=""), "items[0].board_text: must be a non-empty text of at most 500"),
    (item(board_text="x" * 501), "items[0].board_text: must be a non-empty text of at most 500"),
    (item(board_text=5), "items[0].board_text: must be a non-empty text of at most 500"),
    (item(board_txt="Bản tin"), "items[0].board_txt: unknown key (did you mean 'board_text'?)"),
])
def test_invalid_item_errors_name_the_key(raw, expected):
    errors = validate_schedule_args({"items": [raw]})
    assert any(expected in e for e in errors), errors


def test_board_text_is_checked_like_a_commands_and_carried_by_the_item():
    from agent.audio.commands import validate_say

    for text in ("Bản tin sáng", "", "  ", "ệ" * 501, 7):
        in_item = [e.split(": ", 1)[1] for e in
                   validate_schedule_args({"items": [item(board_text=text)]})]
        in_command = [e.split(": ", 1)[1] for e in validate_say({"text": "a", "board_text": text})]
        assert in_item == in_command, text  # one rule, one message (agent/args.py)
    book = book_with(item(board_text="Bản tin sáng"), item("plain"))
    items = {i.id: i for _, i in book.items()}
    assert items["news"].board_text == "Bản tin sáng" and items["plain"].board_text is None


def test_document_level_errors():
    assert validate_schedule_args([]) == ["args: must be an object"]
    assert validate_schedule_args({}) == ["items: is required"]
    assert validate_schedule_args({"items": [], "itmes": []}) == [
        "args.itmes: unknown key (did you mean 'items'?)"]
    too_many = {"items": [item(f"i{n}") for n in range(501)]}
    assert validate_schedule_args(too_many) == ["items: must be a list of at most 500 items"]
    assert validate_schedule_args({"items": [item(f"i{n}") for n in range(500)]}) == []
    dup = validate_schedule_args({"items": [item("a"), item("a")]})
    assert dup == ["items[1].id: duplicate id 'a'"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
key_names = st.sampled_from(sorted({
    "id", "media", "live", "say", "days", "dates", "times", "from", "until", "timezone",
    "priority", "volume", "duration_s", "catch_up_s", "repeat", "url", "sha256", "lang",
    "text", "backups", "fallback", "bogus"}))
plausible_values = st.one_of(
    json_values,
    st.sampled_from(["mon", "sun", "05:00", "24:00", "2025-02-29", "2024-02-29", SHA,
                     "https://m.vn/a", "rtsp://x", "Asia/Ho_Chi_Minh", "emergency", "vi"]),
    st.lists(st.sampled_from(["mon", "05:00", "2025-01-01", "x"]), max_size=3),
)
item_dicts = st.recursive(
    st.dictionaries(key_names, plausible_values, max_size=8),
    lambda children: st.dictionaries(key_names, children | plausible_values, max_size=6),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"items": st.lists(item_dicts, max_size=4)})))
def test_validation_never_raises_on_random_input(args):
    errors = validate_schedule_args(args)
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)
    book = ScheduleBook()
    applied, reason = book.apply("dev/c03", 1, args)
    assert applied == (errors == [])
    if not applied:
        assert reason.startswith("bad_args: ")


valid_items = st.fixed_dictionaries(
    {"id": st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
     "say": st.text(min_size=1, max_size=30).filter(str.strip),
     "days": st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
                      min_size=1, max_size=7, unique=True),
     "times": st.lists(st.times().map(lambda t: t.strftime("%H:%M")), min_size=1, max_size=48,
                       unique=True)},
    optional={"priority": st.sampled_from(["emergency", "priority", "normal"]),
              "volume": st.integers(0, 100), "repeat": st.integers(1, 10),
              "catch_up_s": st.integers(0, 86_400),
              "timezone": st.sampled_from([HCM, BERLIN, "UTC", "America/New_York"])},
)


@settings(max_examples=100, deadline=None)
@given(valid_items)
def test_generated_valid_items_validate_and_expand(raw):
    assert validate_schedule_args({"items": [raw]}) == []
    book = book_with(raw)
    tz = raw.get("timezone", HCM)
    # a local week (Monday to Monday) holding the Berlin DST change
    slots = book.slots_between(ms(2025, 3, 24, tz=tz), ms(2025, 3, 31, tz=tz))
    assert len(slots) == len(raw["days"]) * len(raw["times"])
    assert len({s.key for s in slots}) == len(slots)


# --- book: revisions and union ---------------------------------------------------------------

def test_rev_rules_higher_replaces_equal_and_lower_are_stale():
    book = ScheduleBook()
    assert book.apply("grp/krongpa", 5, {"items": [item("a")]}) == (True, "applied")
    assert book.apply("grp/krongpa", 5, {"items": [item("b")]}) == (False, "stale_rev")
    assert book.apply("grp/krongpa", 4, {"items": [item("old")]}) == (False, "stale_rev")
    assert [i.id for _, i in book.items()] == ["a"]
    assert book.apply("grp/krongpa", 6, {"items": [item("b"), item("c")]}) == (True, "applied")
    assert [i.id for _, i in book.items()] == ["b", "c"]  # replaced whole, not merged
    assert book.revisions() == {"grp/krongpa": 6}


def test_invalid_document_keeps_the_previous_one():
    book = book_with(item("a"))
    applied, reason = book.apply("dev/c03", 2, {"items": [item("b", times=["25:00"])]})
    assert not applied and reason.startswith("bad_args: items[0].times[0]")
    assert [i.id for _, i in book.items()] == ["a"]
    assert book.revisions() == {"dev/c03": 1}
    assert book.apply("dev/c03", 2, {"items": [item("b")]}) == (True, "applied")


def test_empty_items_clear_the_topic_but_keep_its_rev_against_rollback():
    book = book_with(item("a"))
    assert book.apply("dev/c03", 7, {"items": []}) == (True, "cleared")
    assert list(book.items()) == []
    assert book.apply("dev/c03", 6, {"items": [item("a")]}) == (False, "stale_rev")
    assert book.revisions() == {"dev/c03": 7}


def test_bad_topic_and_rev_are_refused():
    book = ScheduleBook()
    assert book.apply("other/x", 1, {"items": []}) == (False, "bad_topic")
    assert book.apply("dev/c03", "2", {"items": []}) == (False, "bad_rev")
    assert book.apply("dev/c03", True, {"items": []}) == (False, "bad_rev")
    assert book.apply("dev/c03", -1, {"items": []}) == (False, "bad_rev")
    with pytest.raises(ValueError):
        ScheduleBook("Nowhere/Town")


def test_effective_schedule_is_the_union_with_namespaced_ids():
    book = ScheduleBook()
    book.apply("dev/c03", 1, {"items": [item("news", times=["05:00"])]})
    book.apply("grp/krongpa", 9, {"items": [item("news", times=["05:00"], priority="priority"),
                                            item("music", times=["17:00"])]})
    book.apply("grp/all", 3, {"items": [item("anthem", times=["05:00"])]})
    day = book.slots_between(ms(2025, 12, 1), ms(2025, 12, 2))  # a Monday
    assert [s.source for s in day] == [
        "grp/krongpa:news", "dev/c03:news", "grp/all:anthem", "grp/krongpa:music"]
    assert len({s.key for s in day}) == 4
    assert book.revisions() == {"dev/c03": 1, "grp/all": 3, "grp/krongpa": 9}


# --- slots -----------------------------------------------------------------------------------

def test_four_weeks_in_ho_chi_minh():
    book = book_with(item())
    slots = book.slots_between(ms(2025, 12, 1), ms(2025, 12, 29))  # Mon 1 .. Sun 28
    assert len(slots) == 4 * 6 * 2
    assert all(utc(s.due_ms).hour in (22, 10) for s in slots)  # UTC+7, no DST
    assert not any(datetime.fromtimestamp(s.due_ms / 1000, ZoneInfo(HCM)).weekday() == 6
                   for s in slots)
    assert slots[0].key == "dev/c03:news@2025-12-01T05:00"
    assert slots[0].due_ms == ms(2025, 12, 1, 5)
    assert slots[-1].key == "dev/c03:news@2025-12-27T17:00"
    assert [s.due_ms for s in slots] == sorted(s.due_ms for s in slots)


def test_berlin_spring_forward_gap_airs_at_0330_summer_time():
    book = book_with(item(days=["sun", "sat", "mon"], times=["02:30", "08:00"]), tz=BERLIN)
    slots = book.slots_between(ms(2025, 3, 29, tz=BERLIN), ms(2025, 4, 1, tz=BERLIN))
    by_key = {s.key: s.due_ms for s in slots}
    gap = by_key["dev/c03:news@2025-03-30T02:30"]
    assert utc(gap) == datetime(2025, 3, 30, 1, 30, tzinfo=UTC)
    assert datetime.fromtimestamp(gap / 1000, ZoneInfo(BERLIN)).strftime("%H:%M") == "03:30"
    mornings = [by_key[f"dev/c03:news@2025-03-{d}T08:00"] for d in (29, 30, 31)]
    assert [b - a for a, b in pairwise(mornings)] == [23 * HOUR_MS, 24 * HOUR_MS]
    assert len(slots) == 6


def test_berlin_fall_back_repeated_hour_airs_once_at_first_occurrence():
    book = book_with(item(days=["sat", "sun", "mon"], times=["02:30", "08:00"]), tz=BERLIN)
    slots = book.slots_between(ms(2025, 10, 25, tz=BERLIN), ms(2025, 10, 28, tz=BERLIN))
    twice = [s for s in slots if s.key == "dev/c03:news@2025-10-26T02:30"]
    assert len(twice) == 1
    assert utc(twice[0].due_ms) == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)  # 02:30 CEST
    mornings = [s.due_ms for s in slots if s.key.endswith("T08:00")]
    assert [b - a for a, b in pairwise(mornings)] == [25 * HOUR_MS, 24 * HOUR_MS]


def test_a_year_in_berlin_has_one_slot_per_day_and_unique_keys():
    book = book_with(item(days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                          times=["02:30"]), tz=BERLIN)
    slots = book.slots_between(ms(2025, 1, 1, tz=BERLIN), ms(2026, 1, 1, tz=BERLIN))
    assert len(slots) == 365
    assert len({s.key for s in slots}) == 365


def test_item_timezone_overrides_the_device_timezone():
    book = book_with(item(times=["05:00"], timezone=BERLIN))
    (slot,) = book.slots_between(ms(2025, 12, 1), ms(2025, 12, 2))
    assert slot.due_ms == ms(2025, 12, 1, 5, tz=BERLIN)


def test_dates_and_from_until_are_inclusive():
    book = book_with(
        item("d", days=None, dates=["2025-12-03", "2025-12-25"], times=["09:00"]),
        item("w", days=["wed"], times=["10:00"], **{"from": "2025-12-03", "until": "2025-12-17"}),
        item("x", days=None, dates=["2025-12-10"], times=["11:00"], until="2025-12-09"),
    )
    slots = book.slots_between(ms(2025, 11, 1), ms(2026, 2, 1))
    assert [s.key.split(":", 1)[1] for s in slots] == [
        "d@2025-12-03T09:00", "w@2025-12-03T10:00", "w@2025-12-10T10:00",
        "w@2025-12-17T10:00", "d@2025-12-25T09:00"]


def test_same_time_orders_by_priority_then_document_order():
    book = book_with(item("n1", times=["05:00"]), item("e", times=["05:00"], priority="emergency"),
                     item("n2", times=["05:00"]), item("p", times=["05:00"], priority="priority"))
    slots = book.slots_between(ms(2025, 12, 1), ms(2025, 12, 2))
    assert [s.item_id for s in slots] == ["e", "p", "n1", "n2"]


def test_next_slots_skip_far_ahead():
    book = book_with(item("once", days=None, dates=["2026-06-01"], times=["06:00"]), item())
    nxt = book.next_slots(ms(2025, 12, 6, 17, 0), 3)  # Saturday 17:00: the slot itself counts
    assert [s.key.split(":", 1)[1] for s in nxt] == [
        "news@2025-12-06T17:00", "news@2025-12-08T05:00", "news@2025-12-08T17:00"]
    far = ScheduleBook()
    far.apply("dev/c03", 1, {"items": [item("once", days=None, dates=["2026-06-01"])]})
    assert [s.due_ms for s in far.next_slots(ms(2025, 12, 6), 5)] == [
        ms(2026, 6, 1, 5), ms(2026, 6, 1, 17)]


# --- planner ---------------------------------------------------------------------------------

def planner_for(book: ScheduleBook, clock: FakeClock, log: SlotLog | None = None, **kw):
    return SchedulePlanner(book, clock, log=log if log is not None else SlotLog(), **kw)


def test_slot_airs_once_on_time_and_never_again():
    clock = FakeClock(ms(2025, 12, 1, 4, 59))
    planner = planner_for(book_with(item()), clock)
    assert planner.due(clock.now_ms(), True).due == []
    assert planner.next_deadline_ms(clock.now_ms()) == ms(2025, 12, 1, 5)
    clock.advance(60)
    result = planner.due(clock.now_ms(), True)
    assert [s.key for s in result.due] == ["dev/c03:news@2025-12-01T05:00"]
    assert not result.skipped and not result.held
    for _ in range(5):
        clock.advance(1)
        assert planner.due(clock.now_ms(), True).due == []
    assert planner.next_deadline_ms(clock.now_ms()) == ms(2025, 12, 1, 17)


def test_a_week_of_ticks_airs_every_slot_exactly_once():
    clock = FakeClock(ms(2025, 12, 1))
    planner = planner_for(book_with(item(), item("noon", times=["12:00"], days=["sun"])), clock)
    aired = []
    while clock.now_ms() < ms(2025, 12, 8):
        result = planner.due(clock.now_ms(), True)
        assert not result.skipped
        aired += [s.key for s in result.due]
        deadline = planner.next_deadline_ms(clock.now_ms())
        clock.advance(min(deadline - clock.now_ms(), 7 * MINUTE_MS) / 1000)  # like a real loop
    assert len(aired) == 6 * 2 + 1 == len(set(aired))


def test_slightly_late_tick_still_airs_within_grace():
    clock = FakeClock(ms(2025, 12, 1, 5) + 5_000)
    planner = planner_for(book_with(item(catch_up_s=0)), clock)
    assert len(planner.due(clock.now_ms(), True).due) == 1


def test_restart_between_two_slots_airs_each_once(tmp_path):
    path = tmp_path / "slots.json"
    book = book_with(item())
    clock = FakeClock(ms(2025, 12, 1, 5))
    first = planner_for(book, clock, SlotLog(path))
    assert len(first.due(clock.now_ms(), True).due) == 1
    clock.advance(3600)  # restart at 06:00: a new process, a new planner on the same file
    second = planner_for(book, clock, SlotLog(path), catch_up_default=86_400)
    assert second.due(clock.now_ms(), True).due == []  # 05:00 is not aired again
    clock.advance(11 * 3600)
    assert [s.key for s in second.due(clock.now_ms(), True).due] == [
        "dev/c03:news@2025-12-01T17:00"]
    third = planner_for(book, clock, SlotLog(path), catch_up_default=86_400)
    assert third.due(clock.now_ms(), True).due == []


def test_power_cut_catch_up_within_and_beyond(tmp_path):
    path = tmp_path / "slots.json"
    book = book_with(item("short", times=["05:00"], catch_up_s=600),
                     item("long", times=["05:00"], catch_up_s=3600),
                     item("none", times=["05:00"]))
    clock = FakeClock(ms(2025, 12, 1, 4, 50))
    before = planner_for(book, clock, SlotLog(path))
    assert before.due(clock.now_ms(), True).due == []
    before.log.save()  # nothing decided: the power goes at 04:50; back at 05:20
    clock.advance(30 * 60)
    after = planner_for(book, clock, SlotLog(path))
    result = after.due(clock.now_ms(), True)
    assert [s.item_id for s in result.due] == ["long"]
    assert sorted(s.item_id for s in result.skipped) == ["none", "short"]
    reborn = planner_for(book, clock, SlotLog(path))  # decisions were persisted
    assert reborn.log.outcome("dev/c03:short@2025-12-01T05:00") == SKIPPED
    assert reborn.log.outcome("dev/c03:long@2025-12-01T05:00") == AIRED
    again = reborn.due(clock.now_ms(), True)
    assert again.due == [] and again.skipped == []


def test_long_outage_reports_at_most_a_day_of_skipped_slots(tmp_path):
    path = tmp_path / "slots.json"
    book = book_with(item())
    clock = FakeClock(ms(2025, 12, 1, 5))
    planner_for(book, clock, SlotLog(path)).due(clock.now_ms(), True)
    clock.advance(5 * 86_400)  # Saturday 05:00
    result = planner_for(book, clock, SlotLog(path)).due(clock.now_ms(), True)
    assert [s.key for s in result.due] == ["dev/c03:news@2025-12-06T05:00"]
    assert [s.key for s in result.skipped] == [
        "dev/c03:news@2025-12-05T05:00", "dev/c03:news@2025-12-05T17:00"]


def test_forward_jump_of_one_hour_applies_catch_up():
    book = book_with(item("strict", times=["05:30"]),
                     item("lenient", times=["05:30"], catch_up_s=3600),
                     item("later", times=["06:30"]))
    clock = FakeClock(ms(2025, 12, 1, 5, 0))
    planner = planner_for(book, clock)
    planner.due(clock.now_ms(), True)
    clock.jump(HOUR_MS)
    planner.on_clock_jump(clock.now_ms() - HOUR_MS, clock.now_ms())
    result = planner.due(clock.now_ms(), True)
    assert [s.item_id for s in result.due] == ["lenient"]
    assert [s.item_id for s in result.skipped] == ["strict"]
    assert planner.next_deadline_ms(clock.now_ms()) == ms(2025, 12, 1, 6, 30)
    clock.advance(30 * 60)
    assert [s.item_id for s in planner.due(clock.now_ms(), True).due] == ["later"]


def test_backward_jump_of_one_hour_airs_nothing_twice_and_skips_nothing():
    book = book_with(item("a", times=["05:00"]), item("b", times=["05:30"]),
                     item("c", times=["06:30"]))
    clock = FakeClock(ms(2025, 12, 1, 4, 59))
    planner = planner_for(book, clock)
    aired = []

    def run_until(end_ms: int) -> None:
        while clock.now_ms() <= end_ms:
            result = planner.due(clock.now_ms(), True)
            assert result.skipped == []
            aired.extend(s.item_id for s in result.due)
            clock.advance(60)

    run_until(ms(2025, 12, 1, 6, 0))
    assert aired == ["a", "b"]
    clock.jump(-HOUR_MS)  # 05:01 again
    planner.on_clock_jump(clock.now_ms() + HOUR_MS, clock.now_ms())
    assert planner.next_deadline_ms(clock.now_ms()) == ms(2025, 12, 1, 6, 30)
    run_until(ms(2025, 12, 1, 7, 0))
    assert aired == ["a", "b", "c"]


def test_untrusted_clock_holds_everything_then_catch_up_applies():
    book = book_with(item("a", times=["05:00"], catch_up_s=900), item("b", times=["05:00"]))
    clock = FakeClock(ms(2025, 12, 1, 4, 55))
    planner = planner_for(book, clock)
    while clock.now_ms() < ms(2025, 12, 1, 5, 10):
        result = planner.due(clock.now_ms(), False)
        assert result.held and result.due == [] and result.skipped == []
        clock.advance(60)
    assert len(planner.log) == 0
    result = planner.due(clock.now_ms(), True)  # trusted at 05:10
    assert not result.held
    assert [s.item_id for s in result.due] == ["a"]
    assert [s.item_id for s in result.skipped] == ["b"]


def test_boot_at_1970_airs_nothing_marks_nothing_then_jump_to_real_time(tmp_path):
    path = tmp_path / "slots.json"
    book = book_with(item(days=["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                          times=["00:00", "05:00", "17:00"], catch_up_s=600))
    yesterday = FakeClock(ms(2025, 11, 30, 17, 0))  # the last session before the power cut
    assert len(planner_for(book, yesterday, SlotLog(path)).due(yesterday.now_ms(), True).due) == 1
    saved = path.read_bytes()
    clock = FakeClock(0)  # no RTC: the board boots at 1970
    planner = planner_for(book, clock, SlotLog(path))
    for _ in range(3 * 24):
        assert planner.due(clock.now_ms(), False).held
        assert planner.due(clock.now_ms(), True).held  # 1970 is not believed even if "trusted"
        clock.advance(3600)
    assert len(planner.log) == 1 and path.read_bytes() == saved
    real = ms(2025, 12, 1, 5, 5)
    old = clock.now_ms()
    clock.jump(real - old)
    planner.on_clock_jump(old, real)
    result = planner.due(clock.now_ms(), True)
    assert [s.key for s in result.due] == ["dev/c03:news@2025-12-01T05:00"]
    assert [s.key for s in result.skipped] == ["dev/c03:news@2025-12-01T00:00"]
    assert sorted(SlotLog(path).entries) == [  # nothing from 1970
        "dev/c03:news@2025-11-30T17:00", "dev/c03:news@2025-12-01T00:00",
        "dev/c03:news@2025-12-01T05:00"]


def test_due_lists_emergency_first():
    book = book_with(item("n", times=["05:00"], catch_up_s=600),
                     item("e", times=["05:05"], priority="emergency"))
    clock = FakeClock(ms(2025, 12, 1, 5, 5))
    result = planner_for(book, clock).due(clock.now_ms(), True)
    assert [s.item_id for s in result.due] == ["e", "n"]


def test_new_document_with_a_removed_item_does_not_air_it():
    book = book_with(item("a", times=["05:00"]), item("b", times=["05:00"]))
    clock = FakeClock(ms(2025, 12, 1, 4, 0))
    planner = planner_for(book, clock)
    assert planner.snapshot(clock.now_ms())["next"]["id"] == "dev/c03:a"
    book.apply("dev/c03", 2, {"items": [item("b", times=["05:00"])]})
    clock.advance(3600)
    assert [s.item_id for s in planner.due(clock.now_ms(), True).due] == ["b"]


def test_media_needed_and_missing_media_alerts():
    other = {"url": "https://m.vn/b.mp3", "sha256": SHA2}
    fb = {"url": "https://m.vn/fb.mp3", "sha256": "ef" * 32}
    book = book_with(
        item("a", times=["05:00"]),
        item("b", days=["sun"], times=["05:00"], media=[other]),
        {"id": "l", "live": {"url": "https://s.vn/x", "fallback": fb}, "duration_s": 60,
         "days": ["mon"], "times": ["06:00"]},
        item("s", days=None, dates=["2026-01-20"], media={"url": "https://m.vn/s", "sha256": SHA}),
        {"id": "t", "say": "xin chào", "days": ["mon"], "times": ["05:00"]},
    )
    clock = FakeClock(ms(2025, 12, 1, 4, 0))  # a Monday
    planner = planner_for(book, clock)
    assert planner.media_needed(clock.now_ms(), days=7) == {
        ("https://media.example.vn/a.mp3", SHA), ("https://m.vn/b.mp3", SHA2),
        ("https://m.vn/fb.mp3", "ef" * 32)}
    assert planner.media_needed(clock.now_ms(), days=1) == {
        ("https://media.example.vn/a.mp3", SHA), ("https://m.vn/fb.mp3", "ef" * 32)}
    alerts = planner.missing_media_alerts(clock.now_ms(), {SHA}, lead_s=3 * 3600)
    assert [(a.source, a.due_ms, a.missing) for a in alerts] == [
        ("dev/c03:l", ms(2025, 12, 1, 6), (("https://m.vn/fb.mp3", "ef" * 32),))]
    assert planner.missing_media_alerts(clock.now_ms(), {SHA}, lead_s=1800) == []
    assert planner.missing_media_alerts(clock.now_ms(), {SHA, "ef" * 32}, 3 * 3600) == []


def test_snapshot_reports_revisions_and_next_item():
    book = ScheduleBook()
    book.apply("dev/c03", 4, {"items": [item("a", times=["17:00"])]})
    book.apply("grp/krongpa", 12, {"items": [item("e", times=["05:00"], priority="emergency")]})
    planner = planner_for(book, FakeClock(ms(2025, 12, 1, 1)))
    assert planner.snapshot() == {
        "revisions": {"dev/c03": 4, "grp/krongpa": 12},
        "next": {"id": "grp/krongpa:e", "due": ms(2025, 12, 1, 5), "priority": "emergency"}}
    assert planner_for(ScheduleBook(), FakeClock()).snapshot() == {"revisions": {}, "next": None}
    assert planner_for(ScheduleBook(), FakeClock()).next_deadline_ms() is None


def test_first_jump_from_a_plausible_time_reports_what_was_jumped_over():
    """fake-hwclock restores the last shutdown time at boot; NTP then steps it forward."""
    book = book_with(item("a", times=["05:00"]), item("b", times=["07:00"], catch_up_s=3600))
    clock = FakeClock(ms(2025, 12, 1, 4, 0))
    planner = planner_for(book, clock)
    assert planner.due(clock.now_ms(), False).held  # untrusted until NTP answers
    clock.jump(4 * HOUR_MS)  # 08:00
    planner.on_clock_jump(ms(2025, 12, 1, 4, 0), clock.now_ms())
    result = planner.due(clock.now_ms(), True)
    assert [s.item_id for s in result.due] == ["b"]
    assert [s.item_id for s in result.skipped] == ["a"]
    assert planner.last_jump == (ms(2025, 12, 1, 4, 0), ms(2025, 12, 1, 8, 0))


def test_slot_window_is_half_open():
    book = book_with(item(times=["05:00"]))
    at = ms(2025, 12, 1, 5)
    assert [s.due_ms for s in book.slots_between(at, at + 1)] == [at]
    assert book.slots_between(at - 1, at) == []
    assert book.slots_between(at + 1, at + DAY_MS) == []  # Tuesday's 05:00 is at + DAY_MS
