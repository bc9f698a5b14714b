"""Signing keys for ``ttcs-ctl``: ``keygen`` writes an Ed25519 private key (PKCS#8 PEM, mode
0600) and prints its public key in the form ``security.trusted_keys`` takes; ``pubkey``
prints it again from the key file."""

from __future__ import annotations

import os
import secrets
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.core.mqtt import check_private
from ctl.session import EXIT_DONE, EXIT_USAGE

# a new file only: never through a link, never an existing file (a planted one included)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def keygen(out: str, kid: str, force: bool) -> int:
    out = os.path.expanduser(out)
    if os.path.lexists(out) and not force:
        print(f"{out} exists: not overwritten. Its public key: ttcs-ctl pubkey {out}"
              f" --kid {kid}; a new key in its place (agents then need the new public key):"
              " --force", file=sys.stderr)
        return EXIT_USAGE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = _write_new(folder, os.path.basename(out), pem)
    os.replace(tmp, out)
    _fsync_dir(folder)
    print(f"private key written to {out} (mode 0600)")
    _print_public(key, kid)
    return EXIT_DONE


def pubkey(path: str, kid: str) -> int:
    """Print the public key of an existing private key file (refused if others can read it)."""
    _print_public(load_private_key(path), kid)
    return EXIT_DONE


def _print_public(key: Ed25519PrivateKey, kid: str) -> None:
    print("add to each agent's config:")
    print("security:\n  trusted_keys:")
    print(f'    {kid}: "{protocol.public_key_b64(key)}"')


def _write_new(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to a new file with an unguessable name in ``folder`` (mode 0600,
    O_EXCL|O_NOFOLLOW: a link or file planted there is never written through), fsynced."""
    for _ in range(16):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, _NEW_FILE, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp
    raise FileExistsError(f"cannot create a new temporary file in {folder}")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_private_key(path: str) -> Ed25519PrivateKey:
    path = os.path.expanduser(path)
    check_private(path)
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def signing_key(cfg: dict, hint: str = "") -> Ed25519PrivateKey | None:
    """The key of ``signing.key_file``, or None (and a message) when signing is not set up."""
    sign_cfg = cfg["signing"]
    if not sign_cfg.get("key_file") or not sign_cfg.get("kid"):
        print(f"signing.kid and signing.key_file must be set{hint}", file=sys.stderr)
        return None
    return load_private_key(sign_cfg["key_file"])
