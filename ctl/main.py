"""``ttcs-ctl``: the controller side — keys, signed commands and documents, fleet watch,
alert relay and broadcast reports (docs/CTL.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import __version__, protocol
from agent.config import ConfigError
from ctl import config, release
from ctl.cap import cli as cap_cli
from ctl.console import cli as console_cli
from ctl.keys import keygen, pubkey, signing_key
from ctl.sanitize import shown
from ctl.send import send
from ctl.session import EXIT_DONE, EXIT_FAILED, EXIT_USAGE, Session
from ctl.watch import watch

# --- documents ---------------------------------------------------------------------------

def push_document(cfg: dict, kind: str, path: str, target: str, *, dry_run: bool,
                  force: bool, rev: int | None, wait: float, devices: int | None) -> int:
    from ctl import push

    if not protocol.TARGET_RE.fullmatch(target):
        print(f"--target must be dev/ID or grp/G, not {target!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = push.load_args(path, kind)
    except push.PushError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_FAILED
    key = None if dry_run else signing_key(cfg)
    if key is None and not dry_run:
        return EXIT_USAGE
    prefix = cfg["mqtt"]["topic_prefix"]
    topic = f"{prefix}/{target}/desired/{kind}"
    session = Session(cfg, [topic, f"{prefix}/dev/+/event"])
    session.open()
    try:
        live = push.parse_live(push.fetch_live(session, topic), kind)
        if live.args == args and not force:
            print(f"{target} {kind}: live rev {live.rev} already has this content; "
                  "nothing pushed (--force to push anyway)")
            return EXIT_DONE
        try:
            new_rev = push.next_rev(live, rev, int(time.time()))
        except push.PushError as e:
            print(e.problems[0], file=sys.stderr)
            return EXIT_USAGE
        print(f"{target} {kind}: rev {live.rev if live.rev is not None else '(none)'}"
              f" -> {new_rev}")
        print(push.diff(live, args, target, kind) or "(no change in content)")
        if dry_run:
            print("dry run: nothing published")
            return EXIT_DONE
        doc = push.make_document(kind, target, new_rev, args, int(time.time() * 1000))
        session.publish(topic, protocol.canonical(protocol.sign(doc, key, cfg["signing"]["kid"])),
                        retain=True)
        print(f"published retained to {topic}")
        return _print_results(push.results(session, kind, new_rev, target, wait,
                                           1 if target.startswith("dev/") else devices))
    finally:
        session.close()


def _print_results(seen: dict[str, dict]) -> int:
    """One line per device; its result and reason are device data, shown cleaned."""
    if not seen:
        print("no device reported on it yet (offline devices get it when they reconnect)")
        return EXIT_DONE
    for device, ev in sorted(seen.items()):
        extra = f" ({shown(ev['reason'], 40)})" if ev.get("reason") else ""
        print(f"{device:<28} {shown(ev.get('result'), 20)}{extra}")
    return EXIT_DONE if all(ev.get("result") == "applied" for ev in seen.values()) \
        else EXIT_FAILED


# --- relay and report --------------------------------------------------------------------

def relay(cfg: dict, once: float | None) -> int:
    import logging

    from ctl import relay as relay_mod

    try:
        import gmqtt  # noqa: F401  (the relay's MQTT link: the ctl extra)
    except ImportError as e:
        print(f"ttcs-ctl relay needs the controller extras ({e.name} is missing):"
              " pip install 'ttcs-agent[ctl]'", file=sys.stderr)
        return EXIT_FAILED
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return relay_mod.run(cfg, once_s=once)


def serve(cfg: dict, listen: str | None, with_relay: bool) -> int:
    import logging

    from ctl.console import serve as serve_mod

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve_mod.run(cfg, listen, with_relay)


def report(cfg: dict, month: str | None, year: str | None, out_dir: str, db: str | None,
           chart: bool) -> int:
    from ctl import report as rep
    from ctl.store import RelayStore

    try:
        period = rep.parse_period(month, year, cfg["relay"]["timezone"])
    except ValueError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    problem = rep.chart_problem() if chart else None
    if problem:
        print(f"ttcs-ctl report: {problem}", file=sys.stderr)
        return EXIT_FAILED
    from ctl.db import is_url

    db_path = db or cfg["relay"].get("db_url") or os.path.expanduser(cfg["relay"]["db_path"])
    if not is_url(db_path) and not os.path.exists(os.path.expanduser(db_path)):
        print(f"no relay database at {db_path}", file=sys.stderr)
        return EXIT_FAILED
    store = RelayStore(db_path)
    try:
        stats = rep.compute(store, period, cfg["relay"]["groups"], int(time.time() * 1000))
    finally:
        store.close()
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"ttcs-report-{period.label}.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        rep.write_csv(stats, f)
    print(rep.table_text(stats))
    print(f"CSV: {csv_path}")
    if chart:
        png_path = os.path.join(out_dir, f"ttcs-report-{period.label}.png")
        rep.chart(stats, period, png_path)
        print(f"chart: {png_path}")
    return EXIT_DONE


# --- entry -------------------------------------------------------------------------------

DESCRIPTION = f"""\
The controller side of ttcs-agent: signing keys, signed commands and documents, the live
fleet table, the alert relay and broadcast reports (docs/CTL.md).

