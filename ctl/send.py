"""``ttcs-ctl send``: sign a command, publish it, print the acks as they arrive. For a group,
say what it waits for (the broker cannot say how many devices listen to a group; the relay's
store may know) and, at the end, who answered and who did not."""

from __future__ import annotations

import json
import queue
import secrets
import sys
import time
from dataclasses import dataclass

from agent import protocol
from ctl.config import groups_of
from ctl.keys import signing_key
from ctl.sanitize import as_int, clean, device_id, parse_object, shown
from ctl.session import EXIT_DONE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, Session
from ctl.store import read_devices


def make_envelope(target: str, typ: str, args: dict, *, ttl_s: int | None, cmd_id: str | None,
                  now_ms: int | None = None) -> dict:
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    env = {"v": 1, "id": cmd_id or f"c-{secrets.token_hex(6)}", "type": typ, "target": target,
           "ts": now_ms, "args": args}
    if ttl_s:
        env["exp"] = now_ms + ttl_s * 1000
    return env


def send(cfg: dict, target: str, typ: str, args: dict, *, timeout: float, ttl_s: int | None,
         cmd_id: str | None, unsigned: bool, as_json: bool, devices: int | None) -> int:
    if not protocol.TARGET_RE.fullmatch(target):
        print(f"target must be dev/ID or grp/G, not {target!r}", file=sys.stderr)
        return EXIT_USAGE
    env = make_envelope(target, typ, args, ttl_s=ttl_s, cmd_id=cmd_id)
    if not unsigned:
        key = signing_key(cfg, " (or pass --unsigned)")
        if key is None:
            return EXIT_USAGE
        env = protocol.sign(env, key, cfg["signing"]["kid"])
    prefix = cfg["mqtt"]["topic_prefix"]
    ack_topic = f"{prefix}/{target}/ack" if target.startswith("dev/") else f"{prefix}/dev/+/ack"
    group = None if target.startswith("dev/") else Group.known(cfg, target[len("grp/"):])
    session = Session(cfg, [ack_topic])
    session.open()
    try:
        session.publish(f"{prefix}/{target}/cmd", protocol.canonical(env))
        if group is not None:
            print(group.waiting(target, timeout, devices), file=sys.stderr)
        return _follow_acks(session, env["id"], target, timeout, as_json, devices, group)
    finally:
        session.close()


@dataclass
class Group:
    """What the controller knows of a group's members: nothing from the broker (MQTT does not
    say who subscribes), so the relay's store (its devices) and ``relay.groups`` (who is in
    which group). ``members`` is None when that is unknown, with ``why``."""

    members: dict[str, bool | None] | None  # device -> online per the relay (None: unknown)
    why: str = ""

    @classmethod
    def known(cls, cfg: dict, name: str) -> Group:
        relay_cfg = cfg.get("relay") or {}
        groups = relay_cfg.get("groups") or {}
        if name != "all" and name not in groups:
            return cls(None, f"relay.groups has no entry for {name}")
        rows = read_devices(relay_cfg.get("db_url") or relay_cfg.get("db_path") or "")
        if rows is None:
            return cls(None, f"no relay store at {relay_cfg.get('db_path')}")
        members = {d: online for d, online in rows.items()
                   if name == "all" or name in groups_of(d, groups)}
        return cls(members) if members else cls(None, "the relay's store has no device of it")

    @property
    def expected(self) -> set[str]:
        """The members to wait for: all but those the relay knows to be offline."""
        return {d for d, online in (self.members or {}).items() if online is not False}

    def waiting(self, target: str, timeout: float, devices: int | None) -> str:
        head = f"{target}: waiting up to {timeout:g} s for acks"
        if devices is not None:
            return f"{head} from {devices} devices (--devices)"
        if self.members is None:
            return (f"{head}; how many devices listen to a group is unknown ({self.why}), so"
                    " it stops 3 s after every device that answered has finished"
                    " (--devices N stops after N)")
        offline = sorted(set(self.members) - self.expected)
        line = (f"{head} from the {len(self.expected)} devices the relay's store lists in it"
                f" ({', '.join(sorted(self.expected)) or 'none'})")
        if offline:
            line += f"; offline per the relay, not waited for: {', '.join(offline)}"
        return line + "; others may answer too"

    def summary(self, finals: dict[str, str], received: set[str]) -> str:
        answered = ", ".join(f"{d} {finals.get(d, 'no final stage')}"
                             for d in sorted(set(finals) | received)) or "none"
        lines = [f"answered: {answered}"]
        if self.members is None:
            lines.append(f"the group's size is unknown ({self.why}): devices that did not"
                         " answer cannot be listed")
            return "\n".join(lines)
        silent = sorted(self.expected - set(finals))
        offline = sorted(set(self.members) - self.expected - set(finals))
        if silent:
            lines.append(f"did not finish (online or unknown per the relay): {', '.join(silent)}")
        if offline:
            lines.append(f"offline per the relay (they get it when they reconnect, until exp):"
                         f" {', '.join(offline)}")
        return "\n".join(lines)


