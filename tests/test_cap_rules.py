"""CAP 1.2 ingest, the pure parts: reading (schema, hostile XML), each mapping rule, areas,
the commands planned. The end-to-end paths with a real broker and agents are in
test_cap_e2e.py."""

from __future__ import annotations

import re
import string
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.config import ConfigError, load_file
from agent.protocol import Priority
from ctl.cap import mapping as m
from ctl.cap import plan
from ctl.cap.areas import distance_km, resolve
from ctl.cap.parse import CapInvalid, parse
from ctl.config import CTL_SCHEMA
from tests.pg_support import pg_url_fixture, postgres_fixture  # noqa: F401

CAP_DIR = Path(__file__).parent / "cap"
SENDER = "canhbao@kttv-gialai.gov.vn"
VN = timezone(timedelta(hours=7))


def cap_time(dt: datetime) -> str:
    return dt.astimezone(VN).replace(microsecond=0).isoformat()


def fill(name: str, **values) -> bytes:
    """A Vietnamese fixture with its times filled in (defaults: sent now, onset a minute ago,
    expires in an hour)."""
    now = datetime.now(VN)
    defaults = {"SENT": cap_time(now), "ONSET": cap_time(now - timedelta(minutes=1)),
                "EXPIRES": cap_time(now + timedelta(hours=1)), "REF_SENT": cap_time(now),
                "REFERENCES": "a@b,c,2026-01-01T00:00:00+07:00"}
    text = (CAP_DIR / "vn" / name).read_text(encoding="utf-8")
    return string.Template(text).substitute({**defaults, **values}).encode()


def config(tmp_path: Path, **cap) -> dict:
    path = tmp_path / "ctl.yaml"
    import yaml

    path.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "relay": {"db_path": str(tmp_path / "relay.db"),
                  "groups": {"krongpa": ["krongpa-*"], "iarsai": ["krongpa-iarsai-*"]}},
        "locations": {"krongpa-phutuc-c03": [13.20, 108.68],
                      "krongpa-iarsai-c01": [13.05, 108.85]},
        "cap": {"geocodes": {"VN-DISTRICT=0640": ["krongpa"]},
                "area_names": {"Huyện Krông Pa, tỉnh Gia Lai": ["krongpa"]},
                "languages": {"krongpa": ["vi", "en"]}, **cap},
    }, allow_unicode=True))
    return load_file(str(path), CTL_SCHEMA)


NOW = int(time.time() * 1000)


# --- reading ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (CAP_DIR / "oasis").glob("*.xml")))
def test_the_oasis_specification_examples_are_valid(name):
    alert = parse((CAP_DIR / "oasis" / name).read_bytes())
    assert alert.identifier and alert.sender and alert.infos
    assert alert.status == "Actual"


def test_oasis_examples_read_as_the_specification_says():
    quake = parse((CAP_DIR / "oasis" / "a3-earthquake-update.xml").read_bytes())
    assert quake.msg_type == "Update"
    assert [(r.sender, r.identifier) for r in quake.references] == [
        ("trinet@caltech.edu", "TRI13970876.1")]
    assert quake.infos[0].areas[0].circles == [(32.9525, -115.5527, 0.0)]
    storm = parse((CAP_DIR / "oasis" / "a2-thunderstorm.xml").read_bytes())
    area = storm.infos[0].areas[0]
    assert area.polygons[0][0] == (38.47, -120.14) and len(area.polygons[0]) == 5
    assert ("SAME", "006109") in area.geocodes
    amber = parse((CAP_DIR / "oasis" / "a4-amber-multilingual.xml").read_bytes())
    assert [i.lang for i in amber.infos] == ["en", "es"]
    assert parse((CAP_DIR / "oasis" / "a1-homeland-security.xml").read_bytes()).infos[0] \
        .language == "en-US"  # the schema's default when absent


def test_vietnamese_fixtures_are_valid():
    for name in ("typhoon-krongpa.xml", "typhoon-krongpa-cancel.xml", "flood-ba-river.xml",
                 "flood-ba-river-update.xml", "flood-ba-river-cancel.xml", "typhoon-test.xml"):
        alert = parse(fill(name))
        assert alert.infos[0].lang == "vi"
    assert parse((CAP_DIR / "vn" / "expired.xml").read_bytes()).infos[0].expires.year == 2025


