"""Alert state: debounce, hysteresis and flapping suppression for the ``alert`` events (SPEC §10).

The caller reports conditions; :class:`AlertManager` decides when they become published alerts.

- Boolean conditions (``door_open``, ``mains_lost``, ``amplifier_fault``, ``board_link``,
  ``audio_fault``, ``silent_output``, ``clock_untrusted``, ``media_unavailable`` …) come in
  through :meth:`AlertManager.set`; ``active=True`` means "the fault is present". ``key`` tells
  several instances of one code apart (``media_unavailable`` per media item).
- Numeric metrics come in through :meth:`AlertManager.observe` and become conditions through a
  threshold with hysteresis: ``cpu_temp_c`` → ``cpu_temp``, ``disk_free_mb`` (key: the path
  name) → ``disk_low``, ``modem_dbm`` → ``modem_signal``. ``None`` (unknown) changes nothing.

A condition must be present for ``raise_after_s`` before it is raised and be gone for
``clear_after_s`` before it is cleared. Presence is added up across gaps shorter than
``raise_after_s``, so a chattering input (1 s on, 1 s off) is raised like a steady one, while
isolated blips are not. ``raise_after_s`` is capped at
:data:`MAX_RAISE_AFTER_S` so that, with the caller ticking at :meth:`next_deadline`, a fault is
raised well within the 100 s of EN 54-16 even when it is sampled only every 30 s.

Flapping: each instance may publish at most ``flap_max`` transitions in any ``flap_window_s``.
Raising is never held back (a fault is always reported); instead, a clear that would leave no room
for the next raise is withheld and the instance is marked flapping. A flapping instance stays
raised until its condition has been stably absent for ``flap_clear_after_s`` (and the window
allows the clear). So an input bouncing all day produces a handful of events, not hundreds, and
the alert stays raised, which is the truth: the input is faulty.

Everything is driven by an injected :class:`~agent.core.clock.Clock`; no threads, no timers.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.clock import Clock

log = logging.getLogger(__name__)

KNOWN_CODES = (
    "audio_fault", "silent_output", "amplifier_fault", "board_link", "disk_low", "cpu_temp",
    "mains_lost", "door_open", "clock_untrusted", "media_unavailable", "modem_signal",
)
MAX_RAISE_AFTER_S = 60.0
MAX_CLEAR_AFTER_S = 3600.0
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class Timing:
    raise_after_s: float
    clear_after_s: float


# Codes whose natural behaviour differs from the global default: NTP usually needs tens of
# seconds after boot, radio signal and temperature wander around their thresholds.
DEFAULT_CODE_TIMINGS: dict[str, Timing] = {
    "clock_untrusted": Timing(raise_after_s=60.0, clear_after_s=0.0),
    "modem_signal": Timing(raise_after_s=60.0, clear_after_s=120.0),
    "cpu_temp": Timing(raise_after_s=10.0, clear_after_s=60.0),
}


@dataclass(frozen=True)
class Threshold:
    """Hysteresis on a metric: raise at ``raise_at``, clear only once past ``clear_at``."""

    code: str
    raise_at: float
    clear_at: float
    above: bool  # True: the fault is a high value (temperature); False: a low one (disk, signal)

    def active(self, value: float, currently: bool) -> bool:
        limit = self.clear_at if currently else self.raise_at
        if self.above:
            return value >= limit
        return value < limit


@dataclass(frozen=True)
class AlertConfig:
    raise_after_s: float = 5.0
    clear_after_s: float = 30.0
    flap_max: int = 4
    flap_window_s: float = 600.0
    flap_clear_after_s: float = 600.0
    cpu_temp_raise_c: float = 80.0
    cpu_temp_clear_c: float = 75.0
    disk_min_free_mb: float = 200.0
    disk_clear_margin: float = 0.10
    modem_raise_dbm: float = -105.0
    modem_clear_dbm: float = -99.0
    codes: Mapping[str, Timing] = field(default_factory=dict)

    def timing(self, code: str) -> Timing:
        if code in self.codes:
            return self.codes[code]
        return DEFAULT_CODE_TIMINGS.get(code, Timing(self.raise_after_s, self.clear_after_s))

    def thresholds(self) -> dict[str, Threshold]:
        """metric name -> threshold rule."""
        return {
            "cpu_temp_c": Threshold("cpu_temp", self.cpu_temp_raise_c, self.cpu_temp_clear_c, True),
            "disk_free_mb": Threshold(
                "disk_low", self.disk_min_free_mb,
                self.disk_min_free_mb * (1 + self.disk_clear_margin), False,
            ),
            "modem_dbm": Threshold(
                "modem_signal", self.modem_raise_dbm, self.modem_clear_dbm, False,
            ),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AlertConfig:
        """Build from the agent config (its ``alerts:`` and ``health:`` sections).

        Raises ValueError listing every problem, one ``key.path: must be …`` per line.
        """
        parser = _Parser()
        alerts = parser.section(config, "alerts")
        health = parser.section(config, "health")
        cpu = parser.section(alerts, "cpu_temp", "alerts.")
        modem = parser.section(alerts, "modem_signal", "alerts.")
        disk = parser.section(alerts, "disk_low", "alerts.")
        parser.unknown(alerts, "alerts", {"raise_after_s", "clear_after_s", "flap_max",
                                          "flap_window_s", "flap_clear_after_s", "cpu_temp",
                                          "modem_signal", "disk_low", "codes"})
        parser.unknown(cpu, "alerts.cpu_temp", {"raise_c", "clear_c"})
        parser.unknown(modem, "alerts.modem_signal", {"raise_dbm", "clear_dbm"})
        parser.unknown(disk, "alerts.disk_low", {"clear_margin"})
        d = cls()
        raise_after = parser.num(alerts, "alerts.raise_after_s", d.raise_after_s,
                                 0, MAX_RAISE_AFTER_S)
        clear_after = parser.num(alerts, "alerts.clear_after_s", d.clear_after_s,
                                 0, MAX_CLEAR_AFTER_S)
        cfg = cls(
            raise_after_s=raise_after,
            clear_after_s=clear_after,
            flap_max=int(parser.num(alerts, "alerts.flap_max", d.flap_max, 2, 100, integer=True)),
            flap_window_s=parser.num(alerts, "alerts.flap_window_s", d.flap_window_s, 1, 86400),
            flap_clear_after_s=parser.num(alerts, "alerts.flap_clear_after_s",
                                          d.flap_clear_after_s, 0, 86400),
            cpu_temp_raise_c=parser.num(cpu, "alerts.cpu_temp.raise_c", d.cpu_temp_raise_c,
                                        30, 125),
            cpu_temp_clear_c=parser.num(cpu, "alerts.cpu_temp.clear_c", d.cpu_temp_clear_c,
                                        20, 125),
            disk_min_free_mb=parser.num(health, "health.disk_min_free_mb", d.disk_min_free_mb,
                                        0, 10**7),
            disk_clear_margin=parser.num(disk, "alerts.disk_low.clear_margin", d.disk_clear_margin,
                                         0, 1),
            modem_raise_dbm=parser.num(modem, "alerts.modem_signal.raise_dbm", d.modem_raise_dbm,
                                       -113, -51),
            modem_clear_dbm=parser.num(modem, "alerts.modem_signal.clear_dbm", d.modem_clear_dbm,
                                       -113, -51),
            codes=parser.codes(alerts, Timing(raise_after, clear_after)),
        )
        if cfg.cpu_temp_clear_c >= cfg.cpu_temp_raise_c:
            parser.errors.append("alerts.cpu_temp.clear_c: must be below alerts.cpu_temp.raise_c "
                                 f"({cfg.cpu_temp_raise_c:g})")
        if cfg.modem_clear_dbm < cfg.modem_raise_dbm:
            parser.errors.append(
                "alerts.modem_signal.clear_dbm: must be at or above alerts.modem_signal.raise_dbm "
                f"({cfg.modem_raise_dbm:g})")
        if cfg.flap_clear_after_s < cfg.clear_after_s:
            parser.errors.append("alerts.flap_clear_after_s: must be at least "
                                 f"alerts.clear_after_s ({cfg.clear_after_s:g})")
        if parser.errors:
            raise ValueError("\n".join(parser.errors))
        return cfg


class _Parser:
    """Collects every config problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def section(self, parent: Mapping, key: str, prefix: str = "") -> Mapping:
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.errors.append(f"{prefix}{key}: must be a mapping")
            return {}
        return value

    def unknown(self, section: Mapping, path: str, allowed: set[str]) -> None:
        for key in section:
            if key not in allowed:
                expected = ", ".join(sorted(allowed))
                self.errors.append(f"{path}.{key}: unknown key (expected one of {expected})")

    def num(self, section: Mapping, path: str, default: float, lo: float, hi: float,
            integer: bool = False) -> float:
        value = section.get(path.rsplit(".", 1)[1], default)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        valid = ok_type and not isinstance(value, bool) and math.isfinite(value)
        if not valid or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            self.errors.append(f"{path}: must be {kind} from {lo:g} to {hi:g}, not {value!r}")
            return default
        return value

    def codes(self, alerts: Mapping, default: Timing) -> dict[str, Timing]:
        codes = self.section(alerts, "codes", "alerts.")
        out: dict[str, Timing] = {}
        for code, spec in codes.items():
            path = f"alerts.codes.{code}"
            if not isinstance(code, str) or not _CODE_RE.match(code):
                self.errors.append(f"{path}: not an alert code")
                continue
            spec = self.section(codes, code, "alerts.codes.")
            self.unknown(spec, path, {"raise_after_s", "clear_after_s"})
            base = DEFAULT_CODE_TIMINGS.get(code, default)
            out[code] = Timing(
                self.num(spec, f"{path}.raise_after_s", base.raise_after_s, 0, MAX_RAISE_AFTER_S),
                self.num(spec, f"{path}.clear_after_s", base.clear_after_s, 0, MAX_CLEAR_AFTER_S),
            )
        return out


