"""What ``ttcs-agent status`` shows: the running agent's status.json, readable over SSH.

``st`` is status.json (written by the core: the link, the last ``state`` snapshot) with
``health`` (the health service's health.json) added when present. Every part is rendered from
what it holds, one line per fact, never as raw JSON cut off at the screen's edge; times are shown
in ``device.timezone``, as the schedule is written.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, tzinfo


def render_status(st: dict, alive: bool, tz: tzinfo | None = None) -> str:
    state = st.get("state") or {}
    clock = state.get("clock") or {}
    lines = [
        f"agent:    {'running' if alive else 'NOT RUNNING'} (pid {st.get('pid')}), "
        f"status written {ago(st.get('written'))}",
        f"device:   {state.get('device', '?')}  version {state.get('version', '?')}  "
        f"session {state.get('session', '?')}",
        f"broker:   {broker_line(st.get('mqtt') or {})}",
        f"outbox:   {(st.get('mqtt') or {}).get('outbox', 0)} messages waiting",
        f"clock:    {'trusted' if clock.get('trusted') else 'NOT trusted'} ({clock.get('source')})",
        f"airing:   {_describe(state.get('playing'), tz) if state.get('playing') else 'nothing'}",
    ]
    if state.get("queue"):
        lines.append(f"queue:    {_queue(state['queue'], tz)}")
    if state.get("volume") is not None:
        lines.append(f"volume:   {state['volume']}")
    if isinstance(state.get("schedule"), dict):
        lines += _schedule(state["schedule"], tz)
    if isinstance(state.get("board"), dict):
        lines += _board(state["board"], tz)
    lines += _render_alerts(state.get("alerts"), tz)
    lines += render_update(state.get("update"))
    lines += _render_health(st.get("health"))
    return "\n".join(lines)


def broker_line(mqtt: dict) -> str:
    """The link in one line: where, connected or why not, and the MQTT version in use."""
    where = f"{mqtt.get('host')}:{mqtt.get('port')}"
    version = f"MQTT {mqtt['protocol']}" if mqtt.get("protocol") else ""
    if mqtt.get("fallback"):
        version += f" (fell back from 5: {mqtt['fallback']})"
    if mqtt.get("connected"):
        return f"{where} connected" + (f", {version}" if version else "")
    why = mqtt.get("last_error") or "no connection attempt has finished yet"
    return f"{where} DISCONNECTED: {why}" + (f"; {version}" if version else "")


def _describe(item, tz) -> str:
    """One line for a playing or scheduled item, whatever shape its component gives it."""
    if not isinstance(item, dict):
        return _short_json(item)
    parts = [str(item[k]) for k in ("id", "kind", "type", "priority") if item.get(k)]
    if isinstance(item.get("step"), int) and isinstance(item.get("steps"), int):
        parts.append(f"part {item['step'] + 1} of {item['steps']}")
    for key in ("due", "at", "started", "since"):
        if isinstance(item.get(key), int):
            parts.append(f"{key} {when(item[key], tz)}")
    if item.get("preparing"):
        parts.append("(being prepared)")
    return " ".join(parts) if parts else _short_json(item)


def _queue(queue, tz) -> str:
    if not isinstance(queue, list):
        return _short_json(queue)
    shown = [_describe(q, tz) for q in queue[:5]]
    more = f"; and {len(queue) - 5} more" if len(queue) > 5 else ""
    return f"{len(queue)} waiting: " + "; ".join(shown) + more


def _schedule(sched: dict, tz) -> list[str]:
    revs = sched.get("revisions") or {}
    docs = ", ".join(f"{topic} rev {rev}" for topic, rev in revs.items()) or "no documents"
    held = "  HELD: the clock is not trusted, nothing scheduled airs" if sched.get("held") else ""
    nxt = sched.get("next")
    return [f"schedule: {docs}{held}",
            f"next:     {_describe(nxt, tz) if nxt else 'no scheduled item'}"]


def _board(board: dict, tz) -> list[str]:
    link = {True: "link ok", False: "LINK DOWN", None: "no link"}.get(board.get("link"), "?")
    head = f"board:    {board.get('driver', '?')}, {link}, brightness {board.get('brightness')}"
    if board.get("error"):
        head += f" ({board['error']})"
    lines = [head]
    showing = board.get("showing")
    if isinstance(showing, dict):
        text = str(showing.get("text", ""))
        text = text if len(text) <= 60 else text[:59] + "…"
        source = " ".join(str(showing[k]) for k in ("source", "id", "priority", "effect")
                          if showing.get(k))
        lines.append(f"  shows:  \"{text}\" ({source}) since {when(showing.get('since'), tz)}")
    else:
        lines.append("  shows:  nothing")
    docs = board.get("documents") or {}
    if docs:
        lines.append("  standing: " + ", ".join(
            f"{topic} rev {d.get('rev')} ({d.get('messages')} message(s))"
            for topic, d in docs.items() if isinstance(d, dict)))
    queue = board.get("queue") or []
    if queue:
        lines.append("  queued: " + ", ".join(
            f"{q.get('id')} ({q.get('priority')}, {q.get('remaining_s')} s left)"
            for q in queue if isinstance(q, dict)))
    return lines


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


def _render_alerts(alerts, tz) -> list[str]:
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
        lines.append(f"  RAISED {a.get('code')}{key} since {when(a.get('since'), tz)}{flap}"
                     + (f": {extra}" if extra else ""))
    return lines


def _render_health(h) -> list[str]:
    if not isinstance(h, dict):
        return ["health:   none yet"]
    system = h.get("system") or {}
    lines = [f"health:   sampled {ago(h.get('ts'))}, uptime {_duration(h.get('uptime_s'))}, "
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


def ago(ms: int | None) -> str:
    if not ms:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago"


def when(ms, tz: tzinfo | None = None) -> str:
    if not isinstance(ms, int):
        return "?"
    stamp = datetime.fromtimestamp(ms / 1000, tz).strftime("%Y-%m-%d %H:%M:%S")
    ahead = int(ms / 1000 - time.time())
    if ahead > 0:
        return f"{stamp} (in {ahead} s)" if ahead < 120 else f"{stamp} (in {ahead // 60} min)"
    return f"{stamp} ({ago(ms)})"


def _duration(seconds) -> str:
    if not isinstance(seconds, int):
        return "?"
    days, rest = divmod(seconds, 86400)
    return (f"{days} d " if days else "") + f"{rest // 3600} h {rest % 3600 // 60} min"


def _short_json(value, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + " …"
