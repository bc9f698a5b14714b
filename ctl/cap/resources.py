"""A CAP info block's recording: fetched by the controller (``uri``, http/https only) or taken
from the message (``derefUri``, base64), its ``digest`` (SHA-1) checked, and hosted for the
devices by its sha256 in the controller's media host (:class:`ctl.media.MediaStore`: kind by
content, size capped). The devices then fetch it like any media (``security.media_hosts``)
and verify the sha256.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from ctl.cap.parse import Info, Resource
from ctl.media import Media, MediaError, MediaStore


class ResourceError(ValueError):
    """The recording could not be used; the alert is spoken instead."""


def audio_resource(info: Info) -> Resource | None:
    return next((r for r in info.resources if r.mime.lower().startswith("audio/")), None)


def fetch(resource: Resource, store: MediaStore, *, timeout: float) -> Media:
    """The resource as hosted media. Raises :class:`ResourceError`."""
    if resource.deref:
        try:
            data = base64.b64decode(resource.deref, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ResourceError(f"derefUri is not base64: {e}") from None
    elif resource.uri:
        data = _download(resource.uri, store.max_bytes, timeout)
    else:
        raise ResourceError("an audio resource without uri or derefUri")
    try:
        return store.put(data, sha1=resource.digest)
    except MediaError as e:
        raise ResourceError(str(e)) from None


def _download(uri: str, max_bytes: int, timeout: float) -> bytes:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ResourceError(f"resource uri must be http(s) with a host, not {uri[:80]!r}")
    if parts.username or parts.password:
        raise ResourceError("resource uri must not hold credentials")
    import requests  # only when a recording is fetched: a shorter start for ingest

    try:
        with requests.get(uri, stream=True, timeout=timeout,
                          headers={"User-Agent": "ttcs-ctl-cap"}) as resp:
            if resp.status_code != 200:
                raise ResourceError(f"resource uri answered HTTP {resp.status_code}")
            chunks, size = [], 0
            for chunk in resp.iter_content(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise ResourceError(f"resource is over media.max_bytes ({max_bytes})")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as e:
        raise ResourceError(f"resource download failed: {type(e).__name__}") from None
