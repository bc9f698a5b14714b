"""System health sampling and the ``health`` telemetry payload (SPEC §10).

:func:`collect_system` reads the machine (cheap: a few small files under /proc and /sys, one
``statvfs`` per path and, on a Raspberry Pi, one ``vcgencmd`` call with a short timeout).
:func:`build_health` merges it with the values only the agent knows into the payload published on
``P/dev/ID/health``. Both are plain functions: the core calls them from its health timer.

Payload fields (every key is always present; ``null`` means "not known / not fitted"):

- ``v``: int: payload version, 1.
- ``ts``: int: wall-clock time of the sample, ms since the Unix epoch (UTC).
- ``version``: str|null: agent version.
- ``uptime_s``: int|null: seconds since the board booted.
- ``system.cpu_temp_c``: float|null: hottest thermal zone, °C (null off a Pi / in a container).
- ``system.load``: [float, float, float]|null: load average over 1, 5, 15 minutes.
- ``system.mem_total_mb``, ``system.mem_available_mb``: int|null: RAM, MiB, from /proc/meminfo.
- ``system.throttled``: object|null: Raspberry Pi firmware flags from ``vcgencmd get_throttled``
  (null when the tool is absent or failed): ``raw`` (int, the bit field) and booleans
  ``under_voltage``, ``freq_capped``, ``throttled``, ``soft_temp_limit`` (now) and the same names
  with ``_occurred`` (at any time since boot). Under-voltage is the usual sign of a failing PSU.
- ``disk_free_mb``: {name: int|null}: free MiB for each configured path (``state``, ``cache``),
  as seen by an unprivileged user; null when the path cannot be read.
- ``clock.trusted``: bool|null: whether the wall clock is believed (SPEC §4 ``clock.trust``).
- ``clock.source``: str|null: why (``config``, ``kernel``, ``unsynchronised``, ``unknown``).
- ``mqtt.reconnects``: int|null: reconnections since the agent started.
- ``mqtt.outbox``: int|null: events stored on disk and not yet acknowledged by the broker.
- ``audio.ok``: bool|null: the audio output opened and works.
- ``audio.playing``: str|null: id of the command or schedule item airing now.
- ``audio.volume``: int|null: current volume, 0–100.
- ``audio.last_level_dbfs``: float|null: level measured by the last output verification.
- ``cabinet.amplifier_on``: bool|null: the amplifier relay is switched on.
- ``cabinet.amplifier_fault``: bool|null: the amplifier's fault input (null: not wired).
- ``cabinet.mains_present``: bool|null: mains power present (null: no sensor).
- ``cabinet.door_open``: bool|null: cabinet door open (null: no sensor).
- ``modem``: object|null: :meth:`drivers.modem.at.Modem.query` result (signal_dbm, operator, tech,
  registration, ...), null when no modem is configured or it did not answer.
- ``board.link``: bool|null: the LED board answers (null: no board).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from typing import Any

from agent.core.clock import Clock

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
VCGENCMD_TIMEOUT_S = 2.0

# bit -> name, from the Raspberry Pi documentation of `vcgencmd get_throttled`
THROTTLE_BITS: dict[int, str] = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}

# extra key -> (payload group or None for top level, payload field)
EXTRA_FIELDS: dict[str, tuple[str | None, str]] = {
    "version": (None, "version"),
    "clock_trusted": ("clock", "trusted"),
    "clock_source": ("clock", "source"),
    "mqtt_reconnects": ("mqtt", "reconnects"),
    "outbox_depth": ("mqtt", "outbox"),
    "audio_ok": ("audio", "ok"),
    "playing": ("audio", "playing"),
    "volume": ("audio", "volume"),
    "last_level_dbfs": ("audio", "last_level_dbfs"),
    "amplifier_on": ("cabinet", "amplifier_on"),
    "amplifier_fault": ("cabinet", "amplifier_fault"),
    "mains_present": ("cabinet", "mains_present"),
    "door_open": ("cabinet", "door_open"),
    "modem": (None, "modem"),
    "board_link": ("board", "link"),
}


# --- sampling ------------------------------------------------------------------------------

def collect_system(
    paths: dict[str, str],
    *,
    vcgencmd: str = "vcgencmd",
    thermal_glob: str = "/sys/class/thermal/thermal_zone*/temp",
) -> dict[str, Any]:
    """Sample the machine. Never raises: a value that cannot be read is None.

    ``paths`` maps a name to a folder, e.g. ``{"state": "/var/lib/ttcs-agent", "cache": ...}``.
    """
    return {
        "uptime_s": read_uptime_s(),
        "cpu_temp_c": read_cpu_temp_c(thermal_glob),
        "load": read_load(),
        "mem": read_meminfo(),
        "disk_free_mb": {name: disk_free_mb(path) for name, path in paths.items()},
        "throttled": read_throttled(vcgencmd),
    }


def read_uptime_s(path: str = "/proc/uptime") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(float(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def read_cpu_temp_c(pattern: str = "/sys/class/thermal/thermal_zone*/temp") -> float | None:
    """The hottest readable thermal zone in °C (the SoC on a Pi has just one)."""
    temps = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, encoding="ascii") as f:
                temps.append(int(f.read().strip()) / 1000.0)
        except (OSError, ValueError):
            continue  # some zones refuse reads (ENODATA) on laptops and in VMs
    return round(max(temps), 1) if temps else None


def read_load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int | None]:
    values: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    values[key] = int(fields[0])  # kB
    except OSError:
        pass
    total = values.get("MemTotal")
    available = values.get("MemAvailable")
    return {
        "total_mb": total // 1024 if total is not None else None,
        "available_mb": available // 1024 if available is not None else None,
    }


def disk_free_mb(path: str) -> int | None:
    """Free MiB for an unprivileged writer. A missing folder is measured at its nearest parent,
    so a cache folder not yet created still reports the filesystem it will live on."""
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe.rstrip("/"))
        if parent == probe:
            break
        probe = parent
    try:
        return shutil.disk_usage(probe or "/").free // (1024 * 1024)
    except OSError:
        return None


def read_throttled(vcgencmd: str = "vcgencmd", timeout: float = VCGENCMD_TIMEOUT_S) -> dict | None:
    """Run ``vcgencmd get_throttled`` when it exists. None off a Pi or when it fails."""
    exe = shutil.which(vcgencmd)
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "get_throttled"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("vcgencmd get_throttled failed: %s", e)
        return None
    if out.returncode != 0:
        log.warning("vcgencmd get_throttled exited %d: %s", out.returncode, out.stderr.strip())
        return None
    return parse_throttled(out.stdout)


def parse_throttled(text: str) -> dict | None:
    """Parse ``throttled=0x50005`` into ``{"raw": 327685, "under_voltage": True, ...}``."""
    _, sep, value = text.strip().partition("=")
    if not sep:
        return None
    try:
        raw = int(value.strip(), 16)
    except ValueError:
        return None
    flags: dict[str, Any] = {"raw": raw}
    for bit, name in THROTTLE_BITS.items():
        flags[name] = bool(raw & (1 << bit))
    return flags


# --- payload -------------------------------------------------------------------------------

def build_health(system: dict[str, Any], extra: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """The ``health`` payload (fields in the module docstring).

    ``system`` is a :func:`collect_system` result; ``extra`` holds the agent-side values under
    the keys of :data:`EXTRA_FIELDS` (a missing key becomes null). An unknown key raises
    ValueError: it is a programming error that the first test run shows, not a field to drop
    silently.
    """
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"unknown health extra keys: {', '.join(unknown)}")
    mem = system.get("mem") or {}
    payload: dict[str, Any] = {
        "v": PAYLOAD_VERSION,
        "ts": clock.now_ms(),
        "version": None,
        "uptime_s": system.get("uptime_s"),
        "system": {
            "cpu_temp_c": system.get("cpu_temp_c"),
            "load": system.get("load"),
            "mem_total_mb": mem.get("total_mb"),
            "mem_available_mb": mem.get("available_mb"),
            "throttled": system.get("throttled"),
        },
        "disk_free_mb": dict(system.get("disk_free_mb") or {}),
        "clock": {"trusted": None, "source": None},
        "mqtt": {"reconnects": None, "outbox": None},
        "audio": {"ok": None, "playing": None, "volume": None, "last_level_dbfs": None},
        "cabinet": {
            "amplifier_on": None,
            "amplifier_fault": None,
            "mains_present": None,
            "door_open": None,
        },
        "modem": None,
        "board": {"link": None},
    }
    for key, value in extra.items():
        group, field = EXTRA_FIELDS[key]
        (payload if group is None else payload[group])[field] = value
    return payload
