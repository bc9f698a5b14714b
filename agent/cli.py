"""``ttcs-agent``: the daemon and the technician's on-device tool."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import __version__, config
from agent.pidfile import pid_alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttcs-agent", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "run in the foreground until SIGTERM/SIGINT"),
                           ("check-config", "validate the config file"),
                           ("status", "what the running agent is doing")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH})")
    sub.choices["status"].add_argument("--json", action="store_true", help="raw JSON")
    p = sub.add_parser("doctor", help="check audio, board, GPIO, modem, broker, clock, disk")
    p.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH})")
    p = sub.add_parser("board-preview", help="render text as the configured board shows it")
    p.add_argument("text", help="the message (Vietnamese with diacritics is fine)")
    p.add_argument("--out", default="board-preview.png", help="PNG (static) or GIF (scrolling)")
    p.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH})")
    p.add_argument("--effect", choices=("auto", "scroll", "static"), default="auto")
    p.add_argument("--scale", type=int, default=8, help="pixels per LED in the picture")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(f"ttcs-agent {__version__}")
        return 0
    if args.cmd == "check-config":
        return check_config(args.config)
    if args.cmd == "status":
        return status(args.config, args.json)
    if args.cmd == "board-preview":
        return board_preview(args)
    if args.cmd == "doctor":
        from agent import doctor

        return doctor.main(args.config)
    from agent import app

    return app.run(args.config)


def check_config(path: str | None) -> int:
    cfg = config.load_or_report(path, sys.stdout)
    if cfg is None:
        return 1
    print(f"{cfg['_path']}: ok (device {cfg['device']['id']})")
    return 0


def board_preview(args) -> int:
    from agent.board.preview import preview

    cfg = config.load_or_report(args.config)
    if cfg is None:
        return 1
    result = preview(cfg["board"], args.text, args.out, effect=args.effect, scale=args.scale)
    kind = "animated GIF" if result["animated"] else "PNG"
    print(f"{result['path']}: {kind}, {result['frames']} frame(s), board "
          f"{result['width']}x{result['height']}, text {result['text_width']} px wide")
    return 0


def status(path: str | None, raw: bool) -> int:
    cfg = config.load_or_report(path)
    if cfg is None:
        return 1
    global _DEVICE_TZ
    from zoneinfo import ZoneInfo

    _DEVICE_TZ = ZoneInfo(cfg["device"]["timezone"])
    state_dir = cfg["paths"]["state_dir"]
    try:
        with open(os.path.join(state_dir, "status.json"), encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        print(f"no status in {state_dir}: the agent has not run here yet")
        return 3
    alive = pid_alive(st.get("pid"))
    try:
        with open(os.path.join(state_dir, "health.json"), encoding="utf-8") as f:
            st["health"] = json.load(f)
    except (OSError, ValueError):
        pass
    if raw:
        print(json.dumps({**st, "alive": alive}, ensure_ascii=False, indent=1))
        return 0 if alive else 3
    print(render_status(st, alive))
    return 0 if alive else 3


def _ago(ms: int | None) -> str:
    if not ms:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago"


def render_status(st: dict, alive: bool) -> str:
    """The technician's view over SSH: the agent, the link, what airs, alerts, last health.

    ``st`` is status.json (written by the core) with ``health`` (the health service's
    health.json) added when present.
    """
    state = st.get("state") or {}
    mqtt = st.get("mqtt") or {}
    clock = state.get("clock") or {}
    lines = [
        f"agent:    {'running' if alive else 'NOT RUNNING'} (pid {st.get('pid')}), "
        f"status written {_ago(st.get('written'))}",
        f"device:   {state.get('device', '?')}  version {state.get('version', '?')}  "
        f"session {state.get('session', '?')}",
        f"broker:   {mqtt.get('host')}:{mqtt.get('port')} "
        f"{'connected' if mqtt.get('connected') else 'DISCONNECTED'}"
        + ("" if mqtt.get("connected") else f" ({mqtt.get('last_error')})"),
        f"outbox:   {mqtt.get('outbox', 0)} messages waiting",
        f"clock:    {'trusted' if clock.get('trusted') else 'NOT trusted'} ({clock.get('source')})",
        f"airing:   {_describe(state.get('playing')) if state.get('playing') else 'nothing'}",
    ]
    if isinstance(state.get("schedule"), dict):
        nxt = state["schedule"].get("next")
        lines.append(f"next:     {_describe(nxt) if nxt else 'no scheduled item'}")
    lines += _render_alerts(state.get("alerts"))
    lines += render_update(state.get("update"))
    lines += _render_health(st.get("health"))
    for key in ("queue", "volume", "schedule", "board"):
        if state.get(key) not in (None, [], {}):
            lines.append(f"{key + ':':<10}{_short_json(state[key])}")
    return "\n".join(lines)


def render_update(u) -> list[str]:
    """Versions and any update over the air in progress (docs/UPDATE.md)."""
    if not isinstance(u, dict):
        return []
    lines = [f"versions: running {u.get('running') or '?'}, previous "
             f"{u.get('previous') or 'none'}"]
    cur = u.get("in_progress")
    if isinstance(cur, dict):
        starts = f", start {cur['starts']}" if cur.get("starts") else ""
        lines.append(f"update:   {cur.get('version')} {cur.get('phase')}{starts} "
                     f"(command {cur.get('id')})")
    last = u.get("last")
    if isinstance(last, dict) and last.get("state") == "rolled_back":
        lines.append(f"update:   {last.get('version')} ROLLED BACK: {last.get('why')}")
    return lines


def _describe(item) -> str:
    """One line for a playing or scheduled item, whatever shape its component gives it."""
    if not isinstance(item, dict):
        return _short_json(item)
    parts = [str(item[k]) for k in ("id", "kind", "type", "priority") if item.get(k)]
    for key in ("due", "at", "started", "since"):
        if isinstance(item.get(key), int):
            parts.append(f"{key} {_when(item[key])}")
    return " ".join(parts) if parts else _short_json(item)


def _render_alerts(alerts) -> list[str]:
    if not alerts:
        return ["alerts:   none"]
    lines = [f"alerts:   {len(alerts)} RAISED"]
    for a in alerts if isinstance(alerts, list) else []:
        if not isinstance(a, dict):
            continue
        key = f"[{a['key']}]" if a.get("key") else ""
        detail = a.get("detail") or {}
        extra = ", ".join(f"{k} {v}" for k, v in detail.items()) if isinstance(detail, dict) else ""
        flap = " (flapping)" if a.get("flapping") else ""
        lines.append(f"  RAISED {a.get('code')}{key} since {_when(a.get('since'))}{flap}"
                     + (f": {extra}" if extra else ""))
    return lines


def _render_health(h) -> list[str]:
    if not isinstance(h, dict):
        return ["health:   none yet"]
    system = h.get("system") or {}
    lines = [f"health:   sampled {_ago(h.get('ts'))}, uptime {_duration(h.get('uptime_s'))}, "
             f"agent up {_duration(h.get('agent_uptime_s'))}"]
    temp = system.get("cpu_temp_c")
    load = system.get("load") or []
    lines.append(f"  cpu {'?' if temp is None else f'{temp:.1f}'} °C, load "
                 f"{' '.join(str(x) for x in load) or '?'}, memory "
                 f"{system.get('mem_available_mb', '?')}/{system.get('mem_total_mb', '?')} MB free")
    disk = h.get("disk_free_mb") or {}
    lines.append("  disk free: " + (", ".join(f"{k} {v} MB" for k, v in disk.items()) or "?"))
    throttled = system.get("throttled")
    if isinstance(throttled, dict):
        now = [k for k, v in throttled.items() if v is True and not k.endswith("_occurred")]
        past = [k[:-9] for k, v in throttled.items() if v is True and k.endswith("_occurred")]
        lines.append(f"  power/throttling: now {', '.join(now) or 'ok'}; since boot "
                     f"{', '.join(past) or 'ok'}")
    lines.append("  cabinet: " + _cabinet_line(h.get("cabinet") or {}))
    audio = h.get("audio") or {}
    if any(v is not None for v in audio.values()):
        lines.append(f"  audio: ok {audio.get('ok')}, volume {audio.get('volume')}, "
                     f"last level {audio.get('last_level_dbfs')} dBFS")
    link = (h.get("board") or {}).get("link")
    if link is not None:
        lines.append(f"  board: {'link ok' if link else 'LINK DOWN'}")
    lines.append("  modem: " + _modem_line(h.get("modem"), h.get("modem_error")))
    return lines


def _cabinet_line(cab: dict) -> str:
    words = {
        "door_open": ("door OPEN", "door closed"),
        "mains_present": ("mains present", "MAINS LOST"),
        "amplifier_fault": ("amplifier FAULT", "amplifier ok"),
        "amplifier_on": ("amplifier on", "amplifier off"),
    }
    out = [(yes if cab[k] else no) for k, (yes, no) in words.items() if cab.get(k) is not None]
    return ", ".join(out) or "no sensors"


def _modem_line(modem, error) -> str:
    if not isinstance(modem, dict):
        return f"not answering ({error})" if error else "none"
    return (f"{modem.get('signal_dbm')} dBm, {modem.get('operator') or 'no operator'}, "
            f"{modem.get('tech') or '?'}, {modem.get('registration') or 'not registered'}")


_DEVICE_TZ = None  # times are shown in device.timezone, as the schedule is written


def _when(ms) -> str:
    if not isinstance(ms, int):
        return "?"
    from datetime import datetime

    stamp = datetime.fromtimestamp(ms / 1000, _DEVICE_TZ).strftime("%Y-%m-%d %H:%M:%S")
    ahead = int(ms / 1000 - time.time())
    if ahead > 0:
        return f"{stamp} (in {ahead} s)" if ahead < 120 else f"{stamp} (in {ahead // 60} min)"
    return f"{stamp} ({_ago(ms)})"


def _duration(seconds) -> str:
    if not isinstance(seconds, int):
        return "?"
    days, rest = divmod(seconds, 86400)
    return (f"{days} d " if days else "") + f"{rest // 3600} h {rest % 3600 // 60} min"


def _short_json(value, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + " …"


if __name__ == "__main__":
    sys.exit(main())