def test_an_invalid_message_lists_every_problem_with_its_line():
    with pytest.raises(CapInvalid) as e:
        parse((CAP_DIR / "vn" / "malformed.xml").read_bytes())
    problems = e.value.problems
    assert any(p.startswith("line 6:") and "status" in p for p in problems), problems
    # the schema stops at the first unexpected element of a sequence; the text rules are
    # checked on a message that passes the schema:
    text = fill("typhoon-krongpa.xml").replace(
        b"13.15,108.62 13.25,108.62</polygon>", b"13.15,108.62</polygon>")
    text = text.replace(b"</polygon>", b"</polygon>\n      <circle>13.2,108.6</circle>")
    with pytest.raises(CapInvalid) as e:
        parse(text)
    lines = text.decode().splitlines()
    poly_line = next(i for i, t in enumerate(lines, 1) if "<polygon>" in t)
    assert f"line {poly_line}: polygon: must be at least four" in e.value.problems[0]
    assert f"line {poly_line + 1}: circle:" in e.value.problems[1]


def test_bad_enumeration_and_not_well_formed():
    bad = fill("flood-ba-river.xml").replace(b"<urgency>Immediate", b"<urgency>Soon", 1)
    with pytest.raises(CapInvalid) as e:
        parse(bad)
    line = next(i for i, t in enumerate(bad.decode().splitlines(), 1) if "Soon" in t)
    assert "urgency" in e.value.problems[0] and e.value.problems[0].startswith(f"line {line}:")
    with pytest.raises(CapInvalid) as e:
        parse(b"<alert xmlns='urn:oasis:names:tc:emergency:cap:1.2'>\n<identifier>x</alert>")
    assert e.value.problems[0].startswith("line 2: not well-formed")
    with pytest.raises(CapInvalid):
        parse(b"<alert xmlns='urn:oasis:names:tc:emergency:cap:1.1'/>")  # CAP 1.1: not ours


@pytest.mark.parametrize("name", ["billion-laughs.xml", "xxe.xml"])
def test_entity_attacks_are_refused_before_expansion(name):
    started = time.monotonic()
    with pytest.raises(CapInvalid) as e:
        parse((CAP_DIR / "vn" / name).read_bytes())
    assert "DTD or entity declaration is not allowed" in e.value.problems[0]
    assert e.value.problems[0].startswith("line 2:")
    assert time.monotonic() - started < 1  # nothing was expanded


def test_times_need_their_offset():
    for sent in ("2026-11-30T07:00:00,07:00", "2026-11-30T07:00:00Z", "2026-11-30T07:00:00"):
        with pytest.raises(CapInvalid) as e:
            parse(fill("flood-ba-river.xml", SENT=sent))
        assert "Element 'sent'" in e.value.problems[0]


@pytest.mark.parametrize("data", [
    b"<a>" * 100_000 + b"</a>" * 100_000,  # deeper than lxml's 256 without huge_tree
    b"\xff\xfe<bad", b"", b"   ",
    b'<?xml version="1.0" encoding="EBCDIC"?><a/>',  # an encoding Python does not know
    b'<?xml version="1.0" encoding="UTF-16"?><a/>',  # declared UTF-16, is not
    "<alert xmlns='urn:oasis:names:tc:emergency:cap:1.2'>\u0000</alert>".encode(),
])
def test_hostile_bytes_are_a_clear_problem_never_a_crash(data):
    with pytest.raises(CapInvalid) as e:
        parse(data)
    assert e.value.problems[0].startswith("line ")


def test_an_oversized_message_is_refused():
    with pytest.raises(CapInvalid, match="at most"):
        parse(b"<a>" + b" " * (1024 * 1024) + b"</a>")


# --- mapping rules ---------------------------------------------------------------------

def test_status_rules(tmp_path):
    cfg = config(tmp_path)
    flood = parse(fill("flood-ba-river.xml"))
    assert m.decide(flood, cfg["cap"], NOW).action == m.AIR
    test = parse(fill("typhoon-test.xml"))
    assert m.decide(test, cfg["cap"], NOW).action == m.RECORD  # no test group: recorded
    with_group = config(tmp_path, test_group="thunghiem")
    assert m.decide(test, with_group["cap"], NOW).action == m.TEST
    exercise = parse(fill("typhoon-test.xml").replace(b"<status>Test", b"<status>Exercise"))
    assert m.decide(exercise, with_group["cap"], NOW).action == m.TEST
    for status in (b"System", b"Draft"):
        other = parse(fill("flood-ba-river.xml").replace(b"<status>Actual",
                                                          b"<status>" + status))
        d = m.decide(other, with_group["cap"], NOW)
        assert d.action == m.RECORD and "never aired" in d.why


