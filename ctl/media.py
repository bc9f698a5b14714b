"""The controller's media host: recordings kept by their sha256 in ``media.dir`` and fetched by
the devices from ``media.base_url`` (docs/CTL.md, "Media").

Whatever puts audio there — a CAP alert's ``resource`` (docs/CAP.md), a recording uploaded in
the console (docs/CONSOLE.md) — uses :class:`MediaStore`: the content's type is read from its
first bytes (never from a name or a declared type), its size is capped, and it is stored once
under ``<sha256>.<ext>``, written to a temporary file and renamed, so a device never fetches half
a file. ``ttcs-ctl serve`` serves the folder; any static web server can too. The devices accept
it only when ``base_url``'s host is in their ``security.media_hosts`` (docs/AUDIO.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

# The kinds of recording the devices play (libvlc), recognised by their first bytes.
KINDS = {"mp3": "audio/mpeg", "wav": "audio/wav", "ogg": "audio/ogg"}
NAME_RE = re.compile(r"^([0-9a-f]{64})\.(mp3|wav|ogg)$")
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class MediaError(ValueError):
    """Content refused; ``reason`` is a short code (``type``, ``size``, ``digest``, ``config``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sniff(head: bytes) -> str | None:
    """``mp3``, ``wav`` or ``ogg`` from a file's first bytes (at least 12), else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    # An MPEG audio frame header: 11 sync bits, layer bits not 00 (layer III/II/I).
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06):
        return "mp3"
    return None


@dataclass(frozen=True)
class Media:
    sha256: str
    kind: str           # mp3 | wav | ogg
    size: int
    url: str            # where the devices fetch it

    @property
    def content_type(self) -> str:
        return KINDS[self.kind]

    def ref(self, lang: str | None = None) -> dict:
        """The ``{url, sha256[, lang]}`` a command's media argument takes."""
        out = {"url": self.url, "sha256": self.sha256}
        if lang:
            out["lang"] = lang
        return out


class MediaStore:
    """Recordings by sha256 in ``directory``, published under ``base_url``."""

    def __init__(self, directory: str, base_url: str | None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = os.path.expanduser(directory)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, cfg: dict) -> MediaStore:
        m = cfg["media"]
        return cls(m["dir"], m["base_url"], m["max_bytes"])

    def url_of(self, name: str) -> str:
        if not self.base_url:
            raise MediaError("config", "media.base_url is not set in ctl.yaml: the devices"
                                       " would not know where to fetch the recording")
        return f"{self.base_url}/{name}"

    def put(self, data: bytes, *, sha1: str | None = None) -> Media:
        """Store ``data`` (a recording) and return it as :class:`Media`. ``sha1``, when given
        (CAP's ``digest``), must match. Raises :class:`MediaError`."""
        if len(data) > self.max_bytes:
            raise MediaError("size", f"recording is {len(data)} bytes; media.max_bytes is"
                                     f" {self.max_bytes}")
        if sha1 is not None and hashlib.sha1(data).hexdigest() != sha1.strip().lower():
            raise MediaError("digest", "recording does not match its SHA-1 digest")
        kind = sniff(data[:12])
        if kind is None:
            raise MediaError("type", "not an MP3, WAV or OGG recording (by its content)")
        sha = hashlib.sha256(data).hexdigest()
        name = f"{sha}.{kind}"
        url = self.url_of(name)
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return Media(sha, kind, len(data), url)

    def path_of(self, name: str) -> str | None:
        """The file for a URL's last part ``<sha256>.<ext>``, or None (a name that is not one
        of ours is never turned into a path)."""
        if not NAME_RE.fullmatch(name):
            return None
        path = os.path.join(self.dir, name)
        return path if os.path.isfile(path) else None
