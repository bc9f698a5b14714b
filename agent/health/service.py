"""Health and supervision wired into the core (issue #6, SPEC §10).

The only sampler of the system: it publishes ``health`` every ``health.interval_s`` (through
:meth:`Core.publish_health`) and feeds the core's alert manager:

- cabinet inputs (door, mains, amplifier fault) polled every :data:`CABINET_POLL_S` on the
  agent's one GPIO backend (handed in by :mod:`agent.app`, which owns it), debounced by
  :class:`agent.health.cabinet.CabinetInputs`, fed to ``core.set_alert`` (``door_open``,
  ``mains_lost``, ``amplifier_fault``) when they change;
- a system sample every :data:`SYSTEM_SAMPLE_S` on a worker, fed to ``core.observe``
  (``cpu_temp``, ``disk_low``), so a fault is raised within 100 s whatever the health interval;
- the 4G modem (``modem.port``) queried every ``modem.interval_s`` on a worker, fed to
  ``core.observe("modem_dbm")`` (``modem_signal``) and to the ``modem`` health field;
- the health parts ``door_open``, ``mains_present``, ``amplifier_fault`` and ``modem``;
- ``state_dir/health.json``: the last health payload sent, for ``ttcs-agent status`` and
  ``doctor`` (rewritten at each health interval, not fsynced: it is worthless after a power cut).

Everything runs on the core thread except the blocking sampling, which runs in
``core.in_worker`` and hands its result back to the core thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from agent.core.loop import Core
from agent.health import system as health
from agent.health.cabinet import ALERTS, CabinetInputs, InputChange
from drivers import resolve
from drivers.fsutil import write_json_volatile
from drivers.gpio import GPIOBackend
from drivers.modem.base import Modem

log = logging.getLogger(__name__)

CABINET_POLL_S = 0.2
SYSTEM_SAMPLE_S = 10.0
LAST_HEALTH_FILE = "health.json"

SystemSampler = Callable[[dict[str, str]], dict[str, Any]]


def install(core: Core, cfg: dict, *, gpio: GPIOBackend | None) -> HealthService:
    service = HealthService(core, cfg, gpio=gpio)
    service.start()
    return service


def cabinet_config(cfg: dict) -> dict[str, Any]:
    """The configured ``cabinet:`` inputs. ``cabinet.amplifier_fault`` is left out when
    ``amplifier.fault_pin`` is set: the audio service watches that pin and owns the alert."""
    inputs = {name: spec for name, spec in (cfg.get("cabinet") or {}).items() if spec}
    if (cfg.get("amplifier") or {}).get("fault_pin") is not None:
        inputs.pop("amplifier_fault", None)
    return inputs


class HealthService:
    def __init__(self, core: Core, cfg: dict, *, gpio: GPIOBackend | None,
                 sample_system: SystemSampler = health.collect_system) -> None:
        self.core = core
        self.cfg = cfg
        self.sample_system = sample_system
        self.gpio = gpio  # the agent's one backend, shared with the amplifier; not ours to close
        self.cabinet = self._make_cabinet()
        self.modem = self._make_modem()
        self.system: dict[str, Any] = {}
        self.modem_status: dict[str, Any] | None = None
        self.modem_error: str | None = None
        self._sampling = False
        self._modem_busy = False

    # --- set-up ----------------------------------------------------------------------------

    def _make_cabinet(self) -> CabinetInputs | None:
        inputs = cabinet_config(self.cfg)
        if (self.cfg.get("cabinet") or {}).get("amplifier_fault") and \
                "amplifier_fault" not in inputs:
            log.warning("cabinet.amplifier_fault ignored: amplifier.fault_pin is set and the "
                        "audio service watches the amplifier fault; configure only one")
        if not inputs or self.gpio is None:
            return None
        try:
            return CabinetInputs(self.gpio, inputs, self.core.clock)
        except ValueError as e:  # e.g. two inputs on one pin: the schema cannot see that
            for problem in str(e).splitlines():
                log.error("cabinet inputs disabled: %s", problem)
            return None

    def _make_modem(self) -> Modem | None:
        mcfg = self.cfg.get("modem") or {}
        if not mcfg:
            return None
        backend = resolve("modem", mcfg["backend"])
        if backend.needs_port and not mcfg["port"]:
            return None
        return backend(mcfg["port"], baudrate=mcfg["baudrate"], timeout=mcfg["timeout_s"])

    def start(self) -> None:
        core = self.core
        if self.cabinet is not None:
            core.call_every(CABINET_POLL_S, self.poll_cabinet, first_s=0)
        core.call_every(SYSTEM_SAMPLE_S, self.sample, first_s=1)
        core.call_every(self.cfg["health"]["interval_s"], self.send_health, first_s=5)
        if self.modem is not None:
            core.call_every(self.cfg["modem"]["interval_s"], self.query_modem, first_s=2)
        core.health_parts.append(self.health_fields)
        core.stop_hooks.append(self.stop)

    def stop(self) -> None:
        if self.modem is not None:
            self.modem.close()

    # --- cabinet ---------------------------------------------------------------------------

    def poll_cabinet(self) -> None:
        assert self.cabinet is not None
        self.cabinet.poll()
        if not self.cabinet.changes:
            return
        for change in self.cabinet.changes:
            _log_change(change)
        pins = {name: spec["pin"] for name, spec in cabinet_config(self.cfg).items()}
        states = self.cabinet.alert_states()
        for name, (code, _fault_when) in ALERTS.items():
            active = states.get(code)
            if active is not None:
                self.core.set_alert(code, active, {"input": name, "pin": pins.get(name)})

    # --- system ----------------------------------------------------------------------------

    def sample(self) -> None:
        """Sample the system on a worker (vcgencmd can be slow); one sample at a time."""
        if self._sampling:
            return
        self._sampling = True
        paths = {"state": self.cfg["paths"]["state_dir"], "cache": self.cfg["paths"]["cache_dir"]}
        self.core.in_worker(self.sample_system, paths, then=self._on_system)

    def _on_system(self, result: dict[str, Any] | BaseException) -> None:
        self._sampling = False
        if isinstance(result, BaseException) or not isinstance(result, dict):
            log.warning("system sample failed: %s", result)
            return
        self.system = result
        self.core.observe("cpu_temp_c", _number(result.get("cpu_temp_c")))
        for name, free in (result.get("disk_free_mb") or {}).items():
            self.core.observe("disk_free_mb", _number(free), key=str(name))

    # --- modem -----------------------------------------------------------------------------

    def query_modem(self) -> None:
        """Ask the modem on a worker; a dead modem holds a worker for seconds, so one at a time."""
        if self.modem is None or self._modem_busy:
            return
        self._modem_busy = True
        self.core.in_worker(self.modem.query, then=self._on_modem)

    def _modem_name(self) -> str:
        mcfg = self.cfg["modem"]
        return f"on {mcfg['port']}" if mcfg.get("port") else f"({mcfg.get('backend', 'sim')})"

    def _on_modem(self, result: dict[str, Any] | BaseException) -> None:
        self._modem_busy = False
        if isinstance(result, BaseException) or not isinstance(result, dict):
            if self.modem_error is None:
                log.warning("modem %s: %s", self._modem_name(), result)
            self.modem_status, self.modem_error = None, str(result)
            return
        if self.modem_error is not None:
            log.info("modem %s answers again", self._modem_name())
        self.modem_status, self.modem_error = result, None
        self.core.observe("modem_dbm", _number(result.get("signal_dbm")))

    # --- health ----------------------------------------------------------------------------

    def health_fields(self) -> dict[str, Any]:
        """This component's keys of :data:`agent.health.system.EXTRA_FIELDS`."""
        out: dict[str, Any] = {}
        if self.cabinet is not None:
            fields = self.cabinet.health_fields()
            configured = cabinet_config(self.cfg)
            out["door_open"] = fields["door_open"]
            out["mains_present"] = fields["mains_present"]
            if "amplifier_fault" in configured:
                out["amplifier_fault"] = fields["amplifier_fault"]
        if self.modem is not None:
            out["modem"] = self.modem_status
        return out

    def last_health(self) -> dict[str, Any]:
        """The health payload as of now, from the last system sample."""
        return health.build_health(self.system, self.core.health_extra(), self.core.clock)

    def send_health(self) -> None:
        """Publish ``health`` from the last system sample and keep a copy for ``status``."""
        body = self.core.publish_health(self.last_health())
        self.write_last_health(body)

    def write_last_health(self, body: dict[str, Any]) -> None:
        path = os.path.join(self.cfg["paths"]["state_dir"], LAST_HEALTH_FILE)
        if self.modem_error is not None:
            body = {**body, "modem_error": self.modem_error}
        try:
            write_json_volatile(path, body)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)


def _log_change(change: InputChange) -> None:
    if change.previous is None and change.value is not None:
        log.info("cabinet input %s: %s", change.name, change.value)
    elif change.value is None:
        log.warning("cabinet input %s: unreadable", change.name)
    else:
        log.info("cabinet input %s: %s -> %s", change.name, change.previous, change.value)


def _number(value: Any) -> float | None:
    """A finite number or None: a sampler bug must not reach the alert thresholds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if value == value and abs(value) != float("inf") else None