def test_msgtype_rules(tmp_path):
    cfg = config(tmp_path)
    for kind, action in ((b"Ack", m.RECORD), (b"Error", m.RECORD)):
        a = parse(fill("flood-ba-river.xml").replace(b"<msgType>Alert", b"<msgType>" + kind))
        assert m.decide(a, cfg["cap"], NOW).action == action
    assert m.decide(parse(fill("flood-ba-river-update.xml")), cfg["cap"], NOW).action == m.AIR
    assert m.decide(parse(fill("flood-ba-river-cancel.xml")), cfg["cap"], NOW).action \
        == m.CANCEL


def test_scope_rules(tmp_path):
    text = fill("flood-ba-river.xml").replace(b"<scope>Public", b"<scope>Restricted")
    restricted = parse(text)
    d = m.decide(restricted, config(tmp_path)["cap"], NOW)
    assert d.action == m.REFUSE and "cap.scopes.Restricted" in d.why
    allowed = config(tmp_path, scopes={"Restricted": ["canhbao@kttv-gialai.gov.vn"]})
    assert m.decide(restricted, allowed["cap"], NOW).action == m.AIR
    private = parse(fill("flood-ba-river.xml").replace(b"<scope>Public", b"<scope>Private"))
    assert m.decide(private, allowed["cap"], NOW).action == m.REFUSE


def test_sender_allow_list(tmp_path):
    flood = parse(fill("flood-ba-river.xml"))
    assert m.decide(flood, config(tmp_path, senders=["other@x.vn"])["cap"], NOW).action \
        == m.REFUSE
    assert m.decide(flood, config(tmp_path, senders=[flood.sender])["cap"], NOW).action == m.AIR


def test_expired_alert_is_refused(tmp_path):
    old = parse((CAP_DIR / "vn" / "expired.xml").read_bytes())
    d = m.decide(old, config(tmp_path)["cap"], NOW)
    assert d.action == m.REFUSE and "expired" in d.why


def test_priority_table_default_and_configured(tmp_path):
    rules = config(tmp_path)["cap"]["priority"]
    flood = parse(fill("flood-ba-river.xml")).infos[0]  # Immediate Severe Observed
    assert m.priority_of(flood, rules) == Priority.EMERGENCY
    from dataclasses import replace

    assert m.priority_of(replace(flood, severity="Moderate"), rules) == Priority.PRIORITY
    assert m.priority_of(replace(flood, urgency="Future"), rules) == Priority.NORMAL
    assert m.priority_of(replace(flood, certainty="Possible"), rules) == Priority.NORMAL
    own = config(tmp_path, priority=[{"severity": ["Severe"], "priority": "priority"}])
    assert m.priority_of(flood, own["cap"]["priority"]) == Priority.PRIORITY


def test_priority_config_is_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, priority=[{"severity": ["Severee"], "priority": "urgent"}])
    text = "\n".join(e.value.problems)
    assert "cap.priority[0].severity[0]" in text and "did you mean 'Severe'" in text
    assert "cap.priority[0].priority" in text


def test_time_rules(tmp_path):
    cap = config(tmp_path)["cap"]
    now = datetime.now(VN)
    NOW = int(now.timestamp() * 1000)  # this test's now, not the module's
    info = parse(fill("typhoon-krongpa.xml", ONSET=cap_time(now + timedelta(minutes=30)),
                      EXPIRES=cap_time(now + timedelta(hours=2)))).infos[0]
    t = m.timing(info, cap, NOW)
    assert abs(t.at_ms - (NOW + 30 * 60_000)) < 2000  # a future onset becomes `at`
    assert abs(t.exp_ms - (NOW + 2 * 3600_000)) < 2000  # expires becomes exp
    assert abs(t.board_s - 2 * 3600) < 3  # board text until expires
    past_onset = parse(fill("typhoon-krongpa.xml")).infos[0]
    assert m.timing(past_onset, cap, NOW).at_ms is None  # already begun: now
    no_expiry = parse(fill("flood-ba-river.xml").replace(b"<expires>", b"<!--").replace(
        b"</expires>", b"-->")).infos[0]
    assert m.timing(no_expiry, cap, NOW).exp_ms == NOW + cap["default_ttl_s"] * 1000
    far = parse(fill("typhoon-krongpa.xml", ONSET=cap_time(now + timedelta(days=8)),
                     EXPIRES=cap_time(now + timedelta(days=9)))).infos[0]
    assert m.timing(far, cap, NOW).too_far