Config: {config.DEFAULT_CTL_PATH}, or --config FILE (before or after the command), or
$TTCS_CTL_CONFIG. Every key is shown in config/ctl.example.yaml. keygen, pubkey and
version need no config."""


def _parser() -> argparse.ArgumentParser:
    """The command line. Help texts are plain text (they are printed as they are)."""
    parser = argparse.ArgumentParser(prog="ttcs-ctl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_help = f"ctl config (default {config.DEFAULT_CTL_PATH})"
    parser.add_argument("--config", help=config_help)
    # --config is also accepted after the command; SUPPRESS keeps one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, text: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=text, description=text, parents=[common])

    p = command("keygen", "make an Ed25519 signing key and print its public key")
    p.add_argument("--out", required=True, help="private key file to write (mode 0600)")
    p.add_argument("--kid", default="district-ctl-1", help="key id shown in the config snippet")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key file (agents then need the new public key)")
    p = command("pubkey", "print the public key of an existing private key file")
    p.add_argument("key_file", help="private key file written by keygen")
    p.add_argument("--kid", default="district-ctl-1", help="key id shown in the config snippet")
    p = command("send", "sign and send a command, print its acks")
    p.add_argument("target", help="dev/ID, grp/G or grp/all")
    p.add_argument("type", help="command type: " + ", ".join(protocol.COMMAND_TYPES))
    p.add_argument("args", nargs="?", default="{}", help="arguments as a JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for acks")
    p.add_argument("--ttl", type=int, default=600, help="exp = now + TTL seconds (0: none)")
    p.add_argument("--id", help="command id (default: random)")
    p.add_argument("--devices", type=int, help="for a group: how many devices to wait for")
    p.add_argument("--unsigned", action="store_true", help="send without a signature")
    p.add_argument("--json", action="store_true", help="print acks as JSON lines")
    p = command("watch", "live fleet table")
    p.add_argument("--once", type=float, metavar="SECONDS",
                   help="collect for SECONDS, print the table once and exit")
    p.add_argument("--group", help="only devices of this group (relay.groups)")
    p.add_argument("--alert", metavar="CODE", help="only devices with this alert (or: any)")
    p = command("relay", "watch every device, store what they send, notify staff")
    p.add_argument("--once", type=float, metavar="SECONDS", help="run for SECONDS, then exit")
    p = command("report", "broadcast statistics as CSV and a PNG chart")
    period = p.add_mutually_exclusive_group(required=True)
    period.add_argument("--month", metavar="YYYY-MM")
    period.add_argument("--year", metavar="YYYY")
    p.add_argument("--out", default=".", help="folder for the CSV and PNG (default .)")
    p.add_argument("--db", help="relay database: a path or a postgresql:// URL (default"
                   " relay.db_url, else relay.db_path)")
    p.add_argument("--no-chart", action="store_true",
                   help="CSV and table only (no PNG; matplotlib not needed)")
    for kind in ("schedule", "board"):
        p = command(kind, f"standing {kind} documents")
        ksub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        pp = command("push", "validate, diff, bump rev, sign, publish retained", ksub)
        pp.add_argument("file", help=f"YAML with the {kind} document's args")
        pp.add_argument("--target", required=True, help="dev/ID, grp/G or grp/all")
        pp.add_argument("--dry-run", action="store_true", help="show the diff, publish nothing")
        pp.add_argument("--force", action="store_true", help="push even if nothing changed")
        pp.add_argument("--rev", type=int, help="the new rev (default: live rev + 1)")
        pp.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for devices' results (default 10)")
        pp.add_argument("--devices", type=int, help="for a group: results to wait for")
    command("version", "print the version")
    release.add_parser(sub)
    p = command("serve", "the district console (web) with the relay, in one process")
    p.add_argument("--listen", metavar="HOST:PORT", help="default console.listen"
                   " (127.0.0.1:8080)")
    p.add_argument("--no-relay", action="store_true",
                   help="console only (a relay runs elsewhere on the same store)")
    console_cli.add_parser(sub, command)
    cap_cli.add_parser(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "version":
        print(f"ttcs-ctl {__version__}")
        return 0
    if args.cmd == "release":
        return release.main(args)
    if args.cmd in ("keygen", "pubkey"):
        try:
            return keygen(args.out, args.kid, args.force) if args.cmd == "keygen" else \
                pubkey(args.key_file, args.kid)
        except (OSError, ValueError) as e:
            print(f"ttcs-ctl: {e}", file=sys.stderr)
            return EXIT_FAILED
    path, source = config.resolve_path(args.config)
    if not os.path.exists(path):
        print(config.missing_message(path, source), file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config.load(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(cfg, args)
    except (OSError, TimeoutError, ConnectionError, ValueError) as e:
        print(f"ttcs-ctl: {e}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(cfg: dict, args: argparse.Namespace) -> int:
    if args.cmd == "send":
        try:
            cmd_args = json.loads(args.args)
        except ValueError as e:
            print(f"ARGS must be a JSON object: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(cmd_args, dict):
            print("ARGS must be a JSON object", file=sys.stderr)
            return EXIT_USAGE
        return send(cfg, args.target, args.type, cmd_args, timeout=args.timeout,
                    ttl_s=args.ttl or None, cmd_id=args.id, unsigned=args.unsigned,
                    as_json=args.json, devices=args.devices)
    if args.cmd == "relay":
        return relay(cfg, args.once)
    if args.cmd == "serve":
        return serve(cfg, args.listen, not args.no_relay)
    if args.cmd == "user":
        return console_cli.main(cfg, args)
    if args.cmd == "cap":
        return cap_cli.main(cfg, args)
    if args.cmd == "report":
        return report(cfg, args.month, args.year, args.out, args.db, not args.no_chart)
    if args.cmd in ("schedule", "board"):
        return push_document(cfg, args.cmd, args.file, args.target, dry_run=args.dry_run,
                             force=args.force, rev=args.rev, wait=args.wait,
                             devices=args.devices)
    return watch(cfg, args.once, args.group, args.alert)


if __name__ == "__main__":
    sys.exit(main())
