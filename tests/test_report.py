"""Reports over generated records fed through the relay, checked to the minute."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import yaml
from PIL import Image

from ctl import report
from ctl.relay import Relay, RelaySettings
from ctl.store import RelayStore
from tests.conftest import ROOT

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
MIN = 60_000
GROUPS = {"krongpa": ["krongpa-*"], "empty": ["nobody"]}
A, B, C = "krongpa-a", "krongpa-b", "other-c"


def local(*args: int) -> int:
    return int(datetime(*args, tzinfo=TZ).timestamp() * 1000)


def play(started: int, played_min: float, *, requested_min: float | None, segment: int = 0,
         span_min: float | None = None, priority: str = "normal", result: str = "done") -> dict:
    ended = started + int((span_min if span_min is not None else played_min) * MIN)
    return {"type": "play", "id": "x", "origin": "schedule", "kind": "file", "media": [],
            "priority": priority, "started": started, "ended": ended, "result": result,
            "played_ms": int(played_min * MIN), "segment": segment, "repeat": 1,
            "requested_ms": None if requested_min is None else int(requested_min * MIN)}


class Feeder:
    def __init__(self, store: RelayStore) -> None:
        self.relay = Relay(store, RelaySettings(heartbeat_default_s=10**6))
        self.seq: dict[str, int] = {}

    def event(self, device: str, body: dict, received_ms: int | None = None,
              seq: int | None = None, **extra) -> None:
        if seq is None:
            seq = self.seq[device] = self.seq.get(device, 0) + 1
        ev = {"v": 1, "ts": body["ended"], "seq": seq, **body, **extra}
        self.relay.handle(f"ttcs/dev/{device}/event", json.dumps(ev).encode(), False,
                          received_ms or body["ended"])

    def status(self, device: str, state: str, at: int, session: int = 1) -> None:
        body = {"v": 1, "state": state, "ts": at, "session": session, "reason": "lost"}
        self.relay.handle(f"ttcs/dev/{device}/status", json.dumps(body).encode(), False, at)


@pytest.fixture
def store(tmp_path):
    s = RelayStore(str(tmp_path / "relay.db"))
    f = Feeder(s)
    f.status(A, "online", local(2025, 10, 30, 8, 0))
    f.status(A, "offline", local(2025, 11, 10, 12, 0))
    f.status(A, "online", local(2025, 11, 10, 18, 0))
    f.status(B, "online", local(2025, 11, 15, 0, 0))
    # A: a plain bulletin, 15 of 15 min
    f.event(A, play(local(2025, 11, 3, 5, 0), 15, requested_min=15))
    f.event(A, play(local(2025, 11, 3, 5, 0), 15, requested_min=15), seq=1)  # QoS 1 duplicate
    # A: preempted after 4 min, resumed for 6: one bulletin of 10 min
    f.event(A, play(local(2025, 11, 10, 17, 0), 4, requested_min=10, result="preempted"))
    f.event(A, play(local(2025, 11, 10, 17, 7), 6, requested_min=10, segment=1))
    # A: an emergency stopped after 3 of 5 min
    f.event(A, play(local(2025, 11, 20, 9, 0), 3, requested_min=5, priority="emergency",
                    result="stopped"))
    # A: aired on the 25th while offline, delivered on 2 December: counts when it aired
    f.event(A, play(local(2025, 11, 25, 17, 0), 12, requested_min=12),
            received_ms=local(2025, 12, 2, 8, 0), historical=True)
    # A: 23:50 on 30 Nov to 00:10 on 1 Dec: 10 min in each month
    f.event(A, play(local(2025, 11, 30, 23, 50), 20, requested_min=20))
    # A: 06:30 on 1 Nov local is still 31 Oct in UTC: November here
    f.event(A, play(local(2025, 11, 1, 6, 30), 5, requested_min=5))
    # A: one record per item with its segments (docs/AUDIO.md): 23:55 to 00:02 on 31 Oct /
    # 1 Nov (5 min in November), preempted, resumed 00:30-00:33 — 8 of 10 min in November
    item = play(local(2025, 10, 31, 23, 55), 10, requested_min=10, span_min=38)
    item["segments"] = [play(local(2025, 10, 31, 23, 55), 7, requested_min=None,
                             result="preempted"),
                        play(local(2025, 11, 1, 0, 30), 3, requested_min=None)]
    f.event(A, item)
    # A: a failed item that never played: no bulletin
    f.event(A, play(local(2025, 11, 4, 5, 0), 0, requested_min=5, result="failed"))
    # A: October and December items stay out of November
    f.event(A, play(local(2025, 10, 31, 23, 0), 7, requested_min=7))
    f.event(A, play(local(2025, 12, 1, 5, 0), 9, requested_min=9))
    # B: a 30-min stream of unknown requested length
    f.event(B, play(local(2025, 11, 15, 17, 0), 30, requested_min=None))
    # C: ungrouped, one bulletin
    f.event(C, play(local(2025, 11, 16, 5, 0), 2, requested_min=2))
    yield s
    s.close()


def rows(stats) -> dict[str, dict]:
    return {f"{s.scope}:{s.name}": s.row() for s in stats}


NOW = local(2025, 12, 15, 0, 0)


def test_month_to_the_minute(store):
    period = report.parse_period("2025-11", None, "Asia/Ho_Chi_Minh")
    assert period.start_ms == local(2025, 11, 1) and period.end_ms == local(2025, 12, 1)
    r = rows(report.compute(store, period, GROUPS, NOW))
    a = r[f"device:{A}"]
    assert a["aired_minutes"] == 15 + 10 + 3 + 12 + 10 + 5 + 5  # + 2 + 3 of the segmented
    assert (a["bulletins"], a["emergencies"]) == (6, 1)  # the segmented one began in October
    assert a["requested_minutes"] == 15 + 10 + 5 + 12 + 20 + 5  # not the failed item's
    assert a["played_minutes"] == 60
    assert a["uptime_pct"] == f"{100 * 714 / 720:.2f}"  # 6 h down in a 720 h month
    b = r[f"device:{B}"]
    assert (b["aired_minutes"], b["bulletins"], b["requested_minutes"]) == (30, 1, 0)
    assert b["played_pct"] == "" and b["uptime_pct"] == "100.00"  # observed from its first sign
    k = r["group:krongpa"]
    assert (k["devices"], k["aired_minutes"], k["bulletins"], k["emergencies"]) == (2, 90, 7, 1)
    assert k["uptime_pct"] == f"{100 * (714 + 384) / (720 + 384):.2f}"
    assert (r["group:empty"]["aired_minutes"], r["group:empty"]["devices"]) == (0, 0)
    assert r["group:all"]["aired_minutes"] == 92 and r["group:all"]["devices"] == 3
    assert r[f"device:{C}"]["uptime_pct"] == ""  # never seen online or offline


def test_year_and_utc_would_differ(store):
    year = rows(report.compute(store, report.parse_period(None, "2025", "Asia/Ho_Chi_Minh"),
                               GROUPS, NOW))
    assert year[f"device:{A}"]["aired_minutes"] == 15 + 10 + 3 + 12 + 20 + 5 + 7 + 9 + 10
    assert year[f"device:{A}"]["bulletins"] == 9
    utc = rows(report.compute(store, report.parse_period("2025-11", None, "UTC"), GROUPS, NOW))
    # in UTC the 06:30 item of 1 Nov falls in October, the 30 Nov item wholly in November,
    # and so does the 05:00 item of 1 December (22:00 UTC on 30 November)
    assert utc[f"device:{A}"]["aired_minutes"] == 15 + 10 + 3 + 12 + 20 + 9  # segmented: Oct


def test_bad_periods():
    for month, year in (("2025-13", None), ("25-11", None), (None, "20x5"), (None, None)):
        with pytest.raises(ValueError):
            report.parse_period(month, year, "Asia/Ho_Chi_Minh")


def test_csv_and_vietnamese_chart(store, tmp_path):
    period = report.parse_period("2025-11", None, "Asia/Ho_Chi_Minh")
    stats = report.compute(store, period, GROUPS, NOW)
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(stats))))
    assert tuple(parsed[0]) == report.CSV_FIELDS
    assert [(p["scope"], p["name"]) for p in parsed] == [
        ("device", A), ("device", B), ("device", C), ("group", "empty"), ("group", "krongpa"),
        ("group", "all")]
    assert parsed[0]["aired_hours"] == "1.00"
    png = tmp_path / "chart.png"
    report.chart(stats, period, str(png))
    img = Image.open(png)
    assert img.format == "PNG" and img.width > 1000


def test_ctl_report_command(store, tmp_path):
    cfg = tmp_path / "ctl.yaml"
    cfg.write_text(yaml.safe_dump({"relay": {"db_path": str(tmp_path / "relay.db"),
                                             "groups": GROUPS}}))
    out = subprocess.run([sys.executable, "-m", "ctl", "--config", str(cfg), "report",
                          "--month", "2025-11", "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "ttcs-report-2025-11.png").stat().st_size > 10_000
    text = (tmp_path / "out" / "ttcs-report-2025-11.csv").read_text()
    assert f"device,{A},1,60,1.00,6,1," in text
    assert A in out.stdout and "krongpa" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ctl", "--config", str(cfg), "report",
                          "--month", "2025-1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 64 and "YYYY-MM" in bad.stderr


def test_report_without_matplotlib_says_what_to_install(store, tmp_path):
    cfg = tmp_path / "ctl.yaml"
    cfg.write_text(yaml.safe_dump({"relay": {"db_path": str(tmp_path / "relay.db"),
                                             "groups": GROUPS}}))
    no_matplotlib = ("import sys; sys.modules['matplotlib'] = None; from ctl.main import main;"
                     " sys.exit(main(sys.argv[1:]))")
    base = [sys.executable, "-c", no_matplotlib, "--config", str(cfg), "report", "--month",
            "2025-11", "--out", str(tmp_path / "out")]
    out = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "pip install 'ttcs-agent[ctl]'" in out.stderr and "--no-chart" in out.stderr
    assert not (tmp_path / "out").exists()  # checked before starting
    out = subprocess.run([*base, "--no-chart"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "ttcs-report-2025-11.csv").exists()
    assert not (tmp_path / "out" / "ttcs-report-2025-11.png").exists()


def test_a_device_cannot_claim_more_airtime_than_the_clock_allows(tmp_path):
    s = RelayStore(str(tmp_path / "r.db"))
    f = Feeder(s)
    start = local(2025, 11, 10, 5, 0)
    # an instant that "played" a day, and a record twice as long as its own span
    f.event(A, {**play(start, 0, requested_min=5), "played_ms": 86_400_000})
    f.event(A, play(local(2025, 11, 11, 5, 0), 20, requested_min=20, span_min=10))
    # a thousand overlapping records of the same ten minutes
    for _ in range(1000):
        f.event(B, play(local(2025, 11, 12, 5, 0), 10, requested_min=10))
    period = report.parse_period("2025-11", None, "Asia/Ho_Chi_Minh")
    r = {st.name: st for st in report.compute(s, period, {}, NOW)}
    assert round(r[A].aired_ms / MIN) == 10  # 0 for the instant, 10 of the claimed 20
    assert round(r[B].aired_ms / MIN) == 10  # the union of what it claims: ten minutes
    assert r[A].capped == 2 and r[B].capped == 1
    assert r["all"].capped == 3
    text = report.table_text(list(r.values()))
    assert "3 play records or device totals claimed more airtime" in text
    s.close()