def test_language_order():
    amber = parse((CAP_DIR / "oasis" / "a4-amber-multilingual.xml").read_bytes())
    assert [i.lang for i in m.choose_infos(amber.infos, ["es", "en"])] == ["es", "en"]
    assert [i.lang for i in m.choose_infos(amber.infos, ["vi"])] == ["en"]  # beats silence
    flood = parse(fill("flood-ba-river.xml"))
    assert [i.lang for i in m.choose_infos(flood.infos, ["vi", "jra"])] == ["vi"]


def test_spoken_and_board_text():
    info = parse(fill("flood-ba-river.xml")).infos[0]
    said = m.spoken(info)
    assert said.startswith("Lũ trên sông Ba vượt báo động 3. Mực nước")
    assert said.endswith("Sơ tán ngay khỏi vùng trũng ven sông Ba.")
    test = m.spoken(info, "Tin thử nghiệm")
    assert test.startswith("Tin thử nghiệm. ") and test.endswith(" Tin thử nghiệm.")
    assert m.board_text(info, 200) == ("Lũ trên sông Ba vượt báo động 3 — Sơ tán ngay khỏi"
                                       " vùng trũng ven sông Ba.")
    assert m.board_text(info, 40) == "Lũ trên sông Ba vượt báo động 3"  # no room
    assert m.board_text(info, 200, "Tin thử nghiệm").startswith("[TIN THỬ NGHIỆM] Lũ")


# --- areas -------------------------------------------------------------------------------

DEVICES = ["krongpa-phutuc-c03", "krongpa-iarsai-c01"]


def test_area_by_geocode_and_by_name(tmp_path):
    cfg = config(tmp_path)
    flood = parse(fill("flood-ba-river.xml"))
    t = resolve(flood.infos[0].areas, cfg, DEVICES)
    assert list(t) == ["grp/krongpa"]
    assert "geocode VN-DISTRICT=0640" in t.why["grp/krongpa"]
    assert "areaDesc 'Huyện Krông Pa, tỉnh Gia Lai'" in t.why["grp/krongpa"]
    unknown = parse(fill("flood-ba-river.xml").replace(b"<value>0640", b"<value>9999")
                    .replace(b"Huy\xe1\xbb\x87n Kr\xc3\xb4ng Pa", b"Huyen X"))
    assert not resolve(unknown.infos[0].areas, cfg, DEVICES)


def test_area_by_polygon_targets_exactly_the_devices_inside(tmp_path):
    cfg = config(tmp_path)
    typhoon = parse(fill("typhoon-krongpa.xml"))
    assert list(resolve(typhoon.infos[0].areas, cfg, DEVICES)) == ["dev/krongpa-phutuc-c03"]


def test_area_by_circle(tmp_path):
    cfg = config(tmp_path)
    assert 19 < distance_km((13.20, 108.68), (13.05, 108.85)) < 26
    quake = parse((CAP_DIR / "oasis" / "a3-earthquake-update.xml").read_bytes()
                  .replace(b"32.9525,-115.5527 0", b"13.06,108.84 5"))
    assert list(resolve(quake.infos[0].areas, cfg, DEVICES)) == ["dev/krongpa-iarsai-c01"]
    wide = parse((CAP_DIR / "oasis" / "a3-earthquake-update.xml").read_bytes()
                 .replace(b"32.9525,-115.5527 0", b"13.06,108.84 30"))
    assert len(list(resolve(wide.infos[0].areas, cfg, DEVICES))) == 2


def test_a_device_placed_by_its_group(tmp_path):
    cfg = config(tmp_path)
    cfg["locations"] = {"iarsai": [13.20, 108.68]}  # the commune's point, not the device's
    typhoon = parse(fill("typhoon-krongpa.xml"))
    assert list(resolve(typhoon.infos[0].areas, cfg, DEVICES)) == ["dev/krongpa-iarsai-c01"]


# --- the commands planned ----------------------------------------------------------------

