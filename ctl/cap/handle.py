"""One CAP message, start to end: parse, decide, find the targets, fetch the recording, send,
gather the ``received`` acks, record it all, notify staff (docs/CAP.md). Used by ``cap
ingest`` (one message) and ``cap watch`` (each new one). Its parts are handed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctl.cap import mapping as m
from ctl.cap import plan
from ctl.cap.areas import Targets, has_geometry, known_devices, resolve
from ctl.cap.link import Expected, Link
from ctl.cap.notice import Notifier
from ctl.cap.parse import Alert, CapInvalid, parse
from ctl.cap.record import CapRecord
from ctl.cap.resources import ResourceError, audio_resource, fetch
from ctl.media import MediaStore

log = logging.getLogger(__name__)

EXIT_OK, EXIT_REFUSED, EXIT_NO_ACK, EXIT_NO_TARGET, EXIT_INVALID = 0, 1, 2, 3, 65
TEST_STATUSES = ("Test", "Exercise")


@dataclass
class Outcome:
    code: int
    lines: list[str] = field(default_factory=list)
    alert: Alert | None = None


class Handler:
    def __init__(self, cfg: dict, record: CapRecord, media: MediaStore,
                 link: Callable[[], Link], notifier: Notifier,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.record, self.media = cfg, record, media
        self.link_factory, self.notifier, self.clock = link, notifier, clock

    def handle(self, data: bytes, source: str, *, wait: bool = True,
               force: bool = False) -> Outcome:
        try:
            alert = parse(data)
        except CapInvalid as e:
            return Outcome(EXIT_INVALID, [f"{source}: {p}" for p in e.problems])
        head = (f"CAP {alert.identifier} from {alert.sender} ({alert.status} {alert.msg_type},"
                f" scope {alert.scope})")
        before = self.record.handled(alert.key)
        if before and not force:  # the same answer as the first time, nothing sent again
            code = {m.REFUSE: EXIT_REFUSED, "no_target": EXIT_NO_TARGET}.get(
                before["action"], EXIT_OK)
            return Outcome(code, [f"{head}: already handled ({before['action']}:"
                                  f" {before['why']}); nothing sent"], alert)
        now_ms = int(self.clock() * 1000)
        decision = m.decide(alert, self.cfg["cap"], now_ms)
        out = Outcome(EXIT_OK, [f"{head}: {decision.action} — {decision.why}"], alert)

        def save(action: str, why: str, **detail) -> None:
            self.record.save_alert(alert.key, now_ms=now_ms, source=source, status=alert.status,
                                   msg_type=alert.msg_type, scope=alert.scope, action=action,
                                   why=why, detail=detail, xml=data)

        if decision.action in (m.RECORD, m.REFUSE):
            save(decision.action, decision.why)
            out.code = EXIT_REFUSED if decision.action == m.REFUSE else EXIT_OK
            return out
        base = plan.base_id(alert)
        commands = self._stops(alert, base, now_ms, out) \
            if alert.msg_type in ("Cancel", "Update") else []
        if decision.action in (m.AIR, m.TEST):
            test = decision.action == m.TEST
            targets = self._targets(alert, test)
            if not any(targets):
                areas = "; ".join(a.desc for i in alert.infos for a in i.areas) or "none"
                why = f"no device in the alert's areas ({areas})"
                save("no_target", why, stopped=[c.cmd_id for c in commands])
                out.lines.append(f"not aired: {why}")
                if not commands:
                    out.code = EXIT_NO_TARGET
                    return out
            elif any(m.timing(i, self.cfg["cap"], now_ms).too_far for i in alert.infos):
                save(m.REFUSE, "onset more than 7 days ahead")
                out.lines.append("refused: onset more than 7 days ahead (devices take at most 7)")
                out.code = EXIT_REFUSED
                return out
            else:
                media = [None if test else self._recording(i, out) for i in alert.infos]
                commands += plan.airing(alert, targets, media, self.cfg, now_ms, test=test,
                                        base=base)
                for t in sorted({t for ts in targets for t in ts}):
                    why = "; ".join(dict.fromkeys(r for ts in targets
                                                  for r in ts.why.get(t, [])))
                    out.lines.append(f"  {t} ({why})")
        if not commands:
            save(decision.action, decision.why + "; nothing to send")
            out.lines.append("nothing to send")
            return out
        # the commands are recorded before they go out, so a Cancel finds them even if this
        # process dies while waiting; the message itself is marked handled once they went out
        # (a failed publish leaves it to be tried again)
        self.record.add_commands(alert.key, commands, now_ms)
        acks = self._send(commands, wait, out)
        self.record.add_acks(acks)
        save(decision.action, decision.why, commands=[c.cmd_id for c in commands],
             targets=sorted({c.target for c in commands}))
        self.notifier.sent(alert, decision, commands, acks, self.clock())
        return out

    # --- parts ---------------------------------------------------------------------------

    def _targets(self, alert: Alert, test: bool) -> list[Targets]:
        if test:
            out = []
            for _ in alert.infos:
                t = Targets()
                t.add(f"grp/{self.cfg['cap']['test_group']}", "cap.test_group")
                out.append(t)
            return out
        geometry = any(has_geometry(i.areas) for i in alert.infos)
        devices = known_devices(self.cfg) if geometry else []
        return [resolve(i.areas, self.cfg, devices) for i in alert.infos]

    def _recording(self, info, out: Outcome):
        resource = audio_resource(info)
        if resource is None:
            return None
        try:
            media = fetch(resource, self.media, timeout=self.cfg["cap"]["download_timeout_s"])
        except ResourceError as e:
            out.lines.append(f"audio resource of the {info.language} block not used ({e});"
                             " spoken instead")
            return None
        out.lines.append(f"audio resource of the {info.language} block: {media.url}")
        return media

    def _stops(self, alert: Alert, base: str, now_ms: int, out: Outcome) -> list:
        """Stops for the referenced messages' commands (those of the same kind: a test never
        stops a real alert, nor the other way round)."""
        test = alert.status in TEST_STATUSES
        previous = []
        for ref in alert.references:
            rows = [r for r in self.record.commands_of(ref.sender, ref.identifier)
                    if r["type"] != "stop"]
            kinds = {a["status"] in TEST_STATUSES
                     for a in self.record.alerts_by_identifier(ref.identifier)
                     if a["sender"] == ref.sender}
            if not rows:
                out.lines.append(f"referenced {ref.identifier}: nothing of it was sent here")
            elif kinds != {test}:
                out.lines.append(f"referenced {ref.identifier}: a {'real' if test else 'test'}"
                                 " alert; not stopped by this one")
            else:
                previous += rows
        ttl = int(self.cfg["cap"]["default_ttl_s"])
        commands = plan.stops(previous, base, now_ms, ttl)
        if commands:
            out.lines.append(f"stopping {len({r['cmd_id'] for r in previous})} command(s) of"
                             " the referenced message(s)")
        return commands

    def _send(self, commands: list, wait: bool, out: Outcome) -> list:
        link = self.link_factory()
        try:
            link.publish(commands)
            for c in commands:
                extra = f" at {c.at_ms}" if c.at_ms else ""
                out.lines.append(f"sent {c.type:<5} {c.cmd_id} -> {c.target}"
                                 f"{' ' + c.lang if c.lang else ''}{extra}")
            if not wait:
                return []
            expected = Expected.of(commands, self.cfg)
            acks = link.gather(expected, float(self.cfg["cap"]["wait_s"]))
        finally:
            link.close()
        got: dict[tuple[str, str], str] = {}
        for cmd_id, device, stage, _ts, reason in acks:
            if stage in ("received", "rejected"):
                got.setdefault((cmd_id, device), stage + (f" ({reason})" if reason else ""))
        for (cmd_id, device), stage in sorted(got.items()):
            out.lines.append(f"ack {device} {cmd_id} {stage}")
        missing = sorted((c, d) for c, devs in expected.devices.items() for d in devs
                         if not got.get((c, d), "").startswith("received"))
        for c, d in missing:
            out.lines.append(f"no received from {d} for {c} within"
                             f" {self.cfg['cap']['wait_s']:g} s ({got.get((c, d), 'no ack')})")
        if expected.offline:
            out.lines.append("offline per the relay (they get it when they reconnect, until"
                             f" exp): {', '.join(sorted(expected.offline))}")
        if expected.unknown:
            out.lines.append(f"group size unknown for {', '.join(expected.unknown)}:"
                             " counted those that answered")
        refused = any(stage.startswith("rejected") for stage in got.values())
        if missing or refused or not got:
            out.code = EXIT_NO_ACK
        return acks
