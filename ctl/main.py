"""``ttcs-ctl``: the controller side — keys, signed commands and documents, fleet watch,
alert relay and broadcast reports (docs/CTL.md)."""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import stat
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__, protocol
from agent.config import ConfigError
from agent.core.mqtt import make_client, no_delay
from ctl import config, release
from ctl.config import groups_of

EXIT_DONE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE = 0, 1, 2, 64


# --- keys --------------------------------------------------------------------------------

def keygen(out: str, kid: str, force: bool) -> int:
    out = os.path.expanduser(out)
    if os.path.exists(out) and not force:
        print(f"{out} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    pub = protocol.public_key_b64(key)
    print(f"private key written to {out} (mode 0600)")
    print("add to each agent's config:")
    print("security:\n  trusted_keys:")
    print(f'    {kid}: "{pub}"')
    return 0


def load_private_key(path: str) -> Ed25519PrivateKey:
    path = os.path.expanduser(path)
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by group or others; chmod 600 it")
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


# --- sending -----------------------------------------------------------------------------

def make_envelope(target: str, typ: str, args: dict, *, ttl_s: int | None, cmd_id: str | None,
                  now_ms: int | None = None) -> dict:
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    env = {"v": 1, "id": cmd_id or f"c-{secrets.token_hex(6)}", "type": typ, "target": target,
           "ts": now_ms, "args": args}
    if ttl_s:
        env["exp"] = now_ms + ttl_s * 1000
    return env


class Session:
    """A short-lived controller connection: messages arrive on a queue."""

    def __init__(self, cfg: dict, subscriptions: list[str]) -> None:
        self.cfg = cfg
        self.messages: queue.Queue = queue.Queue()
        self.client = make_client(cfg["mqtt"], f"ttcs-ctl-{secrets.token_hex(4)}",
                                  persistent=False)
        self._subscribed = queue.Queue()
        self.subscriptions = subscriptions
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.put(True)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload),
                                                                    bool(m.retain)))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._subscribed.put(f"broker refused: {reason_code}")
            return
        client.subscribe([(t, 1) for t in self.subscriptions])

    def open(self, timeout: float = 10.0) -> None:
        m = self.cfg["mqtt"]
        self.client.connect(m["host"], int(m["port"]), keepalive=int(m["keepalive_s"]))
        no_delay(self.client)
        self.client.loop_start()
        try:
            ok = self._subscribed.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from the broker at {m['host']}:{m['port']}") from None
        if ok is not True:
            raise ConnectionError(ok)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send(cfg: dict, target: str, typ: str, args: dict, *, timeout: float, ttl_s: int | None,
         cmd_id: str | None, unsigned: bool, as_json: bool, devices: int | None) -> int:
    if not protocol.TARGET_RE.match(target):
        print(f"target must be dev/ID or grp/G, not {target!r}", file=sys.stderr)
        return EXIT_USAGE
    env = make_envelope(target, typ, args, ttl_s=ttl_s, cmd_id=cmd_id)
    if not unsigned:
        sign_cfg = cfg["signing"]
        if not sign_cfg.get("key_file") or not sign_cfg.get("kid"):
            print("signing.kid and signing.key_file must be set (or pass --unsigned)",
                  file=sys.stderr)
            return EXIT_USAGE
        env = protocol.sign(env, load_private_key(sign_cfg["key_file"]), sign_cfg["kid"])
    prefix = cfg["mqtt"]["topic_prefix"]
    ack_topic = f"{prefix}/{target}/ack" if target.startswith("dev/") else f"{prefix}/dev/+/ack"
    session = Session(cfg, [ack_topic])
    session.open()
    try:
        session.publish(f"{prefix}/{target}/cmd", protocol.canonical(env))
        return _follow_acks(session, env["id"], target, timeout, as_json, devices)
    finally:
        session.close()


