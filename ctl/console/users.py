"""Console accounts and what each may do (docs/CONSOLE.md, "Users and roles").

- **admin**: everything, every group, emergencies.
- **operator**: the devices of their groups (``relay.groups``) and those groups; normal and
  priority bulletins; emergencies only with the grant (``--emergency``). TT39 gives a commune
  the say over its own normal bulletins.
- **viewer**: reads, sends nothing.

Passwords are hashed with argon2id (argon2-cffi). Logins are limited per address and a name is
locked out after repeated failures (``console.lockout_after`` within the lock-out time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.protocol import Priority
from ctl.config import groups_of
from ctl.db import Database

ROLES = ("admin", "operator", "viewer")
MIN_PASSWORD = 8
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,31}$"
LOGINS_KEEP_MS = 86_400_000  # login attempts kept a day (the rate limit needs a minute)


class UserError(ValueError):
    """A user that cannot be added or changed as asked (the message says why)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    groups: tuple[str, ...] = ()
    emergency: bool = False

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_send(self) -> bool:
        return self.role in ("admin", "operator")

    def may_priority(self, priority: str) -> bool:
        """Whether this user may send at ``priority`` (emergency: admin, or the grant)."""
        if not self.can_send:
            return False
        if priority == Priority.EMERGENCY.value:
            return self.admin or self.emergency
        return priority in (p.value for p in Priority)

    def sees_device(self, device: str, groups: dict[str, list[str]]) -> bool:
        """Admin and viewer see the whole fleet; an operator the devices of their groups."""
        if self.role != "operator":
            return True
        return bool(set(groups_of(device, groups)) & set(self.groups))

    def sees_group(self, group: str) -> bool:
        return self.role != "operator" or group in self.groups

    def may_target(self, target: str, groups: dict[str, list[str]]) -> bool:
        """Whether this user may send to ``target`` (``dev/ID`` or ``grp/G``): checked on the
        server for every command, whatever the page offered."""
        if not self.can_send:
            return False
        kind, _, name = target.partition("/")
        if self.admin:
            return kind in ("dev", "grp") and bool(name)
        if kind == "grp":
            return name != "all" and name in self.groups
        if kind == "dev":
            return self.sees_device(name, groups)
        return False


@dataclass
class LoginPolicy:
    lockout_after: int = 5  # failures in a row lock the name ...
    lockout_s: float = 900.0  # ... for this long
    per_minute: int = 10  # attempts per address per minute
    clock: object = field(default=time.time)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)  # type: ignore[operator]


