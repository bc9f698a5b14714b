"""The ``update`` command on the device (docs/UPDATE.md).

``received`` → ``queued`` (until nothing of priority or emergency airs, inside
``update.window``) → ``started`` (download with resume, space and checksum, offline install
beside the running venv, the new version's ``check-config``) → switch → exit for systemd to
start the new version. The new version commits after ``update.probation_s`` with its core
connected and acks ``done``; if it never gets there the boot guard switches back and the old
version acks ``failed``/``rolled_back``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from agent import args as a
from agent.args import Obj, problems
from agent.audio.download import Downloader, Limits
from agent.audio.hosts import HostRules, MediaError, redact
from agent.core.inbound import FuncHandler
from agent.protocol import Envelope, Priority
from agent.update import install as installer
from agent.update.install import UpdateError, check_space
from agent.update.layout import Layout

log = logging.getLogger(__name__)

ARGS = Obj(required=("version", "url", "sha256"), fields={
    "version": a.Pattern(regex=r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}",
                         what="a version such as 0.2.0"),
    "url": a.MEDIA_URL, "sha256": a.SHA256, "size": a.Int(lo=1, hi=2**40)})
ROLLED_BACK, BUSY = "rolled_back", "update_in_progress"
DEFAULT_SIZE = 50 * 2**20  # a bundle's size when the command does not say
VENV_FACTOR = 3  # an installed venv takes about this many times its bundle
RETRY_S = 1.0
TICK_S = 0.5


def in_window(window: str | None, now: datetime) -> bool:
    """``HH:MM-HH:MM`` local time (may span midnight); None: always."""
    if not window:
        return True
    start, end = window.split("-")
    hm = now.strftime("%H:%M")
    return start <= hm < end if start <= end else (hm >= start or hm < end)


class UpdateService:
    def __init__(self, core: Any, cfg: dict, *, audio: Any) -> None:
        self.core = core
        self.cfg = cfg
        self.audio = audio
        self.ucfg = cfg["update"]
        self.layout = Layout(self.ucfg["prefix"])
        self.pending: Envelope | None = None
        self.phase: str | None = None
        self._probation: dict | None = None  # the record, while this version is on probation
        self._hold_since: float | None = None
        self._hold_reconnects = 0
        self._ever_connected = False
        self._started = core.clock.monotonic()
        self.jobs = installer.Jobs()  # the install's commands, killed when the agent stops
        m = cfg["media"]
        self.downloader = Downloader(
            Limits(timeout_s=3600.0, read_timeout_s=m["read_timeout_s"],
                   min_bytes_per_s=m["min_bytes_per_s"], slow_grace_s=m["slow_grace_s"],
                   retries=m["retries"], backoff_s=m["backoff_s"], max_bytes=2**34),
            hosts=lambda: HostRules(cfg["security"]["media_hosts"]), clock=core.clock)

    def start(self) -> None:
        self.core.register_command("update", FuncHandler(self._cmd_update,
                                                         lambda args: problems(ARGS, args)))
        self.core.add_state("update", self.snapshot)
        self.core.stop_hooks.append(self.downloader.close)
        self.core.stop_hooks.append(self.jobs.stop)
        self.core.call_later(0, self._after_start)

    # --- after a restart ---------------------------------------------------------------

    def _after_start(self) -> None:
        rec, running = self.layout.read(), self.layout.running()
        if not rec or running is None:
            return
        if rec.get("state") == "probation" and rec.get("to") == running:
            log.info("update %s: on probation for %s s", rec.get("version"),
                     rec.get("probation_s"))
            self._probation = rec
            self.core.call_every(TICK_S, self._probation_tick)
        elif rec.get("state") == "rollback" and rec.get("to") == running:
            # Gave up last time, yet started again here: the boot guard did not run (a unit
            # without its ExecStartPre=). Switch back ourselves and let the old version report.
            log.error("update %s: the boot guard did not roll back; switching to %s",
                      rec.get("version"), rec.get("from"))
            self.layout.switch(rec["from"])
            self.layout.write({**rec, "state": "rolled_back"})
            self.core.request_stop()
        elif rec.get("state") == "rolled_back" and rec.get("from") == running \
                and not rec.get("reported"):
            detail = {"version": rec.get("version"), "why": rec.get("why"),
                      "starts": rec.get("starts"), "running": running}
            log.error("update to %s was rolled back: %s", rec.get("version"), rec.get("why"))
            self.core.ack(rec.get("id"), "failed", ROLLED_BACK, detail)
            self._event("rolled_back", rec, why=rec.get("why"))
            self.layout.write({**rec, "reported": True})
            self.core.mark_state_dirty()

    def _probation_tick(self) -> None:
        rec = self._probation
        if rec is None:
            return
        now = self.core.clock.monotonic()
        probation = rec["probation_s"]
        link = self.core.link
        if link.connected:
            self._ever_connected = True
            if self._hold_since is None or link.reconnects != self._hold_reconnects:
                # (again) connected: a break between two ticks restarts the hold too
                self._hold_since, self._hold_reconnects = now, link.reconnects
            if now - self._hold_since >= probation:
                self._commit(rec)
                return
        else:
            self._hold_since = None
        if not self._ever_connected and now - self._started >= probation:
            self._give_up(rec, f"core not connected to the broker within {probation} s")
        elif now - self._started >= 3 * probation:
            self._give_up(rec, f"core did not hold its broker link for {probation} s within "
                          f"{3 * probation} s")

    def _commit(self, rec: dict) -> None:
        self._probation = None
        rec = {**rec, "state": "committed", "committed_ms": self.core.clock.now_ms()}
        self.layout.write(rec)
        removed = self.layout.prune(self.ucfg["keep"], rec.get("from"))
        log.info("update %s committed (removed old versions: %s)", rec.get("version"),
                 ", ".join(removed) or "none")
        self.core.ack(rec.get("id"), "done", detail={"version": rec.get("version"),
                                                     "from": rec.get("from")})
        self._event("committed", rec)
        self.core.mark_state_dirty()

    def _give_up(self, rec: dict, why: str) -> None:
        self._probation = None
        log.error("update %s: %s; asking the boot guard to roll back", rec.get("version"), why)
        self.layout.write({**rec, "state": "rollback", "why": why})
        self.core.request_stop()

    # --- the command -------------------------------------------------------------------

    def _cmd_update(self, env: Envelope) -> None:
        running = self.layout.running()
        if self.pending is not None or self._probation is not None:
            self.core.ack(env.id, "failed", BUSY, {"message": "an update is in progress"})
            return
        if running is None:
            self.core.ack(env.id, "failed", "install", {
                "message": f"this agent does not run from {self.layout.venvs}"})
            return
        if running == f"venvs/{env.args['version']}":
            self.core.ack(env.id, "done", detail={"version": env.args["version"],
                                                  "already": True})
            return
        try:
            HostRules(self.cfg["security"]["media_hosts"]).check_url(env.args["url"])
        except MediaError as e:
            self.core.ack(env.id, "failed", e.reason, {"message": e.message})
            return
        self.pending, self.phase = env, "queued"
        self.core.ack(env.id, "queued", detail={"version": env.args["version"]})
        self.core.mark_state_dirty()
        self._try_begin()

    def quiet(self) -> bool:
        """Nothing of priority or emergency airs or waits."""
        urgent = self.audio.most_urgent()
        return urgent is None or urgent == Priority.NORMAL

    def _in_window(self) -> bool:
        if self.ucfg["window"] and not self.core.trust.trusted():
            return False  # no RTC: before NTP the time of day is not known
        tz = ZoneInfo(self.cfg["device"]["timezone"])
        return in_window(self.ucfg["window"], datetime.fromtimestamp(
            self.core.clock.now_ms() / 1000, tz))

    def _try_begin(self) -> None:
        env = self.pending
        if env is None or self.phase != "queued":
            return
        if not (self.quiet() and self._in_window()):
            self.core.call_later(RETRY_S, self._try_begin)
            return
        size = env.args.get("size", DEFAULT_SIZE)
        try:
            check_space(self.layout.prefix, size * (1 + VENV_FACTOR)
                        + self.ucfg["margin_mb"] * 2**20)
        except UpdateError as e:
            self._finish_failed(e.reason, e.message, e.detail)
            return
        self.phase = "downloading"
        self.core.ack(env.id, "started", detail={"version": env.args["version"],
                                                 "url": redact(env.args["url"])})
        self.core.mark_state_dirty()
        self.core.in_worker(self._fetch_and_install, dict(env.args), then=self._installed)

    def _fetch_and_install(self, args: dict) -> str:
        dest = self.layout.downloads / f"{args['version']}.tar"
        dest.parent.mkdir(parents=True, exist_ok=True)
        for other in dest.parent.iterdir():  # a part left by an abandoned update
            if other != dest:
                other.unlink()
        # A failed download keeps what arrived: the same update sent again resumes it.
        self.downloader.download(args["url"], args["sha256"].lower(), dest)
        self.core.post(self._set_phase, "installing")
        try:
            return installer.install(self.layout, dest, version=args["version"],
                                     config_path=self.cfg["_path"], like=self.layout.running(),
                                     jobs=self.jobs)
        finally:
            dest.unlink(missing_ok=True)

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.core.mark_state_dirty()

    def _installed(self, result: str | BaseException) -> None:
        env = self.pending
        if env is None:
            return
        if isinstance(result, (MediaError, UpdateError)):
            self._finish_failed(result.reason, result.message, getattr(result, "detail", None))
            return
        if isinstance(result, BaseException):
            self._finish_failed("install", f"{type(result).__name__}: {result}")
            return
        self._set_phase("ready")
        self._switch_when_quiet(result)

    def _switch_when_quiet(self, target: str) -> None:
        """The install took a while: restart only once nothing of priority or emergency
        airs or waits (again), so the switch never cuts one off."""
        env = self.pending
        if env is None:
            return
        if not self.quiet():
            self.core.call_later(RETRY_S, self._switch_when_quiet, target)
            return
        result = target
        rec = {"state": "probation", "id": env.id, "version": env.args["version"],
               "from": self.layout.running(), "to": result, "starts": 0,
               "max_failed_starts": self.ucfg["max_failed_starts"],
               "probation_s": self.ucfg["probation_s"], "switched_ms": self.core.clock.now_ms()}
        self.layout.write(rec)
        self.layout.switch(result)
        log.warning("update: switched to %s; restarting", result)
        # Not an interrupted command: the new version answers it (or the old one after a
        # rollback).
        self.core.not_interrupted(env.id)
        self._event("switched", rec)
        self.core.request_stop()

    def _finish_failed(self, reason: str, message: str, detail: dict | None = None) -> None:
        env, self.pending, self.phase = self.pending, None, None
        if env is None:
            return
        log.error("update to %s failed (%s): %s", env.args["version"], reason, message)
        self.core.ack(env.id, "failed", reason, {"message": message, **(detail or {})})
        self.core.mark_state_dirty()

    def _event(self, result: str, rec: dict, **extra: Any) -> None:
        self.core.emit_event({"type": "update", "result": result, "id": rec.get("id"),
                              "version": rec.get("version"), "from": rec.get("from"),
                              "to": rec.get("to"), **extra})

    # --- state -------------------------------------------------------------------------

    def snapshot(self) -> dict:
        env = self.pending
        return self.layout.describe(None if env is None else {
            "id": env.id, "version": env.args["version"], "phase": self.phase})


def install(core: Any, cfg: dict, *, audio: Any) -> UpdateService:
    svc = UpdateService(core, cfg, audio=audio)
    svc.start()
    return svc

