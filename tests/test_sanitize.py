"""The rules for device data (ctl/sanitize.py) and how the relay and the notification text
apply them: one line per item, starting with the device; what is not ours is quoted."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ctl import sanitize
from ctl.notify import render, summarise
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore

T0 = 1_764_000_000_000
DEV = "krongpa-evil-c09"


def test_clean_makes_one_line_of_plain_text():
    assert sanitize.clean("a\r\nb\tc\x0bd\u2028e\u2029f\x85g") == "a b c d e f g"
    assert sanitize.clean("x\x00\x1b[31my\x7f\x9b") == "x[31my"  # C0, DEL, C1: gone
    assert sanitize.clean("abc\u202edcba\u200b\ufeff") == "abcdcba"  # bidi, zero-width, BOM
    assert sanitize.clean("Thông báo khẩn") == "Thông báo khẩn"
    assert sanitize.clean("ke\u0302nh") == "kênh"  # NFC
    assert sanitize.clean("x" * 50, 10) == "x" * 9 + "…"
    assert len(sanitize.clean("y" * 100_000, 64)) == 64
    assert sanitize.clean(["a", 1]) == '["a", 1]' and sanitize.clean(None) == "null"


def test_quote_and_shown():
    assert sanitize.quote('say "hi"\n') == '"say \\"hi\\" "'
    assert sanitize.shown("cache") == "cache" and sanitize.shown("/var/lib") == '"/var/lib"'
    assert sanitize.shown("state/2") == "state/2"
    assert sanitize.shown("hai từ") == '"hai từ"' and sanitize.shown(7) == '"7"'
    assert sanitize.shown("a" * 65, 64) == '"' + "a" * 63 + '…"'


def test_device_ids_and_numbers():
    assert sanitize.device_id("krongpa-a1") == "krongpa-a1"
    for bad in ("Krongpa", "-a", "a b", "a\n", "", "a" * 65, None, 5):
        assert sanitize.device_id(bad) is None
    assert sanitize.as_int(5) == 5
    assert sanitize.as_int(True) is None and sanitize.as_int(2**62) is None
    assert sanitize.as_int(1.0) is None and sanitize.as_int("5") is None


def test_device_time_window():
    past, ahead = 400 * 86_400_000, 3_600_000
    assert sanitize.device_time(T0 - past, T0, past, ahead) == T0 - past
    assert sanitize.device_time(T0 - past - 1, T0, past, ahead) is None
    assert sanitize.device_time(T0 + ahead, T0, past, ahead) == T0 + ahead
    assert sanitize.device_time(T0 + ahead + 1, T0, past, ahead) is None
    assert sanitize.device_time(10**15, T0, past, ahead) is None
    assert sanitize.device_time("1", T0, past, ahead) is None


def test_bounded():
    assert sanitize.bounded({"pin": 17}) == {"pin": 17}
    assert sanitize.bounded({"x": "y" * 3000}) is None
    assert sanitize.bounded({"x": {1, 2}}) is None  # not JSON


def test_utf16_length_is_telegrams():
    assert sanitize.utf16_len("ab") == 2 and sanitize.utf16_len("🔴") == 2
    assert sanitize.utf16_len("⚠️") == 2 and sanitize.utf16_len("ệ") == 1


# --- the relay stores bounded, cleaned values -----------------------------------------------

def _relay():
    store = RelayStore(":memory:")
    return store, Relay(store, RelaySettings(channels=["x"]))


def _event(relay, seq, now=T0, **body):
    relay.handle(f"ttcs/dev/{DEV}/event", json.dumps({"v": 1, "seq": seq, "ts": now, **body})
                 .encode(), False, now)


def test_relay_stores_alert_fields_cleaned_and_capped():
    store, relay = _relay()
    _event(relay, 1, type="alert", state="raised", code="door_open\r\nHẾT", key="k\n" * 3000,
           detail={"x": "y" * 5000})
    _event(relay, 2, type="alert", state="raised", code="\u202e", key="a")  # nothing left
    _event(relay, 3, type="al\nert", state="raised", code="door_open")  # not an event type
    _event(relay, 4, type="x" * 40)
    [n] = store.q("SELECT code, key, detail FROM notices")
    assert n["code"] == "door_open HẾT" and len(n["key"]) == 64 and "\n" not in n["key"]
    assert json.loads(n["detail"])["detail"] == {"dropped": "over 2 KiB"}
    assert [r["seq"] for r in store.q("SELECT seq FROM events")] == [1, 2]
    relay.handle(f"ttcs/dev/{DEV}/status", json.dumps(
        {"state": "offline", "session": 1, "reason": "lost\n🔴 MẤT" + "x" * 100}).encode(),
        False, T0)
    reason = store.one("SELECT reason FROM devices")["reason"]
    assert len(reason) == 32 and "\n" not in reason
    store.close()


# --- the text staff read ------------------------------------------------------------------

def _text(items: list[dict]) -> str:
    return render(1, {"items": items}, "i", "Asia/Ho_Chi_Minh", {"k": ["krongpa-*"]}).text


def test_known_codes_bare_unknown_codes_and_odd_keys_quoted():
    alert = {"device": DEV, "kind": "alert", "state": "raised", "raised": 1, "cleared": 0,
             "since": T0, "key": None, "historical": False}
    text = _text([{**alert, "code": "disk_low", "key": "cache"},
                  {**alert, "code": "fire_alarm"},
                  {**alert, "code": "door_open", "key": "cửa sau\nHẾT"}])
    lines = text.splitlines()[2:]
    assert lines[0] == f"{DEV} [k]: ⚠️ CẢNH BÁO disk_low/cache từ 23:00 24/11"
    assert lines[1] == f'{DEV} [k]: ⚠️ CẢNH BÁO mã lạ "fire_alarm" từ 23:00 24/11'
    assert lines[2] == f'{DEV} [k]: ⚠️ CẢNH BÁO door_open/"cửa sau HẾT" từ 23:00 24/11'
    offline = {"device": DEV, "kind": "offline", "since": T0, "outages": 1}
    assert "(mất kết nối đột ngột)" in _text([{**offline, "reason": "lost"}])
    assert '(lý do "bị cắt điện")' in _text([{**offline, "reason": "bị cắt điện"}])


def test_connectivity_first_and_at_most_ten_alert_lines_per_device():
    alert = {"device": DEV, "kind": "alert", "state": "raised", "raised": 1, "cleared": 0,
             "since": T0, "code": "disk_low", "historical": False}
    items = [{**alert, "key": f"k{n}"} for n in range(500)]
    items.append({"device": "krongpa-b", "kind": "offline", "since": T0, "outages": 1,
                  "reason": "lost"})
    message = render(1, {"items": items}, "i", "Asia/Ho_Chi_Minh", {})
    lines = message.text.splitlines()[2:]
    assert lines[0].startswith("krongpa-b: 🔴 MẤT KẾT NỐI")
    assert len(lines) == 12
    assert lines[-1] == f"{DEV}: … và 490 cảnh báo khác (trong webhook và relay.db)"
    assert len(message.payload["items"]) == 501  # the webhook has them all
    assert message.subject == "[TTCS] 1 cụm mất kết nối, 500 cảnh báo"


@settings(max_examples=200, deadline=None)
@given(code=st.text(max_size=80), key=st.one_of(st.none(), st.text(max_size=80)),
       reason=st.text(max_size=80), ts=st.integers(min_value=-2**63, max_value=2**63))
def test_each_line_starts_with_its_device_whatever_the_device_sent(code, key, reason, ts):
    notices = [
        {"id": 1, "device": DEV, "kind": "alert", "code": code, "key": key, "ts": ts,
         "detail": "{}"},
        {"id": 2, "device": "krongpa-b", "kind": "offline", "code": None, "key": None,
         "ts": ts, "detail": json.dumps({"reason": reason})},
        {"id": 3, "device": DEV, "kind": "cleared", "code": code, "key": key, "ts": T0,
         "detail": "{}"}]
    text = _text(summarise(notices))
    head, blank, *lines = text.split("\n")
    assert head.startswith("[TTCS] ") and blank == "" and len(lines) == 2
    assert lines[0].startswith("krongpa-b [k]: 🔴") and lines[1].startswith(f"{DEV} [k]: ")