class LoginRefused(Exception):
    """Why a login failed: ``reason`` is ``bad`` (name or password), ``locked`` or ``rate``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _hasher():
    from argon2 import PasswordHasher  # argon2id by default

    return PasswordHasher()


class UserStore:
    """Users in ``console_users`` on the relay's database."""

    def __init__(self, db: Database, policy: LoginPolicy | None = None) -> None:
        self.db = db
        self.policy = policy or LoginPolicy()
        self.hasher = _hasher()
        self._dummy = self.hasher.hash("not a password: equal time for unknown names")

    # --- accounts ------------------------------------------------------------------------

    def add(self, name: str, role: str, password: str, groups: list[str],
            emergency: bool = False) -> User:
        import re

        if not re.fullmatch(NAME_RE, name):
            raise UserError(f"user name {name!r} must match {NAME_RE}")
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if role == "operator" and not groups:
            raise UserError("an operator needs --groups (the groups they may reach)")
        if role != "operator" and (groups or emergency):
            raise UserError("--groups and --emergency are for operators (an admin reaches"
                            " everything, a viewer sends nothing)")
        bad = [g for g in groups if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", g) or g == "all"]
        if bad:
            raise UserError(f"not a group name: {', '.join(bad)}")
        self._check_password(password)
        with self.db.tx():
            if self.db.one("SELECT 1 AS x FROM console_users WHERE name=?", name):
                raise UserError(f"user {name} exists (ttcs-ctl user passwd / user del)")
            self.db.x("INSERT INTO console_users(name, role, groups, emergency, hash, created_ms)"
                      " VALUES(?, ?, ?, ?, ?, ?)", name, role, ",".join(groups), int(emergency),
                      self.hasher.hash(password), self.policy.now_ms())
        return User(name, role, tuple(groups), emergency)

    def passwd(self, name: str, password: str) -> None:
        self._check_password(password)
        with self.db.tx():
            n = self.db.x("UPDATE console_users SET hash=?, failed=0, locked_until_ms=NULL"
                          " WHERE name=?", self.hasher.hash(password), name).rowcount
            self.db.x("DELETE FROM console_sessions WHERE name=?", name)
        if not n:
            raise UserError(f"no user {name}")

    def delete(self, name: str) -> None:
        with self.db.tx():
            n = self.db.x("DELETE FROM console_users WHERE name=?", name).rowcount
            self.db.x("DELETE FROM console_sessions WHERE name=?", name)
        if not n:
            raise UserError(f"no user {name}")

    def get(self, name: str) -> User | None:
        with self.db.lock:
            r = self.db.one("SELECT name, role, groups, emergency FROM console_users"
                            " WHERE name=?", name)
        return None if r is None else _user(r)

    def all(self) -> list[User]:
        with self.db.lock:
            rows = self.db.q("SELECT name, role, groups, emergency FROM console_users"
                             " ORDER BY name")
        return [_user(r) for r in rows]

    @staticmethod
    def _check_password(password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise UserError(f"a password needs at least {MIN_PASSWORD} characters")

    # --- login ---------------------------------------------------------------------------

    def login(self, name: str, password: str, addr: str) -> User:
        """The user, or :class:`LoginRefused`. Every attempt is recorded; an address is
        limited to ``per_minute`` attempts; ``lockout_after`` failures in a row lock the
        name for ``lockout_s`` (a correct password does not open a locked name)."""
        from argon2.exceptions import InvalidHashError, VerificationError

        now = self.policy.now_ms()
        with self.db.lock:
            recent = self.db.one("SELECT COUNT(*) AS n FROM console_logins WHERE addr=?"
                                 " AND ts>?", addr, now - 60_000)["n"]
            row = self.db.one("SELECT * FROM console_users WHERE name=?", name)
        if recent >= self.policy.per_minute:
            self._record(name, addr, False, now)
            raise LoginRefused("rate")
        if row is not None and row["locked_until_ms"] and row["locked_until_ms"] > now:
            self._record(name, addr, False, now)
            raise LoginRefused("locked")
        try:
            self.hasher.verify(row["hash"] if row is not None else self._dummy, password)
            ok = row is not None
        except (VerificationError, InvalidHashError):
            ok = False
        with self.db.tx():
            self.db.x("INSERT INTO console_logins(ts, name, addr, ok) VALUES(?, ?, ?, ?)",
                      now, name[:64], addr, int(ok))
            # attempts serve the rate limit (a minute); the audit keeps the history
            self.db.x("DELETE FROM console_logins WHERE ts<?", now - LOGINS_KEEP_MS)
            if row is not None and ok:
                self.db.x("UPDATE console_users SET failed=0, locked_until_ms=NULL WHERE name=?",
                          name)
            elif row is not None:
                failed = row["failed"] + 1
                locked = now + int(self.policy.lockout_s * 1000) \
                    if failed >= self.policy.lockout_after else None
                self.db.x("UPDATE console_users SET failed=?, locked_until_ms=? WHERE name=?",
                          0 if locked else failed, locked, name)
        if not ok:
            raise LoginRefused("bad")
        return _user(row)

    def _record(self, name: str, addr: str, ok: bool, now: int) -> None:
        with self.db.tx():
            self.db.x("INSERT INTO console_logins(ts, name, addr, ok) VALUES(?, ?, ?, ?)",
                      now, name[:64], addr, int(ok))


def _user(r) -> User:
    return User(r["name"], r["role"], tuple(g for g in r["groups"].split(",") if g),
                bool(r["emergency"]))
