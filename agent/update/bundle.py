"""A release bundle: one tar file of wheels and ``manifest.json`` (docs/UPDATE.md).

``manifest.json``: ``{"v": 1, "version": "0.2.0", "files": {"wheels/x.whl": SHA256, ...},
"platforms": {...}}``. The controller writes it (``ttcs-ctl release build``); the device
checks every listed file against it before anything is installed, and refuses a bundle with
any other member, a link, or a path leaving the folder.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path, PurePosixPath

MANIFEST = "manifest.json"
WHEELS = "wheels"


class BundleError(Exception):
    """The bundle is not what its manifest says (reason ``media_checksum``)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and name not in ("", ".")


def extract(tar_path: Path, dest: Path) -> dict:
    """Unpack ``tar_path`` into ``dest`` after checking its members, then check every file
    against the manifest. Return the manifest; raise :class:`BundleError`."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if not _safe_name(m.name) or not (m.isfile() or m.isdir()):
                    raise BundleError(f"bundle member {m.name!r} is not a plain file inside it")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"not a readable tar file: {e}") from None
    return verify_folder(dest)


def verify_folder(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"no valid {MANIFEST}: {e}") from None
    if not isinstance(files, dict) or not isinstance(version, str) or not files:
        raise BundleError(f"{MANIFEST}: 'files' must be a mapping and 'version' a string")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    extra = present - set(files) - {MANIFEST}
    if extra:
        raise BundleError(f"files not in the manifest: {', '.join(sorted(extra)[:5])}")
    for name, sha in files.items():
        path = folder / name
        if not _safe_name(name) or not path.is_file():
            raise BundleError(f"{name}: listed in the manifest, missing from the bundle")
        if sha256_file(path) != sha:
            raise BundleError(f"{name}: sha256 does not match the manifest")
    return manifest
