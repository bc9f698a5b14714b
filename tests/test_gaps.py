"""The relay's gap filling (ctl/gaps.py): its logic with an injected clock, then end to end
with a real agent, a real relay process and mosquitto."""

from __future__ import annotations

import json
import sqlite3
import time

from agent import protocol
from ctl.gaps import GapFiller, GapSettings, covered_ranges, holes
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.conftest import Keys

T0 = 1_764_000_000_000
S = 1000
DEV = "krongpa-phutuc-c03"


class Rig:
    def __init__(self, path, **settings) -> None:
        self.sent: list[dict] = []
        self.keys = Keys()
        self.store = RelayStore(str(path))
        self.gaps = GapFiller(self.store, GapSettings(**settings), "ttcs", publish=self.publish,
                              sign=lambda env: protocol.sign(env, self.keys.private, "k"))
        self.relay = Relay(self.store, RelaySettings(channels=[]), gaps=self.gaps)

    def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append({"topic": topic, **json.loads(payload)})

    def event(self, at: int, seq: int, device: str = DEV, **extra) -> None:
        body = {"v": 1, "type": "play", "ts": at, "seq": seq, **extra}
        self.relay.handle(f"ttcs/dev/{device}/event", json.dumps(body).encode(), False, at)

    def status(self, at: int, state: str, device: str = DEV) -> None:
        body = {"v": 1, "state": state, "ts": at, "session": 1}
        self.relay.handle(f"ttcs/dev/{device}/status", json.dumps(body).encode(), False, at)

    def ack(self, at: int, cmd: dict, missing: list, device: str = DEV) -> None:
        body = {"v": 1, "id": cmd["id"], "stage": "done", "ts": at,
                "detail": {"sent": 0, "missing": missing}}
        self.relay.handle(f"ttcs/dev/{device}/ack", json.dumps(body).encode(), False, at)

    def asks(self) -> list[tuple[int, int]]:
        return [(c["args"]["from_seq"], c["args"]["to_seq"]) for c in self.sent]


def test_ranges():
    assert covered_ranges([1, 2, 3, 7], [(4, 5)]) == [(1, 5), (7, 7)]
    assert holes(0, covered_ranges([1, 2, 3, 7], [(4, 5)])) == [(6, 6)]
    assert holes(0, [(2500, 2500)]) == [(1, 1000), (1001, 2000), (2001, 2499)]


def test_a_gap_is_asked_for_after_the_settle_time_and_filled(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=10)
    for seq in (1, 2, 3, 6, 7):
        r.event(T0, seq)
    r.gaps.tick(T0 + 5 * S)
    r.event(T0 + 6 * S, 5)  # late, out of order
    r.gaps.tick(T0 + 9 * S)
    assert r.sent == []  # still settling
    r.gaps.tick(T0 + 10 * S)
    assert r.asks() == [(4, 4)]
    cmd = r.sent[0]
    assert cmd["topic"] == f"ttcs/dev/{DEV}/cmd" and cmd["type"] == "resend"
    assert cmd["target"] == f"dev/{DEV}" and cmd["sig"]["kid"] == "k"
    assert protocol.verify(protocol.parse_envelope({k: v for k, v in cmd.items()
                                                    if k != "topic"}, "cmd"),
                           {"k": r.keys.private.public_key()}, True) is None
    r.event(T0 + 11 * S, 4, resent=True)
    r.gaps.tick(T0 + 30 * S)
    assert r.gaps.open_asks() == 0 and r.gaps.counters.filled == 1
    r.gaps.tick(T0 + 300 * S)
    assert r.asks() == [(4, 4)]  # never again


def test_retries_back_off_and_wait_while_the_device_is_offline(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=1, retry_s=10, retry_max_s=40)
    r.status(T0, "online")
    r.event(T0, 1)
    r.event(T0, 3)
    for t in range(1, 200):
        r.gaps.tick(T0 + t * S)
    # asked at 1 s, then 10, 20, 40, 40 s later
    assert [c["ts"] - T0 for c in r.sent] == [1 * S, 11 * S, 31 * S, 71 * S, 111 * S, 151 * S,
                                              191 * S]
    r.status(T0 + 200 * S, "offline")
    for t in range(200, 600):
        r.gaps.tick(T0 + t * S)
    assert len(r.sent) == 7  # not while it is offline
    r.status(T0 + 600 * S, "online")
    r.gaps.tick(T0 + 601 * S)
    assert len(r.sent) == 8  # at once when it is back


def test_ranges_the_device_no_longer_holds_are_recorded_lost(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=1)
    r.event(T0, 1)
    r.event(T0, 2500)
    r.gaps.tick(T0 + 2 * S)
    assert r.asks() == [(2, 1001), (1002, 2001), (2002, 2499)]  # at most 1000 seqs each
    r.ack(T0 + 3 * S, r.sent[0], [[2, 1001]])
    r.ack(T0 + 3 * S, r.sent[1], [[1002, 1500]])
    for seq in range(1501, 2500):
        r.event(T0 + 3 * S, seq, resent=True)
    r.gaps.tick(T0 + 5 * S)
    assert r.gaps.open_asks() == 0
    assert r.gaps.counters.lost == 1499 and r.gaps.lost_total() == 1499
    n = r.store.one("SELECT COUNT(*) AS n FROM events")["n"]
    assert n + r.gaps.lost_total() == 2500  # every seq present or recorded lost


def test_duplicates_are_dropped_by_device_and_seq(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=1)
    r.event(T0, 1)
    r.event(T0, 1, resent=True)
    assert r.relay.counters.duplicates == 1
    assert r.store.one("SELECT COUNT(*) AS n FROM events")["n"] == 1


def test_open_asks_survive_a_restart_and_another_process_sees_the_fill(tmp_path):
    r = Rig(tmp_path / "r.db", wait_s=1, retry_s=5)
    r.event(T0, 1)
    r.event(T0, 4)
    r.gaps.tick(T0 + 2 * S)
    assert r.asks() == [(2, 3)]
    r.store.close()
    r2 = Rig(tmp_path / "r.db", wait_s=1, retry_s=5)
    r2.gaps.tick(T0 + 3 * S)
    assert r2.sent == []  # the ask made before the restart is not due yet
    other = sqlite3.connect(tmp_path / "r.db")  # another relay process stores the fill
    other.execute("INSERT INTO events(device, seq, ts, type, historical, received_ms, body)"
                  " VALUES(?, 2, 0, 'play', 0, 0, '{}'), (?, 3, 0, 'play', 0, 0, '{}')",
                  (DEV, DEV))
    other.commit()
    other.close()
    r2.gaps.tick(T0 + 10 * S)
    assert r2.sent == [] and r2.gaps.open_asks() == 0


def test_an_ack_that_is_not_ours_is_not_counted_as_dropped(tmp_path):
    r = Rig(tmp_path / "r.db")
    r.relay.handle(f"ttcs/dev/{DEV}/ack", b'{"v":1,"id":"c-1","stage":"done","ts":1}', False,
                   T0)
    assert r.relay.counters.dropped == 0
    time.sleep(0)