def _follow_acks(session: Session, cmd_id: str, target: str, timeout: float, as_json: bool,
                 devices: int | None, group: Group | None = None,
                 settle_s: float = 3.0) -> int:
    """Print acks for ``cmd_id`` until each device reached a final stage (or the timeout).

    For a group: with ``devices``, until that many finished; else, when the relay's store
    knows the group's members, as soon as those (and every other device heard from) have
    finished; else once every device heard from has finished and nothing new came for
    ``settle_s``."""
    finals: dict[str, str] = {}
    received: set[str] = set()
    deadline = time.monotonic() + timeout
    last_activity = time.monotonic()
    single = target.startswith("dev/")
    expected = group.expected if group is not None and devices is None else set()
    while time.monotonic() < deadline:
        if expected and expected <= finals.keys() and received <= finals.keys():
            break
        try:
            topic, payload, _ = session.messages.get(timeout=0.2)
        except queue.Empty:
            settled = time.monotonic() - last_activity > settle_s
            if (not single and devices is None and not expected and finals
                    and finals.keys() >= received and settled):
                break
            continue
        parsed = _parse_ack(topic, payload)
        if parsed is None or parsed[1].get("id") != cmd_id:
            continue
        device, ack = parsed
        last_activity = time.monotonic()
        stage = ack.get("stage")
        if stage == "rejected" and ack.get("reason") == protocol.REPLAYED and device in received:
            continue  # a duplicate delivery of a command this device already took
        print(_ack_json(device, ack) if as_json else _ack_line(device, ack), flush=True)
        if stage == "received":
            received.add(device)
        if stage in protocol.FINAL_STAGES:
            finals.setdefault(device, stage)
            received.add(device)
        if (single and finals) or (devices is not None and len(finals) >= devices):
            break
    if group is not None:
        print(group.summary(finals, received), file=sys.stderr)
    if not finals:
        print(f"no final ack within {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if devices is not None and len(finals) < devices:
        print(f"{len(finals)} of {devices} devices finished within {timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if not expected <= finals.keys():
        return EXIT_TIMEOUT
    return EXIT_DONE if all(s == "done" for s in finals.values()) else EXIT_FAILED


def _parse_ack(topic: str, payload: bytes) -> tuple[str, dict] | None:
    """(device, ack) from a device's ack topic, or None: the device id must be one, the
    payload a JSON object with a known ``stage`` (acks are device data: hostile input)."""
    parts = topic.split("/")
    device = device_id(parts[-2]) if len(parts) >= 2 else None
    ack = parse_object(payload)
    if device is None or ack is None or ack.get("stage") not in protocol.STAGES:
        return None
    return device, ack


def _ack_json(device: str, ack: dict) -> str:
    """The ack as a JSON line; ``device`` is the topic's, whatever the ack says."""
    return json.dumps({"device": device, **{k: v for k, v in ack.items() if k != "device"}},
                      ensure_ascii=False)


def _ack_line(device: str, ack: dict) -> str:
    """One line of plain text: the device's reason and message are cleaned (ctl/sanitize.py)."""
    line = f"{_clock(ack.get('ts'))} {device:<24} {ack['stage']:<10}"
    if ack.get("reason"):
        line += f" {shown(ack['reason'], 40)}"
    detail = ack.get("detail")
    if isinstance(detail, dict) and detail.get("message"):
        line += f": {clean(detail['message'], 200)}"
    return line


def _clock(ts) -> str:
    """HH:MM:SS of a device time, or ??:??:?? when it is none a calendar holds."""
    ms = as_int(ts)
    try:
        return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms is not None \
            else "??:??:??"
    except (OverflowError, OSError, ValueError):
        return "??:??:??"

