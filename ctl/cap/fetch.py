"""One HTTP GET for the CAP side — a feed, a message given by URL, a resource's recording:
http(s) with a host and no credentials, status 200, at most ``max_bytes``, and one overall
deadline (``timeout`` bounds each socket wait; a server that drips bytes is cut at the
deadline all the same)."""

from __future__ import annotations

import time
import urllib.parse

USER_AGENT = "ttcs-ctl-cap"


class FetchError(Exception):
    """Why the GET gave nothing (a short text, safe to print)."""


def get(url: str, *, max_bytes: int, timeout: float, too_big: str) -> bytes:
    """The body at ``url``. ``too_big`` names the limit in the error when it is passed.
    Raises :class:`FetchError`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"not an http(s) URL with a host: {url[:80]!r}")
    if parts.username or parts.password:
        raise FetchError("the URL must not hold credentials")
    import requests  # only when something is fetched: a shorter start for ingest

    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout,
                          headers={"User-Agent": USER_AGENT}) as resp:
            if resp.status_code != 200:
                raise FetchError(f"HTTP {resp.status_code}")
            chunks, size = [], 0
            while chunk := resp.raw.read1(64 * 1024, decode_content=True):
                # read1: at most one read from the socket, so a drip meets the deadline
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"over {too_big} ({max_bytes} bytes)")
                if time.monotonic() > deadline:
                    raise FetchError(f"not complete within {timeout:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as e:
        raise FetchError(type(e).__name__) from None