@dataclass(frozen=True)
class AlertEvent:
    """A transition to publish. ``since``: wall ms when the condition began (raised) or ended
    (cleared) — the fault's own time, not the end of the debounce."""

    state: str  # "raised" | "cleared"
    code: str
    key: str | None
    detail: dict[str, Any]
    since: int

    def payload(self) -> dict[str, Any]:
        """The ``event`` body; the event outbox adds ``v``, ``seq``, ``ts``, ``historical``."""
        body: dict[str, Any] = {"type": "alert", "state": self.state, "code": self.code}
        if self.key is not None:
            body["key"] = self.key
        body["detail"] = dict(self.detail)
        body["since"] = self.since
        return body


@dataclass
class _Instance:
    code: str
    key: str | None
    flap_max: int
    active: bool = False          # the condition as last reported
    changed_mono: float = 0.0     # when ``active`` last changed
    changed_ms: int = 0
    # debounce episode: active time accumulated before the current activation, and when the
    # episode began (None: no episode). Gaps shorter than raise_after_s do not end an episode.
    active_s: float = 0.0
    episode_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    raised: bool = False
    raised_since_ms: int = 0
    flapping: bool = False
    transitions: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        # only the last flap_max - 1 transitions decide whether a clear leaves room for a raise
        self.transitions = deque(maxlen=self.flap_max)


