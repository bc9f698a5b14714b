"""Where media may come from: ``security.media_hosts``, one rule for URLs, redirects and the
address a download actually connects to (docs/AUDIO.md, "Media hosts").

- A listed host (a name or an IP address, compared exactly, case and a final dot ignored) is
  allowed, wherever it resolves.
- With a non-empty list, nothing else is.
- With an empty list, any host is, except this device and its link: loopback (127.0.0.0/8,
  ``::1``, ``localhost``), link-local (169.254.0.0/16, ``fe80::/10``), unspecified and
  multicast addresses. An unlisted name is checked again on the address the download connects
  to (:meth:`HostRules.check_peer`), so a name or a redirect that resolves there is refused too.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from agent.args import MAX_URL

_BAD_URL_CHAR = re.compile(r"[\s\x00-\x1f\\]")  # whitespace, control characters, backslash
_MEMO_MAX = 1000


class MediaError(Exception):
    """``reason`` is an ack reason code: media_host, media_checksum or media_unavailable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _norm(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP literal names, also in the forms a resolver accepts (``127.1``,
    ``2130706433``, ``0x7f.0.0.1``); None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """On this device or its link: never reached by an unlisted host."""
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    return addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast


class HostRules:
    """``security.media_hosts`` made into checks. Immutable: a new list is a new object
    (:meth:`agent.audio.media.MediaCache.set_hosts`). Thread-safe."""

    def __init__(self, hosts: list[str]) -> None:
        self.listed = frozenset(_norm(h) for h in hosts)
        self._ok: set[str] = set()  # URLs that passed (the same ones come again and again)

    def check_url(self, url: str) -> None:
        """Raise :class:`MediaError` (``media_host``) unless ``url`` may be downloaded."""
        if isinstance(url, str) and url in self._ok:
            return
        self._check_url(url)
        if len(self._ok) >= _MEMO_MAX:
            self._ok.clear()
        self._ok.add(url)

    def check_peer(self, host: str, address: str) -> None:
        """A download to ``host`` connected to ``address``: raise :class:`MediaError`
        (``media_host``) when an unlisted host led to this device or its link."""
        if _norm(host) in self.listed:
            return
        addr = ip_of(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0)
        if addr is not None and is_local(addr):
            raise MediaError("media_host", f"host {host} resolves to {address}, on this device "
                             "or its link: only allowed when listed in security.media_hosts")

    def _check_url(self, url: str) -> None:
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise MediaError("media_host", f"url must be a string of at most {MAX_URL} characters")
        if _BAD_URL_CHAR.search(url):
            raise MediaError("media_host", "url contains whitespace, control characters or '\\'")
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise MediaError("media_host", f"scheme {parts.scheme!r} not allowed (http/https)")
        if "@" in parts.netloc:
            raise MediaError("media_host", "credentials in the url (user@host) are not allowed")
        try:
            host = _norm(parts.hostname or "")
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise MediaError("media_host", f"bad host or port: {e}") from None
        if not host:
            raise MediaError("media_host", "url has no host")
        if host in self.listed:
            return
        if self.listed:
            raise MediaError("media_host", f"host {host} is not in security.media_hosts")
        addr = ip_of(host)
        if (addr is not None and is_local(addr)) or host == "localhost" \
                or host.endswith(".localhost"):
            raise MediaError("media_host", f"host {host} is this device or its link: only "
                             "allowed when listed in security.media_hosts")


def redact(url: str) -> str:
    """A URL safe for logs and acks: no user:password, no query string (tokens live there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
    except ValueError:
        return "<bad url>"
