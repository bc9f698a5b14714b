"""Minimal sd_notify(3) client: READY=1, WATCHDOG=1 and STATUS= over $NOTIFY_SOCKET.

Only the standard library's socket module is used. Every function is a silent
no-op when the process is not started by systemd with Type=notify (no
$NOTIFY_SOCKET), so callers need not check.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

_ENV_SOCKET = "NOTIFY_SOCKET"
_ENV_WD_USEC = "WATCHDOG_USEC"
_ENV_WD_PID = "WATCHDOG_PID"


def _address(raw: str) -> str | bytes | None:
    """Turn $NOTIFY_SOCKET into a socket address; '@' means the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other schemes are not used on a Raspberry Pi


def notify(message: str) -> bool:
    """Send one datagram of newline-separated assignments; True when it was sent."""
    raw = os.environ.get(_ENV_SOCKET, "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def ready() -> bool:
    """Tell systemd that start-up is finished (Type=notify)."""
    return notify("READY=1")


def watchdog() -> bool:
    """Keep-alive ping; call only while the main loop is healthy."""
    if watchdog_interval_s() is None:
        return False
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """One-line free-form status shown by `systemctl status`."""
    return notify("STATUS=" + text.replace("\n", " "))


def stopping() -> bool:
    """Tell systemd that an orderly shutdown has begun."""
    return notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is armed for us.

    Ping at least every half of this value (sd_watchdog_enabled(3)).
    """
    try:
        usec = int(os.environ.get(_ENV_WD_USEC, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get(_ENV_WD_PID, "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000
