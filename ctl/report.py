"""``ttcs-ctl report``: broadcast statistics from the relay's database (SPEC §10, docs/CTL.md).

For a month or a year (boundaries in ``relay.timezone``, default Asia/Ho_Chi_Minh), per device
and per configured group:

- aired time: the ``played_ms`` of every play record, by the device's own timestamps
  (``started``/``ended``; a record sent late with ``historical: true`` counts when it aired, not
  when it arrived). A record straddling a boundary is shared in proportion to its overlap;
- bulletins: aired items (the first segment of an item that played at all; a preempted item
  that resumes is one bulletin), and how many of them were emergencies;
- played vs requested: played time of the items whose length was known, against that length;
- uptime: time online / time observed, from the online/offline transitions the relay recorded.

Play records are device data (hostile input, ctl/sanitize.py): a record counts at most the
time between its own ``started`` and ``ended``, and a device at most the union of its records'
spans (one output airs one item at a time), so no device can claim more airtime than the
clock allows. What was cut is counted (``capped``) and said under the table.

Output: CSV (one row per device, then per group, then ``all``) and a PNG chart whose Vietnamese
labels are set in DejaVu Sans.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from ctl.config import groups_of
from ctl.store import PLAY_SLACK_MS, RelayStore

FONT = "DejaVu Sans"
CSV_FIELDS = ("scope", "name", "devices", "aired_minutes", "aired_hours", "bulletins",
              "emergencies", "played_minutes", "requested_minutes", "played_pct", "uptime_pct")
DAY_MS = 86_400_000
LEGEND = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncols": 2, "frameon": False}


@dataclass
class Period:
    label: str  # "2025-11" or "2025"
    title: str  # Vietnamese: "tháng 11/2025", "năm 2025"
    start_ms: int
    end_ms: int  # exclusive


def parse_period(month: str | None, year: str | None, tz: str) -> Period:
    """``--month YYYY-MM`` or ``--year YYYY`` in ``tz``; ValueError when malformed."""
    zone = ZoneInfo(tz)
    if month:
        m = re.fullmatch(r"(\d{4})-(\d{2})", month)
        if not m or not 1 <= int(m[2]) <= 12:
            raise ValueError(f"--month must be YYYY-MM, not {month!r}")
        y, mo = int(m[1]), int(m[2])
        start = datetime(y, mo, 1, tzinfo=zone)
        end = datetime(y + mo // 12, mo % 12 + 1, 1, tzinfo=zone)
        return Period(month, f"tháng {mo:02d}/{y}", _ms(start), _ms(end))
    if year and re.fullmatch(r"\d{4}", year):
        y = int(year)
        return Period(year, f"năm {y}", _ms(datetime(y, 1, 1, tzinfo=zone)),
                      _ms(datetime(y + 1, 1, 1, tzinfo=zone)))
    raise ValueError(f"--year must be YYYY, not {year!r}")


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@dataclass
class Stats:
    scope: str
    name: str
    devices: list[str] = field(default_factory=list)
    aired_ms: float = 0.0
    bulletins: int = 0
    emergencies: int = 0
    played_ms: float = 0.0  # of items whose requested length is known
    requested_ms: int = 0
    online_ms: int = 0
    observed_ms: int = 0
    capped: int = 0  # play records (and device totals) cut to what the clock allows

    def add(self, other: Stats) -> None:
        self.devices.append(other.name)
        for name in ("aired_ms", "bulletins", "emergencies", "played_ms", "requested_ms",
                     "online_ms", "observed_ms", "capped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def uptime_pct(self) -> float | None:
        return round(100 * self.online_ms / self.observed_ms, 2) if self.observed_ms else None

    @property
    def played_pct(self) -> float | None:
        return round(100 * self.played_ms / self.requested_ms, 2) if self.requested_ms else None

    def row(self) -> dict:
        devices = 1 if self.scope == "device" else len(self.devices)
        return {"scope": self.scope, "name": self.name, "devices": devices,
                "aired_minutes": round(self.aired_ms / 60_000),
                "aired_hours": f"{self.aired_ms / 3_600_000:.2f}", "bulletins": self.bulletins,
                "emergencies": self.emergencies,
                "played_minutes": round(self.played_ms / 60_000),
                "requested_minutes": round(self.requested_ms / 60_000),
                "played_pct": _fmt(self.played_pct), "uptime_pct": _fmt(self.uptime_pct)}


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


# --- computing ---------------------------------------------------------------------------

def compute(store: RelayStore, period: Period, groups: dict[str, list[str]],
            now_ms: int) -> list[Stats]:
    """Per-device rows (sorted), then per-group rows, then the ``all`` row. The database adds
    up the play records and transitions (one pass over the period's records each, grouped by
    device); Python only shares out the few records that cross a boundary and adds devices
    up into their groups, each device's groups resolved once."""
    rows: dict[str, Stats] = {r["device"]: Stats("device", r["device"])
                              for r in store.q("SELECT device FROM devices")}
    covered: dict[str, int] = {}
    overlapping = []
    for r in store.stream(_plays_sql(period)):
        st = rows.setdefault(r["device"], Stats("device", r["device"]))
        st.aired_ms, st.played_ms = float(r["aired"]), float(r["played"])
        st.capped, st.bulletins = int(r["capped"]), int(r["bulletins"])
        st.emergencies, st.requested_ms = int(r["emergencies"]), int(r["requested"])
        covered[r["device"]] = int(r["spans"])  # without overlaps, the union is the sum
        if r["overlap"]:
            overlapping.append(r["device"])
    for r in store.q(_crossing_sql(period)):
        st = rows.setdefault(r["device"], Stats("device", r["device"]))
        aired = _aired(_record(r), period)
        if r["started"] >= period.start_ms:  # crosses the end: summed whole above
            aired -= r["aired_ms"]
            covered[st.name] = covered.get(st.name, 0) - (r["ended"] - period.end_ms)
        else:  # crosses the start: not summed above
            st.capped += r["claim"]
            covered[st.name] = covered.get(st.name, 0) + \
                min(r["ended"], period.end_ms) - period.start_ms
        st.aired_ms += aired
        st.played_ms += aired * r["known"]
    for i in range(0, len(overlapping), 200):
        for r in store.q(_union_sql(period, overlapping[i:i + 200])):
            covered[r["device"]] = int(r["covered"])
    for st in rows.values():
        cover = covered.get(st.name, 0)
        if st.aired_ms > cover + PLAY_SLACK_MS:
            st.capped += 1
        st.aired_ms = min(st.aired_ms, cover)
        st.played_ms = min(st.played_ms, st.aired_ms)
    for r in store.q(_uptime_sql(period.start_ms, min(period.end_ms, now_ms))):
        if r["device"] in rows:
            rows[r["device"]].online_ms = int(r["online"])
            rows[r["device"]].observed_ms = int(r["observed"])
    devices = sorted(rows)
    by_group: dict[str, Stats] = {g: Stats("group", g) for g in sorted(groups)}
    total = Stats("group", "all")
    for d in devices:
        for g in groups_of(d, groups):
            by_group[g].add(rows[d])
        total.add(rows[d])
    return [*(rows[d] for d in devices), *by_group.values(), total]