def test_plan_one_id_per_command_on_every_target_and_language_order(tmp_path):
    cfg = config(tmp_path)
    flood = parse(fill("flood-ba-river.xml"))
    now_ms = int(time.time() * 1000)  # not NOW: a loaded machine may be seconds later here
    targets = [resolve(i.areas, cfg, DEVICES) for i in flood.infos]
    targets[0].add("dev/krongpa-phutuc-c03", "test")
    cmds = plan.airing(flood, targets, [None, None], cfg, now_ms, test=False, base="cap-x")
    by_target = {}
    for c in cmds:
        by_target.setdefault(c.target, []).append((c.cmd_id, c.type, c.lang))
    assert by_target["grp/krongpa"] == [("cap-x-a0", "say", "vi"), ("cap-x-b0", "board", "vi"),
                                        ("cap-x-a1", "say", "en")]
    # the device through a second target: the same ids, so it airs them once
    assert by_target["dev/krongpa-phutuc-c03"][0] == ("cap-x-a0", "say", "vi")
    say = next(c for c in cmds if c.cmd_id == "cap-x-a0")
    assert say.args["priority"] == "emergency" and say.args["repeat"] == 2
    assert say.args["lang"] == "vi" and "at" not in say.args
    board = next(c for c in cmds if c.cmd_id == "cap-x-b0")
    assert board.args["priority"] == "emergency" and 3590 <= board.args["duration_s"] <= 3601
    assert board.exp_ms == say.exp_ms


def test_plan_a_test_is_marked_and_never_urgent(tmp_path):
    cfg = config(tmp_path, test_group="thunghiem")
    test = parse(fill("typhoon-test.xml"))
    t = plan.airing(test, [resolve([], cfg, DEVICES)], [None], cfg, NOW, test=True,
                    base="cap-t")
    assert t == []  # no target: nothing
    from ctl.cap.areas import Targets

    tg = Targets()
    tg.add("grp/thunghiem", "cap.test_group")
    cmds = plan.airing(test, [tg], [None], cfg, NOW, test=True, base="cap-t")
    say, board = cmds
    assert say.args["priority"] == "normal" and board.args["priority"] == "normal"
    assert say.args["text"].startswith("Tin thử nghiệm.")
    assert board.args["text"].startswith("[TIN THỬ NGHIỆM]")


def test_plan_stops_each_referenced_command_on_its_target():
    rows = [{"cmd_id": "cap-a-a0", "target": "grp/krongpa", "type": "say"},
            {"cmd_id": "cap-a-b0", "target": "grp/krongpa", "type": "board"},
            {"cmd_id": "cap-a-a0", "target": "grp/krongpa", "type": "say"},
            {"cmd_id": "cap-a-s0", "target": "grp/krongpa", "type": "stop"}]
    stops = plan.stops(rows, "cap-b", NOW, 600)
    assert [(s.target, s.type, s.args) for s in stops] == [
        ("grp/krongpa", "stop", {"id": "cap-a-a0"}), ("grp/krongpa", "stop", {"id": "cap-a-b0"})]


# --- watch: feeds, folders, backoff ------------------------------------------------------

class _Seen:
    def __init__(self) -> None:
        self.keys: set[tuple[str, str]] = set()

    def seen(self, source, digest):
        return (source, digest) in self.keys

    def mark_seen(self, source, digest, now_ms):
        self.keys.add((source, digest))


def test_feed_entries_atom_rss_inline_and_hostile():
    from ctl.cap.feed import SourceError, messages_in

    alert = fill("flood-ba-river.xml")
    got = {}
    atom = (b'<feed xmlns="http://www.w3.org/2005/Atom"><entry><link rel="alternate"'
            b' href="page.html"/><link type="application/cap+xml" href="a.xml"/></entry></feed>')
    assert messages_in(atom, "https://kttv.vn/cap/feed", lambda u: got.setdefault(u, alert)) \
        == [("https://kttv.vn/cap/a.xml", alert)]
    rss = b"<rss><channel><item><link> https://kttv.vn/b.xml </link></item></channel></rss>"
    assert messages_in(rss, "https://kttv.vn/rss", lambda u: alert)[0][0] == "https://kttv.vn/b.xml"
    inline = b'<feed xmlns="http://www.w3.org/2005/Atom"><entry><content>' + \
        alert.split(b"?>", 1)[1].split(b"-->", 1)[1] + b"</content></entry></feed>"
    [(where, data)] = messages_in(inline, "https://kttv.vn/f", lambda u: b"")
    assert where == "https://kttv.vn/f"
    assert parse(data).identifier == "VN-KTTV-GL-2026-LU-SONGBA-014"
    assert messages_in(alert, "https://kttv.vn/one.xml", lambda u: b"") == [
        ("https://kttv.vn/one.xml", alert)]  # a CAP message itself
    for hostile in ((CAP_DIR / "vn" / "billion-laughs.xml").read_bytes(),
                    b'<?xml version="1.0" encoding="EBCDIC"?><a/>', b"", b"<rss>"):
        with pytest.raises(SourceError):
            messages_in(hostile, "u", lambda u: b"")


