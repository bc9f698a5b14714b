"""ttcs-ctl's config (``~/.config/ttcs/ctl.yaml``, docs/CTL.md): its schema, loading, groups.

Validated by the agent's schema machinery (:mod:`agent.config`), so problems read the same:
``FILE:LINE:COL: key.path: what is wrong``, all at once. The ``mqtt`` section is the agent's.
"""

from __future__ import annotations

import os

from agent import config
from agent.config import ID_RE, Bool, Field, List, Map, Num, Section, Str, TimeZone, type_name

DEFAULT_CTL_PATH = "~/.config/ttcs/ctl.yaml"


class LatLon(Field):
    """``[latitude, longitude]`` in degrees (WGS 84), as CAP's polygons and circles are."""

    def check(self, value, path, errors):
        if (not isinstance(value, list) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            errors.append((path, f"must be [latitude, longitude], not {type_name(value)}"))
            return value
        lat, lon = value
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            errors.append((path, f"[{lat}, {lon}] is not a latitude (-90..90) and a longitude"
                                 " (-180..180)"))
        return [float(lat), float(lon)]

URGENCY = ("Immediate", "Expected", "Future", "Past", "Unknown")
SEVERITY = ("Extreme", "Severe", "Moderate", "Minor", "Unknown")
CERTAINTY = ("Observed", "Likely", "Possible", "Unlikely", "Unknown")
LANG_RE = r"^[a-z]{2,3}$"
GROUPS = List(item=Str(pattern=ID_RE))
SENDERS = List(default=[], item=Str(max_len=256))

# CAP 1.2 ingest (docs/CAP.md). The priority rules: the first whose lists all hold the info
# block's value decides (an empty list: any); none: normal.
DEFAULT_CAP_PRIORITY = [
    {"urgency": ["Immediate", "Expected"], "severity": ["Extreme", "Severe"],
     "certainty": ["Observed", "Likely"], "priority": "emergency"},
    {"urgency": [], "severity": ["Moderate"], "certainty": [], "priority": "priority"},
]
CAP_SCHEMA = Section(fields={
    "senders": List(default=[], item=Str(max_len=256),
                    doc="accepted CAP senders (empty: any)"),
    "geocodes": Map(default={}, key_pattern=r"^[^=\s]+=\S.*$", value=GROUPS,
                    doc="VALUENAME=VALUE -> groups"),
    "area_names": Map(default={}, value=GROUPS, doc="areaDesc -> groups"),
    "languages": Map(default={}, key_pattern=ID_RE, value=List(item=Str(pattern=LANG_RE)),
                     doc="group -> spoken language order (default: default_languages)"),
    "default_languages": List(default=["vi"], item=Str(pattern=LANG_RE)),
    "repeat": Num(default=2, min=1, max=10, doc="spoken alerts are said this many times"),
    "test_group": Str(default=None, nullable=True, pattern=ID_RE,
                      doc="Test/Exercise messages go here, marked as tests (null: nowhere)"),
    "test_marker": Str(default="Tin thử nghiệm", max_len=100),
    "scopes": Section(fields={
        "Restricted": SENDERS, "Private": SENDERS}),
    "priority": List(default=DEFAULT_CAP_PRIORITY, max_items=50, item=Section(fields={
        "urgency": List(default=[], item=Str(choices=URGENCY)),
        "severity": List(default=[], item=Str(choices=SEVERITY)),
        "certainty": List(default=[], item=Str(choices=CERTAINTY)),
        "priority": Str(choices=("emergency", "priority", "normal")),
    })),
    "default_ttl_s": Num(default=3600, min=60, max=7 * 86400,
                         doc="an alert without expires: its commands' exp and board time"),
    "board_chars": Num(default=200, min=20, max=1000,
                       doc="the instruction joins the headline on boards when both fit"),
    "wait_s": Num(default=10, min=0, max=600, integer=False,
                  doc="ingest waits this long for every target's received ack"),
    "download_timeout_s": Num(default=20, min=1, max=600, integer=False),
    "feed_max_bytes": Num(default=5 * 1024 * 1024, min=1024, max=2**31),
})

CTL_SCHEMA = Section(fields={
    "mqtt": config.SCHEMA.fields["mqtt"],
    "signing": Section(fields={
        "kid": Str(default=None, nullable=True, pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        "key_file": Str(default=None, nullable=True),
    }),
    "relay": Section(fields={
        "db_path": Str(default="~/.local/state/ttcs/relay.db"),
        "db_url": Str(default=None, nullable=True, pattern=r"^postgres(ql)?://",
                      doc="a PostgreSQL database instead of db_path (postgresql://…)"),
        "client_id": Str(default="ttcs-relay", pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        "heartbeat_default_s": Num(default=60, min=1, max=86400, integer=False),
        "missed_beats": Num(default=3, min=1, max=100),
        "group_wait_s": Num(default=None, nullable=True, min=0, max=86400, integer=False,
                            doc="first notice of a new group: wait this long (default 30)"),
        "group_interval_s": Num(default=None, nullable=True, min=0, max=86400, integer=False,
                                doc="later changes to a group: at most this often (default 300)"),
        "group_window_s": Num(default=None, nullable=True, min=0, max=86400, integer=False,
                              doc="the old name of group_interval_s (see grouping)"),
        "tick_s": Num(default=1.0, min=0.05, max=60, integer=False),
        "groups": Map(default={}, key_pattern=ID_RE,
                      value=List(item=Str(pattern=r"^(\*|[a-z0-9][a-z0-9-]{0,63}\*?)$"))),
        "timezone": TimeZone(default="Asia/Ho_Chi_Minh"),
        "health_keep_days": Num(default=31, min=1, max=3660),
        "events_keep_days": Num(default=90, min=1, max=36600,
                                doc="event bodies received longer ago are emptied (rows stay)"),
        "ts_past_days": Num(default=400, min=1, max=36600, integer=False,
                            doc="device times older than this are replaced by the receive time"),
        "ts_future_s": Num(default=3600, min=0, max=31_536_000, integer=False,
                           doc="device times further ahead than this: likewise"),
        "gap_wait_s": Num(default=10, min=0, max=86400, integer=False,
                          doc="a missing seq is asked for (resend) after this long"),
        "gap_retry_s": Num(default=30, min=1, max=86400, integer=False,
                           doc="first retry of an unanswered resend; doubles each time"),
        "gap_retry_max_s": Num(default=600, min=1, max=86400, integer=False),
        "gap_backfill": Num(default=None, nullable=True, min=0, max=1_000_000_000,
                            doc="seqs below a device's first stored one asked for (null: all,"
                                " from seq 1)"),
        "gap_probe_s": Num(default=3600, min=0, max=864000, integer=False,
                           doc="ask every device past its newest stored seq this often"),
        "status_reread_s": Num(default=60, min=0, max=86400, integer=False,
                               doc="re-read retained status of devices with none (0: never)"),
        "shared_group": Str(default=None, nullable=True, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                            doc="MQTT 5 shared subscription group: several relay processes"),
    }),
    "media": Section(fields={
        "dir": Str(default="~/.local/state/ttcs/media",
                   doc="recordings kept by sha256 for the devices to fetch"),
        "base_url": Str(default=None, nullable=True, pattern=r"^https?://",
                        doc="where the devices fetch media.dir (its host in their media_hosts)"),
        "max_bytes": Num(default=50 * 1024 * 1024, min=1024, max=2**31),
    }),
    "console": Section(fields={
        "listen": Str(default="127.0.0.1:8080",
                      pattern=r"^(\[[0-9A-Fa-f:]+\]|[^\s:\[\]]+):\d{1,5}$",
                      doc="ttcs-ctl serve: HOST:PORT (keep 127.0.0.1 behind a TLS proxy)"),
        "secure_cookies": Bool(default=False, doc="true when served over HTTPS (the proxy)"),
        "session_hours": Num(default=12, min=0.1, max=720, integer=False),
        "lockout_after": Num(default=5, min=1, max=100,
                             doc="failed logins in a row that lock a name"),
        "lockout_s": Num(default=900, min=1, max=604800, integer=False),
        "login_per_minute": Num(default=10, min=1, max=1000, doc="login attempts per address"),
        "live_interval_s": Num(default=0.5, min=0.1, max=60, integer=False,
                               doc="how often the fleet is re-read for live updates"),
        "board": Section(fields={  # the geometry of board previews (the agent's board keys)
            "width": Num(default=64, min=8, max=1024),
            "height": Num(default=16, min=7, max=256),
        }),
    }),
    "cap": CAP_SCHEMA,
    "locations": Map(default={}, key_pattern=ID_RE, value=LatLon(),
                     doc="device id or group -> [lat, lon]: CAP areas, the console's map"),
    "alerts": Section(fields={
        "webhook_url": Str(default=None, nullable=True, pattern=r"^https?://"),
        "telegram": Section(default=None, nullable=True, fields={
            "bot_token_file": Str(),
            "chat_id": Str(max_len=64),
            "base_url": Str(default="https://api.telegram.org", pattern=r"^https?://"),
        }),
        "email": Section(default=None, nullable=True, fields={
            "smtp_host": Str(),
            "smtp_port": Num(default=587, min=1, max=65535),
            "starttls": Bool(default=True),
            "ssl": Bool(default=False),
            "username": Str(default=None, nullable=True),
            "password_file": Str(default=None, nullable=True),
            "from": Str(pattern=r"^[^@\s]+@[^@\s]+$"),
            "to": List(item=Str(pattern=r"^[^@\s]+@[^@\s]+$"), max_items=100),
        }),
        "codes": List(default=[], item=Str(pattern=r"^[a-z_]{1,40}$"),
                      doc="alert codes to notify (empty: all)"),
        "timeout_s": Num(default=10, min=1, max=120, integer=False),
        "retry": Section(fields={
            "attempts": Num(default=8, min=1, max=100),
            "backoff_s": Num(default=5, min=0, max=3600, integer=False),
            "backoff_max_s": Num(default=600, min=0, max=86400, integer=False),
        }),
    }),
})


EXAMPLE = "config/ctl.example.yaml"


def resolve_path(path: str | None = None) -> tuple[str, str]:
    """(the config file to read, where that name came from): ``path`` (``--config``), else
    ``$TTCS_CTL_CONFIG``, else :data:`DEFAULT_CTL_PATH`; ``~`` expanded."""
    if path:
        return os.path.expanduser(path), "--config"
    if os.environ.get("TTCS_CTL_CONFIG"):
        return os.path.expanduser(os.environ["TTCS_CTL_CONFIG"]), "$TTCS_CTL_CONFIG"
    return os.path.expanduser(DEFAULT_CTL_PATH), "the default path"


def missing_message(path: str, source: str) -> str:
    """What to do when there is no config file at ``path``."""
    where = ("the default path; --config FILE, before or after the command, or"
             " $TTCS_CTL_CONFIG names another" if source == "the default path"
             else f"given by {source}")
    return (f"ttcs-ctl: no config file at {path} ({where}).\n"
            f"Start from {EXAMPLE} in the ttcs-agent source tree (every key, with comments):\n"
            f"  mkdir -p {os.path.dirname(path)} && cp {EXAMPLE} {path}\n"
            "then set mqtt.host/port and signing.kid/key_file (the key from ttcs-ctl keygen);"
            " the README's controller section has a minimal one.")


def load(path: str | None = None) -> dict:
    """Read and validate the ctl config at :func:`resolve_path` (``path``, else
    ``$TTCS_CTL_CONFIG``, else :data:`DEFAULT_CTL_PATH`). Raises
    :class:`agent.config.ConfigError`."""
    return config.load_file(resolve_path(path)[0], CTL_SCHEMA)


GROUP_WAIT_S, GROUP_INTERVAL_S = 30.0, 300.0


def grouping(relay: dict) -> tuple[float, float, str | None]:
    """``(group_wait_s, group_interval_s, note)`` from ``relay``, Alertmanager's convention.

    The old ``group_window_s`` (notices held until the oldest was that old) is still read: as
    ``group_interval_s`` when that is not given, and it bounds the default ``group_wait_s`` (so
    ``group_window_s: 0`` still means at once). ``note`` says what was made of it, for the log.
    """
    wait, interval, old = (relay.get(k) for k in ("group_wait_s", "group_interval_s",
                                                   "group_window_s"))
    note = None
    if old is not None:
        if interval is None:
            interval = old
            note = f"relay.group_window_s ({old:g} s) is the old name of group_interval_s"
        else:
            note = "relay.group_window_s is ignored: relay.group_interval_s is set"
        if wait is None:
            wait = min(GROUP_WAIT_S, old)
    return (GROUP_WAIT_S if wait is None else float(wait),
            GROUP_INTERVAL_S if interval is None else float(interval), note)


def groups_of(device: str, groups: dict[str, list[str]]) -> list[str]:
    """The ``relay.groups`` of ``device``: an entry is a device id or a prefix ending in ``*``."""
    return sorted(g for g, entries in groups.items()
                  if any(device == e or (e.endswith("*") and device.startswith(e[:-1]))
                         for e in entries))


def location_of(device: str, cfg: dict) -> tuple[float, float] | None:
    """Where ``device`` is (``locations``): its own entry, else the first of its
    ``relay.groups`` (alphabetically) that has one, else None."""
    locations = cfg.get("locations") or {}
    if device in locations:
        return tuple(locations[device])
    for g in groups_of(device, cfg["relay"]["groups"]):
        if g in locations:
            return tuple(locations[g])
    return None