def _clip(s: int, e: int) -> tuple[str, str]:
    """SQL: a record's span clipped to [s, e)."""
    return (f"CASE WHEN started > {s} THEN started ELSE {s} END",
            f"CASE WHEN ended < {e} THEN ended ELSE {e} END")


def _plays_sql(period: Period) -> str:
    """Per device over the records that started in the period (and ended less than a day
    after it): their aired and played time (each at most its span, precomputed when
    stored), bulletins, emergencies, requested time, records claiming more than their span,
    the sum of their spans, and whether any overlaps a neighbour (``overlap``). One pass of
    plain sums, no sort: SQLite reads the table in its own order (device, started;
    ``+ended`` keeps it off the ``ended`` index). Records crossing a boundary are corrected
    in Python. The values are our own integers, written into the SQL."""
    s, e = period.start_ms, period.end_ms
    return f"""
SELECT device, SUM(aired_ms) AS aired, SUM(aired_ms * known) AS played, SUM(claim) AS capped,
  SUM(first) AS bulletins, SUM(first * emergency) AS emergencies,
  COALESCE(SUM(first * known * requested_ms), 0) AS requested, SUM(ended - started) AS spans,
  MAX(overlap) AS overlap
FROM plays WHERE started >= {s} AND started < {e} AND +ended < {e + DAY_MS}
GROUP BY device"""


