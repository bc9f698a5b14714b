"""Signing keys for ``ttcs-ctl``: ``keygen`` writes an Ed25519 private key (PKCS#8 PEM, mode
0600) and prints its public key in the form ``security.trusted_keys`` takes."""

from __future__ import annotations

import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.core.mqtt import check_private
from ctl.session import EXIT_USAGE


def keygen(out: str, kid: str, force: bool) -> int:
    out = os.path.expanduser(out)
    if os.path.exists(out) and not force:
        print(f"{out} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    pub = protocol.public_key_b64(key)
    print(f"private key written to {out} (mode 0600)")
    print("add to each agent's config:")
    print("security:\n  trusted_keys:")
    print(f'    {kid}: "{pub}"')
    return 0




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
