"""``ttcs-agent``: the daemon and the technician's on-device tool."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import __version__, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttcs-agent", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "run in the foreground until SIGTERM/SIGINT"),
                           ("check-config", "validate the config file"),
                           ("status", "what the running agent is doing")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH})")
    sub.choices["status"].add_argument("--json", action="store_true", help="raw JSON")
    p = sub.add_parser("doctor", help="check audio, board, GPIO, modem, broker, clock, disk, config")
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
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        for p in e.problems:
            print(p)
        return 1
    print(f"{cfg['_path']}: ok (device {cfg['device']['id']})")
    return 0


def board_preview(args) -> int:
    from agent.board_preview import preview

    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    result = preview(cfg["board"], args.text, args.out, effect=args.effect, scale=args.scale)
    kind = "animated GIF" if result["animated"] else "PNG"
    print(f"{result['path']}: {kind}, {result['frames']} frame(s), board "
          f"{result['width']}x{result['height']}, text {result['text_width']} px wide")
    return 0


def status(path: str | None, raw: bool) -> int:
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    state_dir = cfg["paths"]["state_dir"]
    try:
        with open(os.path.join(state_dir, "status.json"), encoding="utf-8") as f:
            st = json.load(f)
    except (OSError, ValueError):
        print(f"no status in {state_dir}: the agent has not run here yet")
        return 3
    alive = _pid_alive(st.get("pid"))
    if raw:
        print(json.dumps({**st, "alive": alive}, ensure_ascii=False, indent=1))
        return 0 if alive else 3
    print(render_status(st, alive))
    return 0 if alive else 3


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(ms: int | None) -> str:
    if not ms:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago"


def render_status(st: dict, alive: bool) -> str:
    state = st.get("state") or {}
    mqtt = st.get("mqtt") or {}
    lines = [
        f"agent:    {'running' if alive else 'NOT RUNNING'} (pid {st.get('pid')}), "
        f"status written {_ago(st.get('written'))}",
        f"device:   {state.get('device', '?')}  version {state.get('version', '?')}  "
        f"session {state.get('session', '?')}",
        f"broker:   {mqtt.get('host')}:{mqtt.get('port')} "
        f"{'connected' if mqtt.get('connected') else 'DISCONNECTED'}"
        + ("" if mqtt.get("connected") else f" ({mqtt.get('last_error')})"),
        f"outbox:   {mqtt.get('outbox', 0)} messages waiting",
        f"clock:    {'trusted' if (state.get('clock') or {}).get('trusted') else 'NOT trusted'}"
        f" ({(state.get('clock') or {}).get('source')})",
    ]
    for key in ("playing", "queue", "volume", "schedule", "board", "alerts", "health"):
        if key in state:
            lines.append(f"{key + ':':<10}{json.dumps(state[key], ensure_ascii=False)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