def _union_sql(period: Period, devices: list[str]) -> str:
    """The length of the union of the clipped spans of each of ``devices`` (those whose
    records overlap; the records :func:`_plays_sql` and :func:`_crossing_sql` read): a
    running maximum of the ends, in ``started`` order."""
    s, e = period.start_ms, period.end_ms
    a, b = _clip(s, e)
    names = ", ".join("'" + d.replace("'", "''") + "'" for d in devices)
    return f"""
SELECT device,
  SUM(CASE WHEN m IS NULL THEN CASE WHEN b > a THEN b - a ELSE 0 END
           WHEN b > m AND b > a THEN b - CASE WHEN m > a THEN m ELSE a END
           ELSE 0 END) AS covered
FROM (
  SELECT device, {a} AS a, {b} AS b,
    MAX({b}) OVER (PARTITION BY device ORDER BY started, seq
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m
  FROM plays WHERE device IN ({names}) AND ((started >= {s} AND started < {e}
    AND ended < {e + DAY_MS}) OR (started < {s} AND ended > {s} AND ended < {s + DAY_MS}))
) AS u
GROUP BY device"""


def _crossing_sql(period: Period) -> str:
    """The records that cross a boundary of the period (looked for up to a day from it)."""
    s, e = period.start_ms, period.end_ms
    cols = ("device, started, ended, played_ms, requested_ms, segments, aired_ms, known,"
            " claim")
    return (f"SELECT {cols} FROM plays WHERE ended > {s} AND ended < {s + DAY_MS}"
            f" AND started < {s} UNION ALL SELECT {cols} FROM plays WHERE ended > {e}"
            f" AND ended < {e + DAY_MS} AND started < {e} AND started >= {s}")


def _record(r) -> dict:
    rec = {"started": r["started"], "ended": r["ended"], "played_ms": r["played_ms"]}
    if r["segments"]:
        try:
            rec["segments"] = json.loads(r["segments"])
        except ValueError:
            pass
    return rec


def _uptime_sql(start_ms: int, end_ms: int) -> str:
    """Per device: online and observed ms within [start, end), observed from the first
    transition; each transition lasts until the next (by time, then by arrival)."""
    return f"""
SELECT device,
  SUM(CASE WHEN b > a THEN b - a ELSE 0 END) AS observed,
  SUM(CASE WHEN b > a AND online = 1 THEN b - a ELSE 0 END) AS online
FROM (
  SELECT device, online, CASE WHEN ts > {start_ms} THEN ts ELSE {start_ms} END AS a,
    CASE WHEN nxt IS NULL OR nxt > {end_ms} THEN {end_ms} ELSE nxt END AS b
  FROM (SELECT device, online, ts,
          LEAD(ts) OVER (PARTITION BY device ORDER BY ts, rowid) AS nxt
        FROM transitions WHERE ts < {end_ms}) AS t
) AS u
GROUP BY device"""


def _valid_play(rec: dict) -> bool:
    ints = [rec.get(k) for k in ("started", "ended", "played_ms")]
    return all(isinstance(v, int) and not isinstance(v, bool) for v in ints) and \
        rec["ended"] >= rec["started"] and rec["played_ms"] >= 0


def _aired(rec: dict, period: Period) -> float:
    """Played time inside the period: per segment when the record lists its segments
    (docs/AUDIO.md: one record per item, ``segments`` each with started/ended/played_ms)."""
    segments = rec.get("segments")
    if isinstance(segments, list) and segments and all(
            isinstance(g, dict) and _valid_play(g) for g in segments):
        return sum(_share(g["started"], g["ended"], g["played_ms"], period) for g in segments)
    return _share(rec["started"], rec["ended"], rec["played_ms"], period)


def _share(started: int, ended: int, played: int, period: Period) -> float:
    """The part of ``played`` that falls inside the period (proportional to the overlap);
    ``played`` counts at most the record's own span."""
    played = min(played, ended - started)
    if period.start_ms <= started and ended <= period.end_ms:
        return float(played)
    span = ended - started
    if span <= 0:
        return float(played) if period.start_ms <= started < period.end_ms else 0.0
    overlap = min(ended, period.end_ms) - max(started, period.start_ms)
    return played * max(0, overlap) / span


# --- output ------------------------------------------------------------------------------

def write_csv(stats: list[Stats], out) -> None:
    """The CSV, row by row, to the text file ``out``."""
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for s in stats:
        w.writerow(s.row())


def to_csv(stats: list[Stats]) -> str:
    buf = io.StringIO()
    write_csv(stats, buf)
    return buf.getvalue()


def chart_problem() -> str | None:
    """Why the chart cannot be drawn here (matplotlib or its font missing), or None."""
    try:
        from matplotlib import font_manager
    except ImportError:
        return ("the chart needs matplotlib, which is not installed: pip install"
                " 'ttcs-agent[ctl]' (or pass --no-chart for the CSV and the table only)")
    try:
        font_manager.findfont(font_manager.FontProperties(family=FONT),
                              fallback_to_default=False)
    except ValueError:
        return f"the chart needs the {FONT} font (it covers Vietnamese); or pass --no-chart"
    return None


