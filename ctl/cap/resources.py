"""A CAP info block's recording: fetched by the controller (``uri``, http/https only) or taken
from the message (``derefUri``, base64), its ``digest`` (SHA-1) checked, and hosted for the
devices by its sha256 in the controller's media host (:class:`ctl.media.MediaStore`: kind by
content, size capped). The devices then fetch it like any media (``security.media_hosts``)
and verify the sha256.
"""

from __future__ import annotations

import base64
import binascii

from ctl.cap.fetch import FetchError, get
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
    try:
        return get(uri, max_bytes=max_bytes, timeout=timeout, too_big="media.max_bytes")
    except FetchError as e:
        raise ResourceError(f"resource download failed: {e}") from None