def test_watch_backs_off_a_failing_source_and_goes_on_with_the_others(tmp_path):
    from ctl.cap.feed import MAX_BACKOFF_S, SourceError, Watcher

    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.xml").write_bytes(fill("flood-ba-river.xml"))
    now = [1000.0]
    calls = []

    class Down:
        def get(self, url):
            calls.append(url)
            raise SourceError("ConnectionError")

    handled = []
    w = Watcher(["https://down.example/feed", str(drop)],
                lambda data, where: handled.append(where), _Seen(), Down(), 30,
                clock=lambda: now[0])
    assert w.tick() == 1 and handled == [str(drop / "a.xml")]  # the folder went on
    assert w.sources[0].next_s == 1000 + 60  # interval * 2
    assert w.tick() == 0 and len(calls) == 1  # not due yet; the folder: nothing new
    for _ in range(10):
        now[0] = w.sources[0].next_s
        w.tick()
    assert w.sources[0].next_s - now[0] == MAX_BACKOFF_S
    (drop / "b.xml").write_bytes(fill("typhoon-test.xml"))
    now[0] += 30
    assert w.tick() == 1 and handled[-1] == str(drop / "b.xml")


def test_watch_a_message_that_fails_to_be_handled_is_tried_again(tmp_path):
    from ctl.cap.feed import Watcher

    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.xml").write_bytes(fill("flood-ba-river.xml"))
    attempts = []

    def handle(data, where):
        attempts.append(where)
        if len(attempts) == 1:
            raise ConnectionError("broker away")

    now = [0.0]
    w = Watcher([str(drop)], handle, _Seen(), None, 5, clock=lambda: now[0])
    assert w.tick() == 0
    now[0] += 5
    assert w.tick() == 1 and len(attempts) == 2
    now[0] += 5
    assert w.tick() == 0 and len(attempts) == 2  # handled: not again


def test_cap_config_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, geocodes={"VN-DISTRICT 0640": ["krongpa"]}, repeat=0,
               languages={"krongpa": ["Vietnamese"]}, test_group="Thu Nghiem")
    text = "\n".join(e.value.problems)
    for key in ("cap.geocodes.VN-DISTRICT 0640", "cap.repeat", "cap.languages.krongpa[0]",
                "cap.test_group"):
        assert key in text, text


def test_watch_records_the_acks_of_cap_commands_only(tmp_path):
    import json
    import queue

    from ctl.cap.link import AckListener, Link
    from ctl.cap.record import CapRecord
    from ctl.db import Database

    record = CapRecord(Database(str(tmp_path / "relay.db")))
    planned = plan.Planned("cap-abc-a0", "grp/krongpa", "say", {"text": "x"}, "vi",
                           "emergency", None, NOW + 60_000)
    record.add_commands(("s", "i", "t"), [planned], NOW)

    class FakeSession:
        messages: queue.Queue = queue.Queue()

    session = FakeSession()
    link = Link(session, None, "k", "ttcs", owned=False)
    link.spill.append(("ttcs/dev/krongpa-iarsai-c01/ack",  # kept aside by a gather
                       json.dumps({"id": "cap-abc-a0", "stage": "started", "ts": NOW}).encode()))
    for topic, ack in (
            ("ttcs/dev/krongpa-phutuc-c03/ack", {"id": "cap-abc-a0", "stage": "failed",
                                                 "ts": NOW, "reason": "tts\x1b[2Jfailed"}),
            ("ttcs/dev/krongpa-phutuc-c03/ack", {"id": "c-other", "stage": "done", "ts": NOW}),
            ("ttcs/dev/krongpa-phutuc-c03/ack", {"id": "cap-zzz-a0", "stage": "done"}),
            ("ttcs/dev/BAD ID/ack", {"id": "cap-abc-a0", "stage": "done", "ts": NOW}),
            ("ttcs/dev/krongpa-iarsai-c01/ack", {"id": "cap-abc-a0", "stage": "nope"})):
        session.messages.put((topic, json.dumps(ack).encode(), False))
    listener = AckListener(link, record)
    assert listener.drain() == 2 and not link.spill
    rows = {(r["device"], r["stage"]): r for r in record.acks_of(["cap-abc-a0"])}
    assert set(rows) == {("krongpa-iarsai-c01", "started"), ("krongpa-phutuc-c03", "failed")}
    row = rows["krongpa-phutuc-c03", "failed"]
    assert "\x1b" not in row["reason"]  # device data, cleaned
    record.close()


