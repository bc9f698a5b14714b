#!/usr/bin/env python3
"""Yearly report at fleet scale (issue #19): ``ttcs-ctl report --year`` over a year of play
records of ``--devices`` devices (default 2,000 devices × 10 items a day = 7.3M records).

The data are generated once into the relay's tables (SQLite in ``--workdir``, kept for the
next run with ``--reuse``; PostgreSQL with ``--pg`` — a temporary server started as the tests
do — or ``--pg-url``): play records of 5–30 minutes in daily slots (some crossing midnight,
some segmented, a few overlapping, a few emergencies) and online/offline changes. Then the
real command runs as its own process, with the chart; measured: wall time and that
process's peak RSS (``wait4``).

Target: ≤ 10 s and ≤ 300 MB peak RSS for 2,000 devices, on SQLite and on PostgreSQL.

    .venv/bin/python scripts/bench/report.py [--devices 2000] [--per-day 10] [--pg] [--reuse]
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import yaml
from common import ROOT, machine, parser, print_table, verdict, workdir, write_json

from ctl.store import RelayStore

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
DAY = 86_400_000
MIN = 60_000
SLOTS = (5 * 60, 6 * 60 + 30, 8 * 60, 11 * 60, 12 * 60, 14 * 60, 15 * 60 + 30, 17 * 60,
         19 * 60, 23 * 60 + 50)  # minutes after midnight; the last crosses midnight
COLUMNS = ("device", "seq", "started", "ended", "played_ms", "requested_ms", "segment",
           "emergency", "segments", "overlap", "aired_ms", "known", "first", "claim")
INSERT_PLAYS = (f"INSERT INTO plays({', '.join(COLUMNS)})"
                f" VALUES({', '.join('?' * len(COLUMNS))})")


def device_name(i: int) -> str:
    return f"prov-d{i // 150:02d}-c{i % 150:03d}"


def rows(devices: int, per_day: int, seed: int = 7):
    """Each device's records in ``started`` order, overlapping neighbours marked as the
    relay marks them (the 16:30 item may run into the 17:00 one)."""
    prev = None
    for r in _rows(devices, per_day, seed):
        overlap = prev is not None and prev[0] == r[0] and prev[3] > r[2]
        if prev is not None:
            yield _derived((*prev[:9], int(prev[9] or overlap)))
        prev = (*r, int(overlap))
    if prev is not None:
        yield _derived(prev)


def _derived(r: tuple) -> tuple:
    """What ``RelayStore.add_play_record`` precomputes (segments here lie within the span)."""
    started, ended, played, requested, segment = r[2], r[3], r[4], r[5], r[6]
    aired = ended - started if r[8] else min(played, ended - started)  # segments: all aired
    return (*r, aired, int(bool(requested)),
            int(segment == 0 and played > 0), int(played > ended - started + 2000))


def _rows(devices: int, per_day: int, seed: int):
    rnd = random.Random(seed)
    y0 = int(datetime(2025, 1, 1, tzinfo=TZ).timestamp() * 1000)
    for i in range(devices):
        d, seq = device_name(i), 0
        for day in range(365):
            base = y0 + day * DAY
            for slot in SLOTS[:per_day]:
                seq += 1
                started = base + slot * MIN + rnd.randrange(0, 60_000)
                span = rnd.randrange(5, 31) * MIN
                if rnd.random() < 0.00002:  # a rare double record: overlaps the next item
                    span = 3 * 60 * MIN
                played = span if rnd.random() > 0.05 else rnd.randrange(0, span)
                segs = None
                if rnd.random() < 0.01:
                    h = span // 2
                    segs = (f'[{{"started":{started},"ended":{started + h},"played_ms":{h}}},'
                            f'{{"started":{started + h},"ended":{started + span},'
                            f'"played_ms":{span - h}}}]')
                yield (d, seq, started, started + span, played, span if slot != 19 * 60
                       else None, 0, int(rnd.random() < 0.02), segs)


def transitions(devices: int, seed: int = 8):
    rnd = random.Random(seed)
    y0 = int(datetime(2025, 1, 1, tzinfo=TZ).timestamp() * 1000)
    n = 0
    for i in range(devices):
        at = y0 - rnd.randrange(1, 30) * DAY
        for k in range(rnd.randrange(2, 40)):
            n += 1
            yield n, device_name(i), at, int(k % 2 == 0), "lost"
            at += rnd.randrange(1, 20 * DAY)


def generate(target: str, devices: int, per_day: int) -> float:
    start = time.perf_counter()
    store = RelayStore(target)
    with store.tx():
        store.many("INSERT INTO devices(device, online, first_seen_ms) VALUES(?, 1, 0)",
                   [(device_name(i),) for i in range(devices)])
    if store.pg:
        with store.conn.cursor() as cur:
            with cur.copy(f"COPY plays ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for r in rows(devices, per_day):
                    copy.write_row(r)
            with cur.copy("COPY transitions (id, device, ts, online, reason) FROM STDIN") as copy:
                for r in transitions(devices):
                    copy.write_row(r)
        store.x("ANALYZE")
    else:
        batch: list[tuple] = []
        with store.tx():
            for r in rows(devices, per_day):
                batch.append(r)
                if len(batch) == 50_000:
                    store.many(INSERT_PLAYS, batch)
                    batch.clear()
            store.many(INSERT_PLAYS, batch)
            store.many("INSERT INTO transitions(id, device, ts, online, reason)"
                       " VALUES(?, ?, ?, ?, ?)", list(transitions(devices)))
        store.x("ANALYZE")
    store.close()
    return time.perf_counter() - start


def run_report(target: str, wd, devices: int) -> dict:
    cfg = wd / "ctl.yaml"
    groups = {f"d{k:02d}": [f"prov-d{k:02d}-*"] for k in range((devices + 149) // 150)}
    groups["prov"] = ["prov-*"]
    cfg.write_text(yaml.safe_dump({"relay": {"db_path": str(wd / "none.db"),
                                             "groups": groups}}))
    out = wd / "out"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ctl", "--config", str(cfg), "report",
                             "--year", "2025", "--out", str(out), "--db", target], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"report failed: {err}")
    csv_path = out / "ttcs-report-2025.csv"
    from PIL import Image

    png = Image.open(out / "ttcs-report-2025.png")
    return {"seconds": round(took, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "csv_rows": sum(1 for _ in open(csv_path)) - 1, "chart_px": list(png.size)}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "report")
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--per-day", type=int, default=10)
    p.add_argument("--pg", action="store_true", help="also on a temporary PostgreSQL")
    p.add_argument("--pg-url", default=None, help="also on this (empty) PostgreSQL database")
    p.add_argument("--no-sqlite", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep the SQLite file of a former run")
    a = p.parse_args()
    wd = workdir(a.workdir, "report")
    results, table = {}, []
    targets = []
    if not a.no_sqlite:
        targets.append(("sqlite", str(wd / f"relay-{a.devices}-{a.per_day}.db")))
    pg = None
    if a.pg and not a.pg_url:
        sys.path.insert(0, str(ROOT))
        from tests.pg_support import Postgres

        pg = Postgres()
        a.pg_url = pg.new_db()
    if a.pg_url:
        targets.append(("postgresql", a.pg_url))
    try:
        for name, target in targets:
            gen = None
            if not (name == "sqlite" and a.reuse and os.path.exists(target)):
                gen = round(generate(target, a.devices, a.per_day), 1)
            r = run_report(target, wd, a.devices)
            r["generated_s"] = gen
            results[name] = r
            table += [(f"{name}: report --year, {a.devices} devices",
                       f"{r['seconds']} s ({r['cpu_s']} CPU-s)", "≤ 10 s",
                       verdict(r["seconds"] <= 10)),
                      (f"{name}: peak RSS", f"{r['peak_rss_mb']} MB", "≤ 300 MB",
                       verdict(r["peak_rss_mb"] <= 300)),
                      (f"{name}: chart", "×".join(map(str, r["chart_px"])) + " px", "", "-")]
    finally:
        if pg:
            pg.stop()
    print_table(f"yearly report, {a.devices * a.per_day * 365:,} play records", table)
    write_json(a.out, {"machine": machine(), "devices": a.devices, "per_day": a.per_day,
                       "records": a.devices * a.per_day * 365, "results": results})


if __name__ == "__main__":
    main()
