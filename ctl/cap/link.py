"""CAP's MQTT side: sign and publish the planned commands, gather the devices' acks.

Envelopes are made by :func:`ctl.send.make_envelope` and signed by :func:`agent.protocol.sign`
like every controller command; acks are read as ``send`` reads them (device data: the
topic's device id, a known stage, cleaned reasons).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import protocol
from ctl.cap.plan import Planned
from ctl.sanitize import as_int, clean
from ctl.send import Group, _parse_ack, make_envelope
from ctl.session import Session

AckRow = tuple[str, str, str, int, str | None]  # cmd_id, device, stage, ts, reason


@dataclass
class Expected:
    """Who should answer each command: devices known per target (the relay's store and
    ``relay.groups``), and whether some target's members are unknown."""

    devices: dict[str, set[str]] = field(default_factory=dict)  # cmd_id -> devices
    offline: set[str] = field(default_factory=set)  # known offline: not waited for
    unknown: list[str] = field(default_factory=list)  # group targets of unknown size

    @classmethod
    def of(cls, commands: list[Planned], cfg: dict) -> Expected:
        out = cls()
        groups: dict[str, Group] = {}
        for c in commands:
            want = out.devices.setdefault(c.cmd_id, set())
            kind, name = c.target.split("/", 1)
            if kind == "dev":
                want.add(name)
                continue
            group = groups.get(name) or groups.setdefault(name, Group.known(cfg, name))
            if group.members is None:
                if c.target not in out.unknown:
                    out.unknown.append(c.target)
                continue
            want.update(group.expected)
            out.offline.update(set(group.members) - group.expected)
        for want in out.devices.values():
            want -= out.offline
        return out


class Link:
    """A controller session: publish a message's commands, then gather their acks.

    ``ingest`` opens one for its message (``owned``: closed after it); a running ``cap watch``
    keeps one connected (``owned=False``: ``close`` leaves it open), so a message found is
    sent without a new connection, and the acks ``gather`` does not want are kept in
    ``spill`` for its :class:`AckListener`."""

    def __init__(self, session: Session, key, kid: str, prefix: str,
                 clock: Callable[[], float] = time.time, owned: bool = True) -> None:
        self.session, self.key, self.kid, self.prefix = session, key, kid, prefix
        self.clock, self.owned = clock, owned
        self.spill: list[tuple[str, bytes]] = []

    @classmethod
    def open(cls, cfg: dict, key, owned: bool = True) -> Link:
        prefix = cfg["mqtt"]["topic_prefix"]
        session = Session(cfg, [f"{prefix}/dev/+/ack"])
        session.open()
        return cls(session, key, cfg["signing"]["kid"], prefix, owned=owned)

    def close(self) -> None:
        if self.owned:
            self.session.close()

    def shut(self) -> None:
        """Close a shared link (at the end of ``cap watch``)."""
        self.session.close()

    def publish(self, commands: list[Planned]) -> None:
        infos = []
        for c in commands:
            env = make_envelope(c.target, c.type, c.args, ttl_s=None, cmd_id=c.cmd_id,
                                now_ms=int(self.clock() * 1000))
            if c.exp_ms is not None:
                env["exp"] = c.exp_ms
            env = protocol.sign(env, self.key, self.kid)
            infos.append(self.session.client.publish(f"{self.prefix}/{c.target}/cmd",
                                                     protocol.canonical(env), qos=1))
        for info in infos:
            info.wait_for_publish(10)

    def gather(self, expected: Expected, timeout: float, settle_s: float = 1.5,
               until: frozenset[str] = frozenset({"received"})) -> list[AckRow]:
        """Acks for the commands until each expected device has reached a stage in ``until``
        (or a final stage) for each command, every device heard from has too, and — with
        groups of unknown size — nothing new came for ``settle_s``; or ``timeout``."""
        ids = set(expected.devices)
        rows: list[AckRow] = []
        got: dict[tuple[str, str], set[str]] = {}
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while True:
            done = all(any(s in until or s in protocol.FINAL_STAGES for s in got.get((c, d), ()))
                       for c, devs in expected.devices.items() for d in devs)
            heard_ok = all(any(s in until or s in protocol.FINAL_STAGES for s in stages)
                           for stages in got.values())
            if done and heard_ok and (not expected.unknown
                                      or time.monotonic() - last > settle_s):
                return rows
            left = deadline - time.monotonic()
            if left <= 0:
                return rows
            try:
                topic, payload, _ = self.session.messages.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            parsed = _parse_ack(topic, payload)
            if parsed is None:
                continue
            if parsed[1].get("id") not in ids:
                if not self.owned and len(self.spill) < 100_000:
                    self.spill.append((topic, payload))
                continue
            device, ack = parsed
            stage, cmd_id = ack["stage"], ack["id"]
            stages = got.setdefault((cmd_id, device), set())
            if stage == "rejected" and ack.get("reason") == protocol.REPLAYED and stages:
                continue  # the same command through a second target: it airs once
            stages.add(stage)
            last = time.monotonic()
            reason = clean(ack["reason"], 40) if ack.get("reason") else None
            rows.append((cmd_id, device, stage, as_int(ack.get("ts")) or 0, reason))


class AckListener:
    """For ``cap watch``, which stays connected: every ack of a CAP command, recorded, so
    ``cap status`` also knows what happened after ``received`` (``failed``, ``expired``,
    ``stopped``) when no play record tells it."""

    def __init__(self, link: Link, record) -> None:
        self.link, self.record = link, record
        self._known: dict[str, bool] = {}

    def _messages(self):
        spill, self.link.spill = self.link.spill, []
        yield from spill
        while True:
            try:
                topic, payload, _ = self.link.session.messages.get_nowait()
            except queue.Empty:
                return
            yield topic, payload

    def drain(self) -> int:
        rows: list[AckRow] = []
        for topic, payload in self._messages():
            parsed = _parse_ack(topic, payload)
            if parsed is None:
                continue
            device, ack = parsed
            cmd_id = ack.get("id")
            if not isinstance(cmd_id, str) or not cmd_id.startswith("cap-"):
                continue
            if cmd_id not in self._known:
                if len(self._known) > 10_000:
                    self._known.clear()
                self._known[cmd_id] = self.record.is_cap_command(cmd_id)
            if self._known[cmd_id]:
                reason = clean(ack["reason"], 40) if ack.get("reason") else None
                rows.append((cmd_id, device, ack["stage"], as_int(ack.get("ts")) or 0, reason))
        self.record.add_acks(rows)
        return len(rows)