# --- the agent's side: say takes `at` (a future onset) ------------------------------------

def test_say_at_is_checked_like_play_at():
    from agent.audio.commands import validate_play, validate_say

    now = NOW
    assert validate_say({"text": "Bão", "at": now + 60_000}, now) == []
    far = now + 8 * 86400 * 1000
    problems = validate_say({"text": "Bão", "at": far}, now)
    assert problems and problems == validate_play(
        {"media": {"url": "http://h/a.mp3", "sha256": "0" * 64}, "at": far}, now)
    assert validate_say({"text": "Bão", "at": "soon"}, now)


# --- cap status: aired, or why not -------------------------------------------------------

def test_status_says_who_aired_when_and_why_the_others_did_not(tmp_path):
    _status_case(tmp_path, str(tmp_path / "relay.db"))


def test_status_and_the_cap_tables_on_postgresql(tmp_path, pg_url):
    _status_case(tmp_path, pg_url)


def _status_case(tmp_path, target: str):
    import json

    from ctl.cap.record import CapRecord
    from ctl.cap.status import report
    from ctl.store import PLAYS_CMD_ID_SINCE, RelayStore

    cfg = config(tmp_path)
    cfg["relay"]["groups"] = {"krongpa": ["krongpa-*"]}
    store = RelayStore(target)
    record = CapRecord(store)
    key = (SENDER, "VN-1", "2026-11-30T07:00:00+07:00")
    record.save_alert(key, now_ms=NOW, source="f.xml", status="Actual", msg_type="Alert",
                      scope="Public", action="air", why="status Actual", detail={}, xml=b"<a/>")
    say = plan.Planned("cap-x-a0", "grp/krongpa", "say", {}, "vi", "emergency", None, None)
    record.add_commands(key, [say, plan.Planned("cap-x-b0", "grp/krongpa", "board", {}, "vi",
                                                "emergency", None, None)], NOW)
    devices = {"krongpa-a": 1, "krongpa-b": 1, "krongpa-c": 0, "krongpa-d": 1, "krongpa-e": 1,
               "other-z": 1}
    with store.tx():
        for d, online in devices.items():
            store.x("INSERT INTO devices (device, online, since_ms, reason, first_seen_ms)"
                    " VALUES (?,?,?,?,?)", d, online, NOW - 3600_000, None if online else "lost",
                    NOW - 86400_000)
        played = {"type": "play", "id": "cap-x-a0", "started": NOW + 1000,
                  "ended": NOW + 9000, "played_ms": 8000, "result": "done"}
        store.x("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", "krongpa-a", 7, NOW + 2000,
                "play", 0, NOW + 2000, json.dumps(played), None)
        store.add_play_record("krongpa-a", 7, played)  # as the relay stores it
        store.x("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", "krongpa-e", 3, NOW + 2000,
                "play", 0, NOW + 2000, json.dumps({
                    "type": "play", "id": "c-unrelated", "played_ms": 5000}), None)
    record.add_acks([("cap-x-a0", "krongpa-b", "rejected", NOW, "bad_signature"),
                     ("cap-x-a0", "krongpa-d", "received", NOW, None),
                     ("cap-x-a0", "krongpa-d", "failed", NOW, "tts_failed")])
    code, lines = report(record, "VN-1", cfg)
    text = "\n".join(lines)
    assert code == 0
    assert "aired on 1 of 5 device(s)" in text, text
    assert re.search(r"krongpa-a\s+AIRED\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d for 8.0 s \(done\)",
                     text)
    assert re.search(r"krongpa-b\s+not aired\s+refused: bad_signature", text)
    assert re.search(r"krongpa-c\s+not aired\s+offline since .* \(lost\)", text)
    assert re.search(r"krongpa-d\s+not aired\s+failed: tts_failed", text)
    assert re.search(r"krongpa-e\s+not aired\s+nothing heard", text)
    assert "other-z" not in text
    aired = r"krongpa-a\s+AIRED\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d for 8.0 s \(done\)"
    # a store that got plays.cmd_id after the alert: its play records are read from events
    with store.tx():
        store.x("INSERT INTO meta(key, value) VALUES(?, ?)", PLAYS_CMD_ID_SINCE, str(NOW + 1))
        store.x("UPDATE plays SET cmd_id = NULL")
    assert re.search(aired, "\n".join(report(record, "VN-1", cfg)[1]))
    # the play records themselves (plays, by command id) outlive the event bodies
    with store.tx():
        store.x("DELETE FROM meta WHERE key = ?", PLAYS_CMD_ID_SINCE)
        store.x("UPDATE plays SET cmd_id = 'cap-x-a0'")
    store.prune_event_bodies(NOW + 86400_000)
    assert store.one("SELECT COUNT(*) AS n FROM events WHERE body LIKE '%cap-x-a0%'")["n"] == 0
    assert re.search(aired, "\n".join(report(record, "VN-1", cfg)[1]))
    record.close()