def _follow_acks(session: Session, cmd_id: str, target: str, timeout: float, as_json: bool,
                 devices: int | None, settle_s: float = 3.0) -> int:
    """Print acks for ``cmd_id`` until each device reached a final stage (or the timeout).

    For a group without ``devices``, stop once every device heard from has finished and
    nothing new came for ``settle_s``."""
    finals: dict[str, str] = {}
    received: set[str] = set()
    deadline = time.monotonic() + timeout
    last_activity = time.monotonic()
    single = target.startswith("dev/")
    while time.monotonic() < deadline:
        try:
            topic, payload, _ = session.messages.get(timeout=0.2)
        except queue.Empty:
            settled = time.monotonic() - last_activity > settle_s
            if not single and devices is None and finals and finals.keys() >= received and settled:
                break
            continue
        ack = _parse_ack(payload)
        if ack is None or ack.get("id") != cmd_id:
            continue
        device = topic.split("/")[-2]
        last_activity = time.monotonic()
        stage = ack.get("stage")
        if stage == "rejected" and ack.get("reason") == protocol.REPLAYED and device in received:
            continue  # a duplicate delivery of a command this device already took
        print(json.dumps({"device": device, **ack}, ensure_ascii=False) if as_json else
              _ack_line(device, ack), flush=True)
        if stage == "received":
            received.add(device)
        if stage in protocol.FINAL_STAGES:
            finals.setdefault(device, stage)
            received.add(device)
        if (single and finals) or (devices is not None and len(finals) >= devices):
            break
    if not finals:
        print(f"no final ack within {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if devices is not None and len(finals) < devices:
        print(f"{len(finals)} of {devices} devices finished within {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_DONE if all(s == "done" for s in finals.values()) else EXIT_FAILED


def _parse_ack(payload: bytes) -> dict | None:
    try:
        ack = json.loads(payload)
    except ValueError:
        return None
    return ack if isinstance(ack, dict) else None


def _ack_line(device: str, ack: dict) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(ack.get("ts", 0) / 1000))
    line = f"{ts} {device:<24} {ack.get('stage', '?'):<10}"
    if ack.get("reason"):
        line += f" {ack['reason']}"
    detail = ack.get("detail") or {}
    if detail.get("message"):
        line += f": {detail['message']}"
    return line


# --- watch -------------------------------------------------------------------------------

class Fleet:
    """What ``watch`` knows of each device, from status, state, health and event topics."""

    def __init__(self, groups: dict[str, list[str]] | None = None) -> None:
        self.devices: dict[str, dict] = {}
        self.groups = groups or {}

    def update(self, topic: str, payload: bytes, now: float | None = None) -> None:
        parts = topic.split("/")
        if len(parts) < 4 or parts[-3] != "dev":
            return
        device, leaf = parts[-2], parts[-1]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        d = self.devices.setdefault(device, {"online": None, "last_seen": None, "playing": None,
                                             "alerts": {}, "health": None, "reason": None})
        d["last_seen"] = now if now is not None else time.time()
        handler = getattr(self, f"_{leaf}", None)
        if handler is not None:
            handler(d, body)

    @staticmethod
    def _status(d: dict, body: dict) -> None:
        d["online"] = body.get("state") == "online"
        d["reason"] = body.get("reason")

    @staticmethod
    def _state(d: dict, body: dict) -> None:
        d["playing"] = body.get("playing")
        if isinstance(body.get("volume"), int):
            d["volume"] = body["volume"]
        alerts = body.get("alerts")
        if isinstance(alerts, list):
            d["alerts"] = {a["code"]: True for a in alerts
                           if isinstance(a, dict) and isinstance(a.get("code"), str)}

    @staticmethod
    def _health(d: dict, body: dict) -> None:
        d["health"] = body

    @staticmethod
    def _event(d: dict, body: dict) -> None:
        code = body.get("code")
        if body.get("type") != "alert" or not isinstance(code, str):
            return
        if body.get("state") == "raised":
            d["alerts"][code] = True
        else:
            d["alerts"].pop(code, None)

    def groups_of(self, device: str) -> list[str]:
        return groups_of(device, self.groups)

    def selected(self, group: str | None = None, alert: str | None = None) -> list[str]:
        """Device names passing the filters; ``alert``: a code, or ``any``."""
        out = []
        for name in sorted(self.devices):
            d = self.devices[name]
            if group and group != "all" and group not in self.groups_of(name):
                continue
            if alert and not (d["alerts"] if alert == "any" else alert in d["alerts"]):
                continue
            out.append(name)
        return out

    def table(self, group: str | None = None, alert: str | None = None,
              now: float | None = None):
        from rich.table import Table

        now = now if now is not None else time.time()
        names = self.selected(group, alert)
        online = sum(1 for n in names if self.devices[n]["online"])
        t = Table(title=f"ttcs fleet: {online}/{len(names)} online", title_justify="left")
        for col in ("DEVICE", "GROUPS", "STATUS", "LAST SEEN", "PLAYING", "VOLUME", "ALERTS"):
            t.add_column(col, no_wrap=col in ("DEVICE", "STATUS"))
        for name in names:
            t.add_row(*self._row(name, now))
        return t

    def _row(self, name: str, now: float) -> list[str]:
        d = self.devices[name]
        status = {True: "[green]online[/]", None: "?"}.get(
            d["online"], f"[red]OFFLINE[/] {d.get('reason') or ''}".rstrip())
        seen = f"{int(now - d['last_seen'])} s" if d["last_seen"] else "-"
        playing = d["playing"]
        if isinstance(playing, dict):
            playing = playing.get("id") or playing.get("source") or "yes"
        audio = (d["health"] or {}).get("audio") if isinstance(d["health"], dict) else None
        volume = d.get("volume")  # the state snapshot's, else the last health sample's
        if volume is None and isinstance(audio, dict):
            volume = audio.get("volume")
        alerts = ", ".join(sorted(d["alerts"]))
        return [name, ",".join(self.groups_of(name)) or "-", status, seen,
                _esc(str(playing or "-")), "-" if volume is None else str(volume),
                f"[yellow]{_esc(alerts)}[/]" if alerts else "-"]


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def watch(cfg: dict, once: float | None, group: str | None = None,
          alert: str | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    prefix = cfg["mqtt"]["topic_prefix"]
    session = Session(cfg, [f"{prefix}/dev/+/{leaf}"
                            for leaf in ("status", "state", "health", "event")])
    session.open()
    fleet = Fleet(cfg.get("relay", {}).get("groups"))
    try:
        if once:
            _drain(session, fleet, time.monotonic() + once)
            Console(width=160).print(fleet.table(group, alert))
            return 0
        with Live(fleet.table(group, alert), refresh_per_second=1, screen=False) as live:
            while True:
                _drain(session, fleet, time.monotonic() + 1)
                live.update(fleet.table(group, alert))
    except KeyboardInterrupt:
        return 0
    finally:
        session.close()


def _drain(session: Session, fleet: Fleet, until: float) -> None:
    while time.monotonic() < until:
        try:
            topic, payload, _ = session.messages.get(timeout=0.2)
        except queue.Empty:
            continue
        fleet.update(topic, payload)


# --- documents ---------------------------------------------------------------------------

def push_document(cfg: dict, kind: str, path: str, target: str, *, dry_run: bool,
                  force: bool, rev: int | None, wait: float, devices: int | None) -> int:
    from ctl import push

    if not protocol.TARGET_RE.match(target):
        print(f"--target must be dev/ID or grp/G, not {target!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = push.load_args(path, kind)
    except push.PushError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_FAILED
    key = None if dry_run else _signing_key(cfg)
    if key is False:
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


def _signing_key(cfg: dict):
    sign_cfg = cfg["signing"]
    if not sign_cfg.get("key_file") or not sign_cfg.get("kid"):
        print("signing.kid and signing.key_file must be set", file=sys.stderr)
        return False
    return load_private_key(sign_cfg["key_file"])


def _print_results(seen: dict[str, dict]) -> int:
    if not seen:
        print("no device reported on it yet (offline devices get it when they reconnect)")
        return EXIT_DONE
    for device, ev in sorted(seen.items()):
        extra = f" ({ev['reason']})" if ev.get("reason") else ""
        print(f"{device:<28} {ev.get('result')}{extra}")
    return EXIT_DONE if all(ev.get("result") == "applied" for ev in seen.values()) \
        else EXIT_FAILED


# --- relay and report --------------------------------------------------------------------

def relay(cfg: dict, once: float | None) -> int:
    import logging

    from ctl import relay as relay_mod

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return relay_mod.run(cfg, once_s=once)


def report(cfg: dict, month: str | None, year: str | None, out_dir: str, db: str | None,
           chart: bool) -> int:
    from ctl import report as rep
    from ctl.relay import RelayStore

    try:
        period = rep.parse_period(month, year, cfg["relay"]["timezone"])
    except ValueError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    db_path = os.path.expanduser(db or cfg["relay"]["db_path"])
    if not os.path.exists(db_path):
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
        f.write(rep.to_csv(stats))
    print(rep.table_text(stats))
    print(f"CSV: {csv_path}")
    if chart:
        png_path = os.path.join(out_dir, f"ttcs-report-{period.label}.png")
        rep.chart(stats, period, png_path)
        print(f"chart: {png_path}")
    return EXIT_DONE


# --- entry -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttcs-ctl", description=__doc__)
    parser.add_argument("--config", help=f"ctl config (default {config.DEFAULT_CTL_PATH})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("keygen", help="make an Ed25519 signing key")
    p.add_argument("--out", required=True, help="private key file to write (mode 0600)")
    p.add_argument("--kid", default="district-ctl-1", help="key id shown in the config snippet")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("send", help="sign and send a command, print its acks")
    p.add_argument("target", help="dev/ID, grp/G or grp/all")
    p.add_argument("type", help="command type: " + ", ".join(protocol.COMMAND_TYPES))
    p.add_argument("args", nargs="?", default="{}", help="arguments as a JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for acks")
    p.add_argument("--ttl", type=int, default=600, help="exp = now + TTL seconds (0: none)")
    p.add_argument("--id", help="command id (default: random)")
    p.add_argument("--devices", type=int, help="for a group: how many devices to wait for")
    p.add_argument("--unsigned", action="store_true", help="send without a signature")
    p.add_argument("--json", action="store_true", help="print acks as JSON lines")
    p = sub.add_parser("watch", help="live fleet table")
    p.add_argument("--once", type=float, metavar="SECONDS",
                   help="collect for SECONDS, print the table once and exit")
    p.add_argument("--group", help="only devices of this group (relay.groups)")
    p.add_argument("--alert", metavar="CODE", help="only devices with this alert (or: any)")
    p = sub.add_parser("relay", help="watch every device, store, notify staff")
    p.add_argument("--once", type=float, metavar="SECONDS", help="run for SECONDS, then exit")
    p = sub.add_parser("report", help="broadcast statistics as CSV and a PNG chart")
    period = p.add_mutually_exclusive_group(required=True)
    period.add_argument("--month", metavar="YYYY-MM")
    period.add_argument("--year", metavar="YYYY")
    p.add_argument("--out", default=".", help="folder for the CSV and PNG (default .)")
    p.add_argument("--db", help="relay database (default relay.db_path)")
    p.add_argument("--no-chart", action="store_true")
    for kind in ("schedule", "board"):
        p = sub.add_parser(kind, help=f"standing {kind} documents")
        ksub = p.add_subparsers(dest="action", required=True)
        pp = ksub.add_parser("push", help="validate, diff, bump rev, sign, publish retained")
        pp.add_argument("file", help=f"YAML with the {kind} document's args")
        pp.add_argument("--target", required=True, help="dev/ID, grp/G or grp/all")
        pp.add_argument("--dry-run", action="store_true", help="show the diff, publish nothing")
        pp.add_argument("--force", action="store_true", help="push even if nothing changed")
        pp.add_argument("--rev", type=int, help="the new rev (default: live rev + 1)")
        pp.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for devices' results (default 10)")
        pp.add_argument("--devices", type=int, help="for a group: results to wait for")
    sub.add_parser("version")
    release.add_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "version":
        print(f"ttcs-ctl {__version__}")
        return 0
    if args.cmd == "keygen":
        return keygen(args.out, args.kid, args.force)
    if args.cmd == "release":
        return release.main(args)
    try:
        cfg = config.load(args.config)
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
    if args.cmd == "report":
        return report(cfg, args.month, args.year, args.out, args.db, not args.no_chart)
    if args.cmd in ("schedule", "board"):
        return push_document(cfg, args.cmd, args.file, args.target, dry_run=args.dry_run,
                             force=args.force, rev=args.rev, wait=args.wait,
                             devices=args.devices)
    return watch(cfg, args.once, args.group, args.alert)


if __name__ == "__main__":
    sys.exit(main())
