"""Login sessions and CSRF tokens.

The browser holds a random session token in a cookie (HttpOnly, SameSite=Strict, Secure when
``console.secure_cookies``); the server keeps only its sha256, with the user's name and the
session's CSRF token, which every state-changing request must carry (form field ``csrf`` or
header ``X-CSRF-Token``). The login form itself is protected by a double-submit token (a
cookie and the same value in the form), since there is no session yet.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ctl.db import Database

COOKIE = "ttcs_session"
LOGIN_COOKIE = "ttcs_login"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two tokens (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Session:
    name: str
    csrf: str


class SessionStore:
    def __init__(self, db: Database, lifetime_s: float) -> None:
        self.db = db
        self.lifetime_ms = int(lifetime_s * 1000)

    def create(self, name: str, now_ms: int) -> tuple[str, Session]:
        """A new session for ``name``: (the cookie's token, the session)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.db.tx():
            self.db.x("DELETE FROM console_sessions WHERE expires_ms<?", now_ms)
            self.db.x("INSERT INTO console_sessions(token_hash, name, csrf, created_ms,"
                      " expires_ms) VALUES(?, ?, ?, ?, ?)", _digest(token), name, csrf, now_ms,
                      now_ms + self.lifetime_ms)
        return token, Session(name, csrf)

    def get(self, token: str | None, now_ms: int) -> Session | None:
        if not token or len(token) > 100:
            return None
        with self.db.lock:
            r = self.db.one("SELECT name, csrf, expires_ms FROM console_sessions"
                            " WHERE token_hash=?", _digest(token))
        if r is None or r["expires_ms"] < now_ms:
            return None
        return Session(r["name"], r["csrf"])

    def end(self, token: str | None) -> None:
        if token:
            with self.db.tx():
                self.db.x("DELETE FROM console_sessions WHERE token_hash=?", _digest(token))
