"""ttcs-ctl's config (``~/.config/ttcs/ctl.yaml``, docs/CTL.md): its schema, loading, groups.

Validated by the agent's schema machinery (:mod:`agent.config`), so problems read the same:
``FILE:LINE:COL: key.path: what is wrong``, all at once. The ``mqtt`` section is the agent's.
"""

from __future__ import annotations

import os

from agent import config
from agent.config import ID_RE, Bool, List, Map, Num, Section, Str, TimeZone

DEFAULT_CTL_PATH = "~/.config/ttcs/ctl.yaml"

CTL_SCHEMA = Section(fields={
    "mqtt": config.SCHEMA.fields["mqtt"],
    "signing": Section(fields={
        "kid": Str(default=None, nullable=True, pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        "key_file": Str(default=None, nullable=True),
    }),
    "relay": Section(fields={
        "db_path": Str(default="~/.local/state/ttcs/relay.db"),
        "client_id": Str(default="ttcs-relay", pattern=r"^[A-Za-z0-9._:-]{1,64}$"),
        "heartbeat_default_s": Num(default=60, min=1, max=86400, integer=False),
        "missed_beats": Num(default=3, min=1, max=100),
        "group_window_s": Num(default=300, min=0, max=86400, integer=False),
        "tick_s": Num(default=1.0, min=0.05, max=60, integer=False),
        "groups": Map(default={}, key_pattern=ID_RE,
                      value=List(item=Str(pattern=r"^(\*|[a-z0-9][a-z0-9-]{0,63}\*?)$"))),
        "timezone": TimeZone(default="Asia/Ho_Chi_Minh"),
        "health_keep_days": Num(default=31, min=1, max=3660),
        "ts_past_days": Num(default=400, min=1, max=36600, integer=False,
                            doc="device times older than this are replaced by the receive time"),
        "ts_future_s": Num(default=3600, min=0, max=31_536_000, integer=False,
                           doc="device times further ahead than this: likewise"),
    }),
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


def load(path: str | None = None) -> dict:
    """Read and validate the ctl config: ``path``, else ``$TTCS_CTL_CONFIG``, else
    :data:`DEFAULT_CTL_PATH` (``~`` expanded). Raises :class:`agent.config.ConfigError`."""
    path = os.path.expanduser(path or os.environ.get("TTCS_CTL_CONFIG") or DEFAULT_CTL_PATH)
    return config.load_file(path, CTL_SCHEMA)


def groups_of(device: str, groups: dict[str, list[str]]) -> list[str]:
    """The ``relay.groups`` of ``device``: an entry is a device id or a prefix ending in ``*``."""
    return sorted(g for g, entries in groups.items()
                  if any(device == e or (e.endswith("*") and device.startswith(e[:-1]))
                         for e in entries))
