"""Configuration: YAML with defaults, typed validation, every problem with its file position.

Validation returns all problems at once, each as ``FILE:LINE:COL: key.path: what is wrong``
(unknown keys included, with a "did you mean" for typos), so a technician editing over SSH sees
every mistake in one go. The schema is declared once below; ``config/agent.example.yaml``
documents each key.
"""

from __future__ import annotations

import base64
import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import drivers
from agent import yamlfile
from agent.yamlfile import MAX_FILE_BYTES, join

DEFAULT_CONFIG_PATH = "/etc/ttcs-agent/agent.yaml"

ID_RE = r"^[a-z0-9][a-z0-9-]{0,63}$"
TOPIC_SEGMENT_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
REQUIRED = object()


class ConfigError(Exception):
    """The config cannot be used; ``problems`` holds every formatted problem line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- schema ------------------------------------------------------------------------------

@dataclass
class Field:
    default: Any = REQUIRED
    doc: str = ""

    def check(self, value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
        return value


@dataclass
class Str(Field):
    pattern: str | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    max_len: int = 4096

    def check(self, value, path, errors):
        if value is None and self.nullable:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and self.choices:
            value = str(value)  # e.g. `protocol: 5`
        if not isinstance(value, str):
            errors.append((path, f"must be a string, not {type_name(value)}"))
            return value
        if self.choices and value not in self.choices:
            hint = did_you_mean(value, self.choices)
            errors.append((path, f"must be one of {', '.join(self.choices)}, not {value!r}{hint}"))
        elif self.pattern and not re.match(self.pattern, value):
            errors.append((path, f"{value!r} does not match {self.pattern}"))
        elif len(value) > self.max_len:
            errors.append((path, f"must be at most {self.max_len} characters"))
        return value


@dataclass
class Num(Field):
    min: float | None = None
    max: float | None = None
    integer: bool = True
    nullable: bool = False

    def check(self, value, path, errors):
        if value is None and self.nullable:
            return None
        ok = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            kind = "an integer" if self.integer else "a number"
            errors.append((path, f"must be {kind}, not {type_name(value)}"))
            return value
        if self.min is not None and value < self.min:
            errors.append((path, f"must be at least {self.min:g}, not {value}"))
        elif self.max is not None and value > self.max:
            errors.append((path, f"must be at most {self.max:g}, not {value}"))
        return value


@dataclass
class Bool(Field):
    def check(self, value, path, errors):
        if not isinstance(value, bool):
            errors.append((path, f"must be true or false, not {type_name(value)}"))
        return value


@dataclass
class List(Field):
    item: Field = field(default_factory=Field)
    max_items: int = 1000

    def check(self, value, path, errors):
        if not isinstance(value, list):
            errors.append((path, f"must be a list, not {type_name(value)}"))
            return value
        if len(value) > self.max_items:
            errors.append((path, f"must have at most {self.max_items} items"))
        return [self.item.check(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]


@dataclass
class Map(Field):
    """A mapping with free keys (matching ``key_pattern``) and values of one kind."""

    value: Field = field(default_factory=Field)
    key_pattern: str = r"^.+$"

    def check(self, value, path, errors):
        if not isinstance(value, dict):
            errors.append((path, f"must be a mapping, not {type_name(value)}"))
            return value
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not re.match(self.key_pattern, k):
                errors.append((f"{path}.{k}", f"key must match {self.key_pattern}"))
                continue
            out[k] = self.value.check(v, f"{path}.{k}", errors)
        return out


@dataclass
class Section(Field):
    fields: dict[str, Field] = field(default_factory=dict)
    nullable: bool = False
    sparse: bool = False  # keep only the keys given (no defaults filled in)
    required: tuple[str, ...] = ()  # keys that must be given, also when sparse

    def __post_init__(self) -> None:
        if self.default is REQUIRED:
            self.default = {}

    def check(self, value, path, errors):
        if value is None and self.nullable:
            return None
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append((path, f"must be a mapping, not {type_name(value)}"))
            return value
        out = {}
        for key in value:
            if key not in self.fields:
                hint = did_you_mean(str(key), self.fields)
                errors.append((join(path, key), f"unknown key{hint}"))
        for name, spec in self.fields.items():
            sub = join(path, name)
            if name in value:
                out[name] = spec.check(value[name], sub, errors)
            elif name in self.required or (spec.default is REQUIRED and not self.sparse):
                errors.append((sub, "is required"))
            elif self.sparse:
                continue
            elif isinstance(spec, Section):
                out[name] = spec.check(copy.deepcopy(spec.default), sub, errors)
            else:
                out[name] = copy.deepcopy(spec.default)
        return out


class Ed25519Key(Str):
    """A raw 32-byte Ed25519 public key in base64."""

    def check(self, value, path, errors):
        value = super().check(value, path, errors)
        if isinstance(value, str):
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                errors.append((path, "must be a raw 32-byte Ed25519 public key in base64"))
        return value


class TimeZone(Str):
    def check(self, value, path, errors):
        value = super().check(value, path, errors)
        if isinstance(value, str):
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                errors.append((path, f"unknown time zone {value!r}{_zone_hint(value)}"))
        return value


VIETNAM_ZONE = "Asia/Ho_Chi_Minh"
_UTC_OFFSET = re.compile(r"^(?:GMT|UTC|UT)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
_VIETNAM_NAMES = {"ict", "vietnam", "viet_nam", "hanoi", "asia/hanoi", "saigon", "ho_chi_minh",
                  "hochiminh", "asia/hochiminh"}


def _zone_hint(value: str) -> str:
    """A suggestion for an unknown zone. An offset (``GMT+7``, ``UTC+07:00``) is not a zone
    name: difflib would offer ``GMT+0``. Viet Nam is UTC+7 all year: ``Asia/Ho_Chi_Minh``."""
    m = _UTC_OFFSET.match(value.strip())
    if m:
        sign, hours, minutes = m.group(1), int(m.group(2)), int(m.group(3) or 0)
        if hours == 0 and minutes == 0:
            return " (did you mean 'UTC'?)"
        if (sign, hours, minutes) == ("+", 7, 0):
            return (f" (did you mean {VIETNAM_ZONE!r}? Viet Nam is UTC+7; the fixed-offset name "
                    "is 'Etc/GMT-7': POSIX zone names invert the sign)")
        if minutes == 0 and hours <= 14:
            inverted = f"Etc/GMT{'-' if sign == '+' else '+'}{hours}"
            return (f" (a place name such as {VIETNAM_ZONE!r} is best; the fixed UTC{sign}{hours}"
                    f" is {inverted!r}: POSIX zone names invert the sign)")
        return f" (use a place name such as {VIETNAM_ZONE!r})"
    if value.strip().lower().replace(" ", "_") in _VIETNAM_NAMES:
        return f" (did you mean {VIETNAM_ZONE!r}?)"
    try:
        import zoneinfo

        return did_you_mean(value, zoneinfo.available_timezones())
    except (ImportError, OSError):  # pragma: no cover - tzdata missing
        return ""


def type_name(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "a list", dict: "a mapping"}
    return names.get(type(value), type(value).__name__)


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _backends(kind: str, *no_driver: str) -> tuple[str, ...]:
    """The names a config key may choose for a driver kind: ``drivers.REGISTRY``'s, in its
    order, after ``no_driver`` (names that mean "none fitted", not a backend)."""
    return (*no_driver, *drivers.REGISTRY[kind])


SCHEMA = Section(fields={
    "device": Section(fields={
        "id": Str(pattern=ID_RE, doc="MQTT client id and topic segment"),
        "groups": List(default=[], item=Str(pattern=ID_RE)),
        "timezone": TimeZone(default="Asia/Ho_Chi_Minh"),
        "languages": List(default=["vi"], item=Str(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$")),
    }),
    "mqtt": Section(fields={
        "host": Str(default="127.0.0.1"),
        "port": Num(default=1883, min=1, max=65535),
        "topic_prefix": Str(default="ttcs", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$"),
        "protocol": Str(default="5", choices=("5", "3.1.1")),
        "keepalive_s": Num(default=60, min=5, max=3600),
        "connect_timeout_s": Num(default=10, min=1, max=120, integer=False,
                                 doc="for TCP, TLS and the broker's answer to CONNECT"),
        "username": Str(default=None, nullable=True),
        "password_file": Str(default=None, nullable=True),
        "tls": Section(default=None, nullable=True, fields={
            "ca_file": Str(default=None, nullable=True),
            "cert_file": Str(default=None, nullable=True),
            "key_file": Str(default=None, nullable=True),
        }),
        "reconnect_min_s": Num(default=1, min=0.1, max=60, integer=False),
        "reconnect_max_s": Num(default=30, min=1, max=300, integer=False),
        "session_expiry_s": Num(default=86400, min=0, max=7 * 86400),
    }),
    "security": Section(fields={
        "require_signed": Bool(default=True),
        "trusted_keys": Map(default={}, value=Ed25519Key(), key_pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        "media_hosts": List(default=[], item=Str(pattern=r"^[A-Za-z0-9.:\[\]-]+$")),
        "max_skew_s": Num(default=300, min=1, max=86400),
        "replay_memory": Num(default=20000, min=100, max=1_000_000,
                             doc="how many accepted command ids are remembered"),
    }),
    "paths": Section(fields={
        "state_dir": Str(default="/var/lib/ttcs-agent"),
        "cache_dir": Str(default="/var/cache/ttcs-agent"),
    }),
    "audio": Section(fields={
        "backend": Str(default="vlc", choices=_backends("audio")),
        "vlc_args": List(default=[], item=Str()),
        "device": Str(default=None, nullable=True),
        "network_caching_ms": Num(default=3000, min=0, max=60000),
        "volume": Num(default=80, min=0, max=100),
        "resume_rewind_ms": Num(default=1000, min=0, max=10000),
        "journal_interval_s": Num(default=10, min=1, max=300, integer=False,
                                  doc="position of what airs written to agent.db this often"),
        "live": Section(fields={
            "dead_air_s": Num(default=8.0, min=1, max=600, integer=False,
                              doc="no progress or silence this long on a stream: next source"),
            "start_grace_s": Num(default=12.0, min=1, max=600, integer=False,
                                 doc="time a stream may take to produce its first audio"),
            "probe_min_s": Num(default=10.0, min=1, max=3600, integer=False,
                               doc="first re-probe of the primary after leaving it"),
            "probe_max_s": Num(default=180.0, min=1, max=86400, integer=False,
                               doc="longest wait between re-probes (the backoff doubles)"),
            "probe_timeout_s": Num(default=5.0, min=1, max=60, integer=False),
        }),
    }),
    "amplifier": Section(fields={
        "pin": Num(default=None, nullable=True, min=0, max=27),
        "active_high": Bool(default=True),
        "warm_up_s": Num(default=2.0, min=0, max=30, integer=False),
        "idle_hold_s": Num(default=30.0, min=0, max=3600, integer=False),
        "fault_pin": Num(default=None, nullable=True, min=0, max=27),
        "fault_active_low": Bool(default=True),
    }),
    "media": Section(fields={
        "dir": Str(default=None, nullable=True),
        "quota_mb": Num(default=1024, min=1, max=1_000_000, integer=False),
        "max_bytes": Num(default=200 * 1024 * 1024, min=1024, max=2**40),
        "timeout_s": Num(default=300, min=10, max=3600, integer=False,
                         doc="a whole download, every attempt and wait included"),
        "read_timeout_s": Num(default=15, min=1, max=300, integer=False,
                              doc="no byte this long: the connection is dropped and retried"),
        "min_bytes_per_s": Num(default=1024, min=0, max=10**9, integer=False,
                               doc="an attempt averaging less (after slow_grace_s) fails"),
        "slow_grace_s": Num(default=30, min=1, max=3600, integer=False),
        "retries": Num(default=3, min=0, max=10),
        "backoff_s": Num(default=2.0, min=0, max=60, integer=False),
        "workers": Num(default=2, min=1, max=8),
    }),
    "tts": Section(fields={
        "engine": Str(default="espeak", choices=("espeak", "piper")),
        "dir": Str(default=None, nullable=True),
        "voices": Map(default={}, value=Str(), key_pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$"),
        "speed_wpm": Num(default=150, min=80, max=450),
        "timeout_s": Num(default=120, min=1, max=3600, integer=False),
        "max_files": Num(default=500, min=1, max=100000),
        "piper": Section(fields={
            "binary": Str(default="piper"),
            "models": Map(default={}, value=Str(), key_pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$"),
        }),
    }),
    "verification": Section(fields={
        "backend": Str(default="none", choices=_backends("level", "none")),
        "device": Str(default=None, nullable=True),
        "samplerate": Num(default=16000, min=8000, max=192000),
        "channels": Num(default=1, min=1, max=8),
        "block_ms": Num(default=100, min=10, max=2000),
        "silence_dbfs": Num(default=-50, min=-120, max=0, integer=False),
    }),
    "board": Section(fields={
        "driver": Str(default="none", choices=_backends("board")),
        "width": Num(default=64, min=8, max=4096),
        "height": Num(default=16, min=7, max=1024),
        "image_path": Str(default=None, nullable=True),
        "image_scale": Num(default=1, min=1, max=16),
        "font": Str(default=None, nullable=True),
        "font_size": Num(default=None, nullable=True, min=6, max=512),
        "scroll_speed_px_s": Num(default=24.0, min=1, max=1000, integer=False),
        "scroll_gap_px": Num(default=None, nullable=True, min=0, max=4096),
        "brightness": Num(default=255, min=0, max=255),
        "brightness_schedule": Map(default={}, value=Num(min=0, max=255),
                                   key_pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$"),
        "cascaded": Num(default=None, nullable=True, min=1, max=256),
        "block_orientation": Num(default=0, min=-90, max=180),
        "rotate": Num(default=0, min=0, max=3),
        "blocks_reversed": Bool(default=False),
        "spi": Bool(default=True),
        "spi_port": Num(default=0, min=0, max=7),
        "spi_device": Num(default=0, min=0, max=7),
        "spi_speed_hz": Num(default=8_000_000, min=500_000, max=8_000_000),
        "reconnect_interval_s": Num(default=5.0, min=0, max=3600, integer=False),
        "serial_port": Str(default=None, nullable=True),
        "baudrate": Num(default=9600, min=300, max=921600),
        "sign_type": Str(default="Z", pattern=r"^.$"),
        "sign_address": Str(default="00", pattern=r"^[0-9A-Fa-f]{2}$"),
        "file_label": Str(default="A", pattern=r"^.$"),
        "sign_columns": Num(default=0, min=0, max=10000),
        "framebuffer": Section(fields={
            "device": Str(default="/dev/fb0"),
            "sysfs": Str(default="/sys/class/graphics/fb0"),
            "region": List(default=[], max_items=4, item=Num(min=0, max=16384),
                           doc="[x, y, width, height]; empty: the whole screen"),
            "title": Str(default="", max_len=120, doc="the commune's name, on every page"),
            "max_image_pixels": Num(default=12_000_000, min=10_000, max=100_000_000),
        }),
    }),
    "schedule": Section(fields={
        "catch_up_default_s": Num(default=0, min=0, max=86400),
        "grace_s": Num(default=60, min=0, max=3600),
        "prefetch_days": Num(default=7, min=1, max=60),
        "media_alert_lead_s": Num(default=3600, min=60, max=7 * 86400),
        "slot_log_keep_days": Num(default=14, min=1, max=366),
    }),
    "gpio": Section(fields={
        "backend": Str(default="lgpio", choices=_backends("gpio")),
    }),
    "clock": Section(fields={
        "trust": Str(default="auto", choices=("auto", "always", "never")),
    }),
    "health": Section(fields={
        "interval_s": Num(default=60, min=5, max=86400),
        "disk_min_free_mb": Num(default=200, min=0, max=10_000_000),
    }),
    "alerts": Section(fields={
        "raise_after_s": Num(default=5, min=0, max=60, integer=False),
        "clear_after_s": Num(default=30, min=0, max=3600, integer=False),
        "flap_max": Num(default=4, min=2, max=100),
        "flap_window_s": Num(default=600, min=1, max=86400, integer=False),
        "flap_clear_after_s": Num(default=600, min=0, max=86400, integer=False),
        "cpu_temp": Section(fields={
            "raise_c": Num(default=80, min=30, max=125, integer=False),
            "clear_c": Num(default=75, min=20, max=125, integer=False),
        }),
        "modem_signal": Section(fields={
            "raise_dbm": Num(default=-105, min=-113, max=-51),
            "clear_dbm": Num(default=-99, min=-113, max=-51),
        }),
        "disk_low": Section(fields={
            "clear_margin": Num(default=0.10, min=0, max=1, integer=False),
        }),
        "codes": Map(default={}, key_pattern=r"^[a-z_]{1,40}$", value=Section(sparse=True, fields={
            "raise_after_s": Num(min=0, max=60, integer=False),
            "clear_after_s": Num(min=0, max=3600, integer=False),
        })),
    }),
    "cabinet": Section(fields={
        name: Section(default=None, nullable=True, fields={
            "pin": Num(min=0, max=27),
            "active_low": Bool(default=True),
            "pull": Str(default="up", choices=("up", "down", "none")),
            "debounce_ms": Num(default=debounce, min=0, max=10000),
        }) for name, debounce in (("door", 200), ("mains", 500), ("amplifier_fault", 200))
    }),
    "modem": Section(fields={
        "backend": Str(default="at", choices=_backends("modem")),
        "port": Str(default=None, nullable=True),
        "baudrate": Num(default=115200, min=300, max=4_000_000),
        "timeout_s": Num(default=5, min=0.5, max=30, integer=False),
        "interval_s": Num(default=60, min=10, max=86400),
    }),
    "outbox": Section(fields={
        "max_rows": Num(default=100_000, min=100, max=10_000_000,
                        doc="above this, the oldest health samples, then acks, are dropped"),
        "inflight": Num(default=20, min=1, max=1000),
        "keep_days": Num(default=30, min=0, max=3660, integer=False,
                         doc="events are kept this long after they were made, for resend"),
        "keep_max_mb": Num(default=64, min=1, max=100_000, integer=False,
                           doc="kept events take at most this (payloads); the oldest go first"),
    }),
    "state": Section(fields={
        "min_interval_s": Num(default=1.0, min=0, max=3600, integer=False),
    }),
    "update": Section(fields={  # docs/UPDATE.md
        "prefix": Str(default="/opt/ttcs-agent"), "probation_s": Num(default=300, min=1, max=86400),
        "window": Str(default=None, nullable=True, pattern=r"^([01]\d|2[0-3]):[0-5]\d-"
                      r"([01]\d|2[0-3]):[0-5]\d$"),
        "max_failed_starts": Num(default=3, min=1, max=100), "keep": Num(default=2, min=1, max=10),
        "margin_mb": Num(default=100, min=0, max=1_000_000)}),
    "log": Section(fields={
        "level": Str(default="info", choices=("debug", "info", "warning", "error")),
    }),
})


# --- loading -----------------------------------------------------------------------------

def parse(text: str, filename: str = "<config>", schema: Section = SCHEMA) -> dict:
    """Parse and validate config text; raise :class:`ConfigError` with every problem."""
    try:
        raw, positions, problems = yamlfile.load(text)
    except yamlfile.YamlError as e:
        raise ConfigError([f"{filename}:{e.line}:{e.col}: {e.message}"]) from None
    errors: list[tuple[str, str]] = []
    if raw is None:
        raw = {}
    data = schema.check(raw, "", errors)
    if schema is SCHEMA and isinstance(data, dict):
        from agent.config_checks import cross_checks

        # In the same pass: each rule is skipped only if a key it reads has a wrong value
        # (an unknown or duplicate key elsewhere changes no value a rule reads).
        errors += cross_checks(data, [p for p, m in errors if not m.startswith("unknown key")])
    for path, message in errors:
        problems.append((path, message, yamlfile.position_of(path, positions)))
    if not problems and isinstance(data, dict) and schema is SCHEMA:
        _derive(data)
    if problems:
        problems.sort(key=lambda p: (p[2], p[0]))
        raise ConfigError([f"{filename}:{line}:{col}: {path or '(top)'}: {msg}"
                           for path, msg, (line, col) in problems])
    return data


def _derive(cfg: dict) -> None:
    """Fill values that default from others."""
    for key in ("state_dir", "cache_dir"):
        cfg["paths"][key] = os.path.expanduser(cfg["paths"][key])
    if cfg["board"]["image_path"] is None:
        cfg["board"]["image_path"] = os.path.join(cfg["paths"]["state_dir"], "board.png")
    for section, sub in (("media", "media"), ("tts", "tts")):
        if cfg[section]["dir"] is None:
            cfg[section]["dir"] = os.path.join(cfg["paths"]["cache_dir"], sub)


def defaults(section: str) -> dict:
    """One section as a config that leaves it out has it (for tools that need no device)."""
    return SCHEMA.fields[section].check({}, section, [])


def load(path: str | None = None) -> dict:
    """Read and validate the agent's config: ``path``, else ``$TTCS_AGENT_CONFIG``, else
    :data:`DEFAULT_CONFIG_PATH`."""
    return load_file(path or os.environ.get("TTCS_AGENT_CONFIG") or DEFAULT_CONFIG_PATH)


def load_file(path: str, schema: Section = SCHEMA) -> dict:
    """Read and validate the config file at ``path`` against ``schema``; ``_path`` is added."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE_BYTES + 1)  # parse() refuses a longer one
    except FileNotFoundError:
        raise ConfigError([f"{path}:1:1: (file): not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}:1:1: (file): cannot read: {e}"]) from None
    cfg = parse(text, path, schema)
    cfg["_path"] = os.path.abspath(path)
    return cfg


def load_or_report(path: str | None = None, stream=None) -> dict | None:
    """Load the config, or print every problem (to stderr) and return None."""
    import sys

    try:
        return load(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=stream or sys.stderr)
        return None