CHART_ALL_DEVICES = 30  # up to this many devices, the chart shows each; above, a summary
CHART_GROUPS = 40  # groups shown at most (those with the most devices)
CHART_WORST = 10  # devices shown in each "worst" list


def chart_rows(stats: list[Stats]) -> tuple[list[Stats], list[str]]:
    """What the chart shows, and its labels. A district (up to ``CHART_ALL_DEVICES``
    devices): every device, then the groups and the total. Larger: the groups and the total,
    then the devices that aired least and those online least — what an officer acts on; every
    device is in the CSV."""
    devices = [s for s in stats if s.scope == "device"]
    groups = [s for s in stats if s.scope == "group" and s.name != "all"]
    total = [s for s in stats if s.scope == "group" and s.name == "all"]
    if len(groups) > CHART_GROUPS:
        groups = sorted(sorted(groups, key=lambda g: -len(g.devices))[:CHART_GROUPS],
                        key=lambda g: g.name)
    names = [f"Nhóm {g.name}" for g in groups] + ["Toàn bộ" for _ in total]
    if len(devices) <= CHART_ALL_DEVICES:
        return [*devices, *groups, *total], [d.name for d in devices] + names
    least_aired = sorted(devices, key=lambda d: (d.aired_ms, d.name))[:CHART_WORST]
    seen = [d for d in devices if d.observed_ms]
    least_up = sorted(seen, key=lambda d: (d.uptime_pct or 0.0, d.name))[:CHART_WORST]
    return ([*groups, *total, *least_aired, *least_up],
            names + [f"{d.name} (phát ít)" for d in least_aired] +
            [f"{d.name} (hoạt động kém)" for d in least_up])


def chart(stats: list[Stats], period: Period, path: str) -> None:
    """A PNG: aired hours, bulletins/emergencies, uptime and played %, in Vietnamese, for
    :func:`chart_rows` (its height bounded whatever the fleet's size)."""
    from matplotlib import font_manager, rc_context
    from matplotlib.figure import Figure

    font_manager.findfont(font_manager.FontProperties(family=FONT), fallback_to_default=False)
    stats, names = chart_rows(stats)
    y = list(range(len(stats)))
    with rc_context({"font.family": FONT, "font.size": 9}):
        fig = Figure(figsize=(12, 1.6 + 0.38 * len(stats)), layout="constrained")
        a1, a2, a3 = fig.subplots(1, 3, sharey=True)
        a1.barh(y, [s.aired_ms / 3_600_000 for s in stats], color="#2b6cb0")
        a1.set_xlabel("Giờ phát sóng")
        a1.set_yticks(y, names)
        a1.invert_yaxis()
        a2.barh([i - 0.2 for i in y], [s.bulletins for s in stats], 0.4, label="Bản tin")
        a2.barh([i + 0.2 for i in y], [s.emergencies for s in stats], 0.4, color="#c53030",
                label="Tin khẩn cấp")
        a2.set_xlabel("Số bản tin")
        a2.legend(**LEGEND)
        a3.barh([i - 0.2 for i in y], [s.uptime_pct or 0 for s in stats], 0.4,
                color="#2f855a", label="Thời gian hoạt động")
        a3.barh([i + 0.2 for i in y], [s.played_pct or 0 for s in stats], 0.4,
                color="#d69e2e", label="Đã phát / yêu cầu")
        a3.set_xlabel("Tỷ lệ (%)")
        a3.set_xlim(0, 105)
        a3.legend(**LEGEND)
        fig.suptitle(f"Thống kê truyền thanh cơ sở — {period.title}", fontsize=13)
        fig.savefig(path, dpi=110)


def table_text(stats: list[Stats]) -> str:
    head = f"{'':6} {'NAME':<28} {'AIRED h':>8} {'BULLETINS':>9} {'EMERG':>6} " \
           f"{'PLAYED %':>9} {'UPTIME %':>9}"
    lines = [head]
    for s in stats:
        r = s.row()
        lines.append(f"{s.scope:6} {s.name:<28} {r['aired_hours']:>8} {s.bulletins:>9} "
                     f"{s.emergencies:>6} {r['played_pct'] or '-':>9} {r['uptime_pct'] or '-':>9}")
    capped = sum(s.capped for s in stats if s.scope == "device")
    if capped:
        lines.append(f"note: {capped} play records or device totals claimed more airtime than"
                     " their own start and end times allow; counted up to what the clock allows")
    return "\n".join(lines)