class AlertManager:
    """Turns reported conditions into ``alert`` events. Not thread-safe: one caller thread."""

    def __init__(self, clock: Clock,
                 rules_config: AlertConfig | Mapping[str, Any] | None = None) -> None:
        if rules_config is None:
            rules_config = AlertConfig()
        elif not isinstance(rules_config, AlertConfig):
            rules_config = AlertConfig.from_config(rules_config)
        self.config = rules_config
        self._clock = clock
        self._thresholds = rules_config.thresholds()
        self._instances: dict[tuple[str, str | None], _Instance] = {}

    def reconfigure(self, rules_config: AlertConfig) -> None:
        """New rules (a config reload): what is raised stays raised; the new timings and
        thresholds decide from the next report and the next tick on."""
        self.config = rules_config
        self._thresholds = rules_config.thresholds()
        for inst in self._instances.values():
            inst.flap_max = rules_config.flap_max
            inst.transitions = deque(inst.transitions, maxlen=rules_config.flap_max)

    # --- input ---------------------------------------------------------------------------

    def set(self, code: str, active: bool, detail: Mapping[str, Any] | None = None,
            key: str | None = None) -> None:
        """Report the current condition of ``code`` (idempotent: call it as often as you like)."""
        if not _CODE_RE.match(code):
            raise ValueError(f"bad alert code {code!r}")
        inst = self._instances.get((code, key))
        if inst is None:
            if not active:
                return  # nothing raised, nothing to remember
            inst = _Instance(code, key, self.config.flap_max)
            self._instances[(code, key)] = inst
        if inst.active != bool(active):
            self._change(inst, bool(active))
        if detail is not None:
            inst.detail = dict(detail)

    def observe(self, metric: str, value: float | None, key: str | None = None) -> None:
        """Feed a metric: ``cpu_temp_c``, ``disk_free_mb`` (key: the path name), ``modem_dbm``."""
        rule = self._thresholds.get(metric)
        if rule is None:
            raise ValueError(f"no alert rule for metric {metric!r}")
        if value is None:
            return
        inst = self._instances.get((rule.code, key))
        active = rule.active(value, inst.active if inst else False)
        detail = {"metric": metric, "value": value, "threshold": rule.raise_at}
        if key is not None:
            detail["path"] = key
        self.set(rule.code, active, detail, key)

    def observe_system(self, system: Mapping[str, Any]) -> None:
        """Feed a :func:`agent.health.system.collect_system` sample (temperature and disk space)."""
        self.observe("cpu_temp_c", system.get("cpu_temp_c"))
        for name, free in (system.get("disk_free_mb") or {}).items():
            self.observe("disk_free_mb", free, key=name)

    # --- timing --------------------------------------------------------------------------

    def tick(self) -> list[AlertEvent]:
        """Apply due transitions; return the events to publish, oldest condition first."""
        now = self._clock.monotonic()
        events = [ev for inst in list(self._instances.values()) if (ev := self._step(inst, now))]
        self._forget_idle(now)
        return sorted(events, key=lambda e: e.since)

    def next_deadline(self) -> float | None:
        """Monotonic time of the next possible transition (None: nothing pending)."""
        due = [d for inst in self._instances.values() if (d := self._due(inst)) is not None]
        return min(due, default=None)

    # --- output --------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """Raised alerts for the ``state`` snapshot."""
        out = []
        for inst in sorted(self._instances.values(), key=lambda i: (i.code, i.key or "")):
            if not inst.raised:
                continue
            entry: dict[str, Any] = {"code": inst.code}
            if inst.key is not None:
                entry["key"] = inst.key
            entry["since"] = inst.raised_since_ms
            entry["detail"] = dict(inst.detail)
            if inst.flapping:
                entry["flapping"] = True
            out.append(entry)
        return out

    # --- internals -----------------------------------------------------------------------

    def _change(self, inst: _Instance, active: bool) -> None:
        now = self._clock.monotonic()
        raise_after = self.config.timing(inst.code).raise_after_s
        if not inst.raised:
            if active and (inst.episode_ms is None or now - inst.changed_mono >= raise_after):
                inst.active_s, inst.episode_ms = 0.0, self._clock.now_ms()
            elif not active:
                inst.active_s += now - inst.changed_mono
        inst.active = active
        inst.changed_mono = now
        inst.changed_ms = self._clock.now_ms()

    def _step(self, inst: _Instance, now: float) -> AlertEvent | None:
        timing = self.config.timing(inst.code)
        if inst.active and not inst.raised:
            if now >= self._raise_due(inst):
                return self._transition(inst, "raised", now)
        elif not inst.active and inst.raised:
            if now < inst.changed_mono + timing.clear_after_s:
                return None
            if not inst.flapping and now < self._window_opens_at(inst):
                inst.flapping = True
                log.info("alert %s%s is flapping; holding it raised", inst.code,
                         f"[{inst.key}]" if inst.key else "")
            if now >= self._clear_due(inst):
                inst.flapping = False
                return self._transition(inst, "cleared", now)
        return None

    def _due(self, inst: _Instance) -> float | None:
        if inst.active and not inst.raised:
            return self._raise_due(inst)
        if not inst.active and inst.raised:
            return self._clear_due(inst)
        return None

    def _raise_due(self, inst: _Instance) -> float:
        """A chattering input adds up its active time, so it is reported like a steady one."""
        return inst.changed_mono + self.config.timing(inst.code).raise_after_s - inst.active_s

    def _clear_due(self, inst: _Instance) -> float:
        if not inst.flapping:
            return inst.changed_mono + self.config.timing(inst.code).clear_after_s
        return max(inst.changed_mono + self.config.flap_clear_after_s, self._window_opens_at(inst))

    def _window_opens_at(self, inst: _Instance) -> float:
        """When a clear leaves room for one more raise within ``flap_max`` per window.

        A clear plus the next raise fit while at most ``flap_max - 2`` transitions are inside
        the window, i.e. once the ``flap_max - 1``-th most recent one has left it.
        """
        nth = self.config.flap_max - 1
        if len(inst.transitions) < nth:
            return -math.inf
        return inst.transitions[-nth] + self.config.flap_window_s

    def _transition(self, inst: _Instance, state: str, now: float) -> AlertEvent:
        inst.transitions.append(now)
        inst.raised = state == "raised"
        since = inst.changed_ms
        if inst.raised:
            since = inst.raised_since_ms = inst.episode_ms if inst.episode_ms is not None else since
        inst.active_s, inst.episode_ms = 0.0, None
        log.info("alert %s %s%s", state, inst.code, f"[{inst.key}]" if inst.key else "")
        return AlertEvent(state, inst.code, inst.key, dict(inst.detail), since)

    def _forget_idle(self, now: float) -> None:
        """Drop instances that are quiet and out of the flap window (keys come and go)."""
        horizon = now - self.config.flap_window_s
        for k, inst in list(self._instances.items()):
            if inst.active or inst.raised:
                continue
            episode_over = now - inst.changed_mono >= self.config.timing(inst.code).raise_after_s
            if episode_over and (not inst.transitions or inst.transitions[-1] <= horizon):
                del self._instances[k]
