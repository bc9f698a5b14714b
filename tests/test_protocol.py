"""Envelope parsing, canonical form, signatures, time checks and the core's command path."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.core.clock import FakeClock
from agent.protocol import Rejected
from tests.conftest import Keys
from tests.fakes import make_core


def test_canonical_form_is_sorted_compact_utf8():
    obj = {"b": 1, "a": {"z": "Bão số 3", "y": [1, 2]}}
    assert protocol.canonical(obj) == '{"a":{"y":[1,2],"z":"Bão số 3"},"b":1}'.encode()


def test_sign_and_verify_roundtrip_and_tamper():
    keys = Keys()
    env = keys.command("dev/dev-1", "ping")
    pub = protocol.load_public_keys({keys.kid: keys.public_b64})
    parsed = protocol.parse_envelope(env, "cmd")
    protocol.verify(parsed, pub, require_signed=True)
    assert parsed.signed
    env["args"] = {"x": 1}
    with pytest.raises(Rejected) as e:
        protocol.verify(protocol.parse_envelope(env, "cmd"), pub, require_signed=True)
    assert e.value.reason == "bad_signature"


def test_signature_matches_an_independent_jcs_computation():
    # The controller side may be written in another language: the signed bytes must be exactly
    # the sorted, compact, UTF-8 JSON of the envelope without "sig".
    keys = Keys()
    env = keys.command("grp/all", "say", {"text": "Thông báo khẩn", "lang": "vi"})
    body = {k: v for k, v in env.items() if k != "sig"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    keys.private.public_key().verify(base64.b64decode(env["sig"]["val"]), expected)


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: e.update(v=2), "bad_envelope"),
    (lambda e: e.update(id="has space"), "bad_envelope"),
    (lambda e: e.update(id="x" * 65), "bad_envelope"),
    (lambda e: e.update(target="dev/UPPER"), "bad_envelope"),
    (lambda e: e.update(ts="123"), "bad_envelope"),
    (lambda e: e.update(ts=True), "bad_envelope"),
    (lambda e: e.update(args=[]), "bad_envelope"),
    (lambda e: e.update(extra=1), "bad_envelope"),
    (lambda e: e.update(args={"volume": 1.5}), "bad_envelope"),
    (lambda e: e.update(ts=2**53), "bad_envelope"),
    (lambda e: e.update(args={"deep": [[{"n": -2**53}]]}), "bad_envelope"),
    (lambda e: e["sig"].update(alg="RSA"), "bad_envelope"),
])
def test_parse_envelope_rejects_malformed(mutate, reason):
    env = Keys().command("dev/dev-1", "ping")
    mutate(env)
    with pytest.raises(Rejected) as e:
        protocol.parse_envelope(env, "cmd")
    assert e.value.reason == reason


def test_decode_limits_and_json():
    with pytest.raises(Rejected) as e:
        protocol.decode(b"{" + b" " * protocol.MAX_PAYLOAD + b"}")
    assert e.value.reason == "too_large"
    for bad in (b"\xff\xfe", b"[1,2]", b"NaN", b'{"a": NaN}', b""):
        with pytest.raises(Rejected) as e:
            protocol.decode(bad)
        assert e.value.reason == "bad_json"


def test_time_checks_and_untrusted_clock_never_blocks_emergency():
    now = 1_764_150_000_000
    old = protocol.Envelope(id="a", type="play", target="dev/x", ts=now - 3_600_000,
                            args={"priority": "emergency"}, exp=now - 1000)
    with pytest.raises(Rejected) as e:
        protocol.check_time(old, now, trusted=True, max_skew_s=300)
    assert e.value.reason == "expired"
    protocol.check_time(old, now, trusted=False, max_skew_s=300)  # emergency, clock untrusted
    normal = protocol.Envelope(id="b", type="play", target="dev/x", ts=now, args={}, exp=now - 1)
    with pytest.raises(Rejected):
        protocol.check_time(normal, now, trusted=False, max_skew_s=300)
    future = protocol.Envelope(id="c", type="ping", target="dev/x", ts=now + 600_000, args={})
    with pytest.raises(Rejected) as e:
        protocol.check_time(future, now, trusted=True, max_skew_s=300)
    assert e.value.reason == "clock_skew"
    protocol.check_time(future, now, trusted=False, max_skew_s=300)


# --- the core's command path, in process --------------------------------------------------

@pytest.fixture
def core(tmp_path):
    keys = Keys()
    clock = FakeClock(now_ms=1_764_150_000_000)
    c = make_core(tmp_path, trusted_keys={keys.kid: keys.public_b64}, clock=clock)
    c.link.connect()
    c.run_pending()
    c.keys = keys
    yield c
    c.store.close()


def acks(core):
    return core.link.json("/ack")


def send(core, env, topic="ttcs/dev/dev-1/cmd", retain=False):
    payload = env if isinstance(env, bytes) else protocol.canonical(env)
    core.on_message(topic, payload, retain)
    core.run_pending()


def test_ping_acks_received_then_done(core):
    env = core.keys.command("dev/dev-1", "ping", ts=core.clock.now_ms())
    send(core, env)
    assert [(a["id"], a["stage"]) for a in acks(core)] == [(env["id"], "received"),
                                                           (env["id"], "done")]


def test_every_rejection_reason_in_process(core):
    k, now = core.keys, core.clock.now_ms()
    other = Keys()
    other.kid = "stranger"
    cases = [
        (b"x" * (70 * 1024), "too_large", None),
        (b"{oops", "bad_json", None),
        (protocol.canonical({**k.command("dev/dev-1", "ping", ts=now, cmd_id="b1"), "v": 3}),
         "bad_envelope", "b1"),
        (k.command("dev/dev-1", "ping", ts=now, sign=False, cmd_id="u1"), "unsigned", "u1"),
        (other.command("dev/dev-1", "ping", ts=now, cmd_id="k1"), "unknown_key", "k1"),
        ({**k.command("dev/dev-1", "ping", ts=now, cmd_id="s1"), "ts": now + 1}, "bad_signature", "s1"),
        (k.command("dev/other", "ping", ts=now, cmd_id="t1"), "wrong_target", "t1"),
        (k.command("dev/dev-1", "ping", ts=now, exp=now - 1, cmd_id="e1"), "expired", "e1"),
        (k.command("dev/dev-1", "ping", ts=now - 301_000, cmd_id="e2"), "expired", "e2"),
        (k.command("dev/dev-1", "dance", ts=now, cmd_id="x1"), "unsupported_type", "x1"),
        (k.command("dev/dev-1", "ping", {"x": 1}, ts=now, cmd_id="a1"), "bad_args", "a1"),
    ]
    for payload, reason, cid in cases:
        core.link.published.clear()
        send(core, payload)
        got = acks(core)
        assert len(got) == 1, (reason, got)
        assert got[0]["stage"] == "rejected" and got[0]["reason"] == reason, got[0]
        assert got[0]["id"] == cid
        assert got[0]["detail"]["message"]


def test_retained_command_rejected_and_replay_rejected(core):
    env = core.keys.command("dev/dev-1", "ping", ts=core.clock.now_ms(), cmd_id="r1")
    send(core, env, retain=True)
    assert acks(core)[-1]["reason"] == "retained_command"
    core.link.published.clear()
    send(core, env)
    send(core, env)  # QoS 1 redelivery
    stages = [(a["stage"], a.get("reason")) for a in acks(core)]
    assert stages == [("received", None), ("done", None), ("rejected", "replayed")]


def test_group_and_all_topics_accept_matching_targets(core):
    for target in ("grp/g1", "grp/all"):
        env = core.keys.command(target, "ping", ts=core.clock.now_ms())
        send(core, env, topic=f"ttcs/{target}/cmd")
        assert acks(core)[-1] == {**acks(core)[-1], "id": env["id"], "stage": "done"}


def test_events_get_increasing_persistent_seq_and_historical_offline(core, tmp_path):
    e1 = core.emit_event({"type": "test"})
    core.link.drop()
    core.run_pending()
    e2 = core.emit_event({"type": "test"})
    assert e2["seq"] == e1["seq"] + 1
    assert "historical" not in e1 and e2["historical"] is True
    assert core.store.depth() == 1  # the offline one waits
    core.link.connect()
    core.run_pending()
    assert core.store.depth() == 0
    sent = [e for e in core.link.json("/event") if e["type"] == "test"]
    assert [e["seq"] for e in sent] == [e1["seq"], e2["seq"]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=4),
    max_leaves=12)
envelopes = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 2, "1", None]), "id": st.sampled_from(["c1", "", "a b", 5]),
    "type": st.sampled_from([*protocol.COMMAND_TYPES, "x", 1]),
    "target": st.sampled_from(["dev/dev-1", "grp/g1", "dev/x", "bad"]),
    "ts": st.integers(-5, 2**62) | st.text(max_size=3), "exp": json_values, "args": json_values,
    "sig": json_values, "junk": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=envelopes, retain=st.booleans(), raw=st.binary(max_size=200))
def test_fuzzed_commands_never_escape_and_always_answer(core, env, retain, raw):
    for payload in (protocol.canonical(env) if _jsonable(env) else raw, raw):
        core.link.published.clear()
        core.on_message("ttcs/dev/dev-1/cmd", payload, retain)  # must not raise
        core.run_pending()
        got = acks(core)
        assert got and got[0]["stage"] in ("received", "rejected")


def _jsonable(obj) -> bool:
    try:
        protocol.canonical(obj)
        return True
    except (TypeError, ValueError):
        return False


def test_repeated_alert_reports_do_not_pile_up_timers(core):
    # The cabinet is polled 5 times a second; each report of an unchanged condition must not
    # leave another (cancelled) timer in the core's heap.
    for _ in range(50):
        core.set_alert("door_open", True)
        core.clock.advance(0.05)
    assert len(core._timers) < 5
    core.clock.advance(10)
    core.run_pending()
    raised = [e for e in core.link.json("/event") if e.get("type") == "alert"]
    assert [(e["code"], e["state"]) for e in raised] == [("door_open", "raised")]