# --- a recording in the message itself ---------------------------------------------------

def test_an_embedded_recording_is_checked_and_hosted(tmp_path):
    import base64
    import hashlib

    from ctl.cap.parse import Resource
    from ctl.cap.resources import ResourceError, fetch
    from ctl.media import MediaStore

    store = MediaStore(str(tmp_path / "media"), "http://ctl.example/media")
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28)
    res = Resource("ghi âm", "audio/wav", len(wav), None, base64.b64encode(wav).decode(),
                   hashlib.sha1(wav).hexdigest())
    media = fetch(res, store, timeout=1)
    assert media.url == f"http://ctl.example/media/{hashlib.sha256(wav).hexdigest()}.wav"
    with pytest.raises(ResourceError, match="SHA-1"):
        fetch(Resource("x", "audio/wav", None, None, res.deref, "0" * 40), store, timeout=1)
    with pytest.raises(ResourceError, match="not an MP3"):
        fetch(Resource("x", "audio/mpeg", None, None, base64.b64encode(b"<html>").decode(),
                       None), store, timeout=1)
    for uri in ("file:///etc/passwd", "ftp://h/a.mp3", "http://u:p@h/a.mp3"):
        with pytest.raises(ResourceError):
            fetch(Resource("x", "audio/mpeg", None, uri, None, None), store, timeout=1)


def test_a_language_the_agents_cannot_take_is_spoken_in_the_default_one(tmp_path):
    cfg = config(tmp_path)
    odd = parse(fill("flood-ba-river.xml").replace(b"vi-VN", b"x-klingon", 1)
                .replace(b"en-US", b"qwertyui", 1))
    targets = [resolve(i.areas, cfg, DEVICES) for i in odd.infos]
    cmds = plan.airing(odd, targets, [None, None], cfg, int(time.time() * 1000), test=False,
                       base="cap-o")
    say = next(c for c in cmds if c.type == "say")
    assert say.args["lang"] == "vi"  # none in the group's languages: the first block, in vi
    from agent.audio.commands import validate_say

    assert validate_say(say.args) == []


# --- ingest's exit status from the acks (the MQTT side faked behind Link's interface) ------

class _FakeLink:
    def __init__(self, answer) -> None:
        self.answer, self.sent = answer, []

    def publish(self, commands):
        self.sent += commands

    def gather(self, expected, timeout):
        return [row for c in self.sent for row in self.answer(c)]

    def close(self):
        pass


@pytest.mark.parametrize("answer, code, line", [
    (lambda c: [(c.cmd_id, "krongpa-phutuc-c03", "received", 1, None)], 0, "received"),
    (lambda c: [], 2, "no received from krongpa-phutuc-c03"),
    (lambda c: [(c.cmd_id, "krongpa-phutuc-c03", "rejected", 1, "bad_signature")], 2,
     "rejected (bad_signature)"),
])
def test_ingest_exit_status_follows_the_received_acks(tmp_path, answer, code, line):
    from ctl.cap.handle import Handler
    from ctl.cap.notice import Notifier
    from ctl.cap.record import CapRecord
    from ctl.db import Database
    from ctl.media import MediaStore

    cfg = config(tmp_path)
    record = CapRecord(Database(str(tmp_path / "relay.db")))
    link = _FakeLink(answer)
    handler = Handler(cfg, record, MediaStore(str(tmp_path / "m"), None), lambda: link,
                      Notifier([], "Asia/Ho_Chi_Minh"))
    out = handler.handle(fill("typhoon-krongpa.xml"), "t.xml")
    assert out.code == code, out.lines
    assert any(line in ln for ln in out.lines), out.lines
    assert {c.target for c in link.sent} == {"dev/krongpa-phutuc-c03"}
    # recorded: the message, its commands (before they went out), the acks
    alert = record.alerts_by_identifier("VN-KTTV-GL-2026-BAO9-001")[0]
    assert alert["action"] == "air"
    assert {c["type"] for c in record.commands_of(SENDER, "VN-KTTV-GL-2026-BAO9-001")} == \
        {"say", "board"}
    record.close()
